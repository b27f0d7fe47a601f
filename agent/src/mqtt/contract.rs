//! The MQTT contract as plain data: topics, identifiers, job requests, replies
//! and statuses. No I/O here; fleet managers code against exactly this.
//!
//! Everything arriving from the broker is hostile until [`parse_job`] or
//! [`validate_id`] says otherwise: size first, then shape, then values, and
//! every rejection names the field or value at fault (escaped, truncated).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

pub use crate::runtime::mounts::BindMounts;
pub use crate::runtime::TcpMode;

/// Default first levels of every topic.
pub const DEFAULT_TOPIC_ROOT: &str = "ferry/v1";
/// Longest node id, job id or container name.
pub const MAX_ID_LEN: usize = 128;
/// Largest job payload accepted, checked before any parsing.
pub const MAX_JOB_PAYLOAD: usize = 16 * 1024;
/// zstd level when the job gives none.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// zstd levels a job may ask for (above 19 needs the "ultra" window sizes).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
/// Longest `rate_limit` string; real ones are like "10MiB/s".
const MAX_RATE_TEXT: usize = 32;
/// How much of a bad value an error message quotes.
const QUOTE_MAX_CHARS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("payload too large: {size} bytes (max {max})")]
    TooLarge { size: usize, max: usize },
    #[error("malformed json: {0}")]
    MalformedJson(String),
    #[error("a job must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("unknown action {0} (expected migrate, evacuate or cancel)")]
    UnknownAction(String),
    #[error("missing field \"{0}\"")]
    MissingField(&'static str),
    #[error("unknown field {0}")]
    UnknownField(String),
    #[error("invalid field \"{field}\": expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("invalid {kind} {value}: {reason}")]
    InvalidId {
        kind: String,
        value: String,
        reason: String,
    },
    #[error("target equals the source node {0}")]
    TargetIsSource(String),
    #[error("cancel job {0} names the cancel job itself")]
    CancelsItself(String),
    #[error("zstd_level {0} out of range {levels:?}", levels = ZSTD_LEVELS)]
    ZstdLevel(String),
    #[error("rate_limit {0}")]
    RateLimit(String),
    #[error("tcp {0} is not close, established or refuse")]
    Tcp(String),
    #[error("bind_mounts {0} is neither \"refuse\" nor \"present\"")]
    BindMounts(String),
    #[error("invalid {field}: {reason}")]
    Targets { field: &'static str, reason: String },
    #[error("invalid selector.label {0}: expected KEY=VALUE")]
    Label(String),
    #[error("precopy {0} is neither \"auto\" nor \"off\"")]
    PreCopy(String),
    #[error("invalid topic root {root}: {reason}")]
    TopicRoot { root: String, reason: String },
    #[error("signed job names {field} {named}, but it was published as {published}")]
    OrderMismatch {
        field: &'static str,
        named: String,
        published: String,
    },
}

/// Quotes a value for an error message: printable ASCII kept, everything else
/// escaped, long values truncated, so a hostile id cannot forge log lines.
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(QUOTE_MAX_CHARS) + 2);
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        if i == QUOTE_MAX_CHARS {
            let _ = write!(out, "\"... ({} bytes)", s.len());
            return out;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// Checks a node id, job id or container name: 1..=128 characters of
/// `[A-Za-z0-9_.-]`, not only dots. Ids become topic levels and file names,
/// so wildcards, `/`, NUL, whitespace and `..` are all out.
pub fn validate_id(kind: &str, s: &str) -> Result<(), ContractError> {
    let fail = |reason: String| {
        Err(ContractError::InvalidId {
            kind: kind.to_owned(),
            value: quoted(s),
            reason,
        })
    };
    if s.is_empty() {
        return fail("must not be empty".into());
    }
    if s.len() > MAX_ID_LEN {
        return fail(format!(
            "longer than {MAX_ID_LEN} characters ({} bytes)",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| !is_id_char(*c)) {
        let reason = match c {
            '/' => "contains '/' (the MQTT topic level separator)".to_owned(),
            '+' | '#' => format!("contains '{c}' (an MQTT wildcard)"),
            '\0' => "contains NUL".to_owned(),
            c if c.is_whitespace() => "contains whitespace".to_owned(),
            c if c.is_control() => "contains a control character".to_owned(),
            c if c.is_ascii() => format!("contains '{c}' (allowed: A-Z a-z 0-9 _ . -)"),
            c => format!(
                "contains '\\u{{{:x}}}' (allowed: A-Z a-z 0-9 _ . -)",
                c as u32
            ),
        };
        return fail(reason);
    }
    if s.bytes().all(|b| b == b'.') {
        return fail("must not be only dots".into());
    }
    Ok(())
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

// ---------------------------------------------------------------------------
// Topics

/// Builds and recognises the contract's topics under one root.
///
/// Builders do not validate their arguments: ids are validated where they
/// enter (config, [`parse_job`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

/// What a topic under the root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    NodeStatus { node: String },
    Job { node: String, job_id: String },
    JobAccepted { node: String, job_id: String },
    JobRejected { node: String, job_id: String },
    JobStatus { node: String, job_id: String },
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            root: DEFAULT_TOPIC_ROOT.to_owned(),
        }
    }
}

impl Topics {
    /// A root of one or more `/`-separated levels, each a valid id
    /// (so no wildcards, no empty levels, no leading `$`).
    pub fn new(root: impl Into<String>) -> Result<Self, ContractError> {
        let root = root.into();
        let bad = |reason: String| ContractError::TopicRoot {
            root: quoted(&root),
            reason,
        };
        if root.is_empty() {
            return Err(bad("must not be empty".into()));
        }
        for level in root.split('/') {
            if let Err(ContractError::InvalidId { reason, .. }) = validate_id("level", level) {
                return Err(bad(format!("level {}: {reason}", quoted(level))));
            }
        }
        Ok(Topics { root })
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// `{root}/{node}/status`, retained.
    pub fn node_status(&self, node: &str) -> String {
        format!("{}/{node}/status", self.root)
    }

    /// `{root}/{node}/jobs/{id}`: where a job for `node` is published.
    pub fn job(&self, node: &str, id: &str) -> String {
        format!("{}/{node}/jobs/{id}", self.root)
    }

    pub fn job_accepted(&self, node: &str, id: &str) -> String {
        format!("{}/accepted", self.job(node, id))
    }

    pub fn job_rejected(&self, node: &str, id: &str) -> String {
        format!("{}/rejected", self.job(node, id))
    }

    /// `{root}/{node}/jobs/{id}/status`, retained.
    pub fn job_status(&self, node: &str, id: &str) -> String {
        format!("{}/status", self.job(node, id))
    }

    /// Filter for the jobs of one node (not their replies: `+` is one level).
    pub fn jobs_of(&self, node: &str) -> String {
        format!("{}/{node}/jobs/+", self.root)
    }

    pub fn all_node_status(&self) -> String {
        format!("{}/+/status", self.root)
    }

    pub fn all_job_status(&self) -> String {
        format!("{}/+/jobs/+/status", self.root)
    }

    /// Recognises a topic by its shape. Levels are returned as they are:
    /// [`parse_job`] validates them, so a bad job id still gets a reply.
    pub fn parse(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic.strip_prefix(self.root.as_str())?.strip_prefix('/')?;
        let levels: Vec<&str> = rest.split('/').collect();
        if levels.iter().any(|l| l.is_empty()) {
            return None;
        }
        let s = |l: &str| l.to_owned();
        Some(match levels.as_slice() {
            [node, "status"] => TopicKind::NodeStatus { node: s(node) },
            [node, "jobs", id] => TopicKind::Job {
                node: s(node),
                job_id: s(id),
            },
            [node, "jobs", id, "accepted"] => TopicKind::JobAccepted {
                node: s(node),
                job_id: s(id),
            },
            [node, "jobs", id, "rejected"] => TopicKind::JobRejected {
                node: s(node),
                job_id: s(id),
            },
            [node, "jobs", id, "status"] => TopicKind::JobStatus {
                node: s(node),
                job_id: s(id),
            },
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------
// Jobs

/// A job as sent by a fleet manager. Serialize gives the contract's JSON
/// (the CLI publishes it); parsing goes through [`parse_job`] only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum JobRequest {
    Migrate {
        container: String,
        target: Target,
        options: MigrateOptions,
    },
    /// Moves every running container that matches `selector` off the node.
    Evacuate {
        selector: Selector,
        targets: Target,
        options: MigrateOptions,
    },
    Cancel {
        job: String,
    },
}

/// Where a migration may go: one named node, any node (`"auto"`), or one
/// of a list; the source places the job (see `migration::placement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node(String),
    Auto,
    Among(Vec<String>),
}

/// The word that asks the source to place a job; never a node id.
pub const AUTO: &str = "auto";
/// Most candidates a job may list.
pub const MAX_CANDIDATES: usize = 64;

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Target::Node(n) => s.serialize_str(n),
            Target::Auto => s.serialize_str(AUTO),
            Target::Among(list) => list.serialize(s),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Target::Node(n) => f.write_str(n),
            Target::Auto => f.write_str(AUTO),
            Target::Among(list) => write!(f, "one of {}", list.join(",")),
        }
    }
}

/// Which containers an evacuation moves: those with this label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub label_key: String,
    pub label_value: String,
}

/// The label an evacuation selects when the job names none.
pub const DEFAULT_EVACUATE_LABEL: (&str, &str) = ("ferry.migrate", "true");

impl Default for Selector {
    fn default() -> Self {
        Selector {
            label_key: DEFAULT_EVACUATE_LABEL.0.into(),
            label_value: DEFAULT_EVACUATE_LABEL.1.into(),
        }
    }
}

impl Selector {
    /// `KEY=VALUE`: a non-empty key without `=`, control characters or
    /// more than 256 bytes in all.
    pub fn parse_label(text: &str) -> Result<Selector, ContractError> {
        let bad = || ContractError::Label(quoted(text));
        if text.len() > 256 || text.chars().any(char::is_control) {
            return Err(bad());
        }
        match text.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(Selector {
                label_key: k.to_owned(),
                label_value: v.to_owned(),
            }),
            _ => Err(bad()),
        }
    }

    pub fn label(&self) -> String {
        format!("{}={}", self.label_key, self.label_value)
    }
}

impl Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({ "label": self.label() }).serialize(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateSpec>,
    pub zstd_level: i32,
    /// What happens to the container's established TCP connections.
    pub tcp: TcpMode,
    /// `"refuse"` (the default) or `"present"`: the container's bind
    /// mounts exist on the target as they are on the source.
    #[serde(skip_serializing_if = "is_refuse")]
    pub bind_mounts: BindMounts,
    /// `"auto"` (the default): send the memory while the container runs,
    /// then only the blocks that changed; `"off"`: stop and copy.
    #[serde(skip_serializing_if = "PreCopyMode::is_auto")]
    pub precopy: PreCopyMode,
}

/// The job option `precopy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreCopyMode {
    #[default]
    Auto,
    Off,
}

impl PreCopyMode {
    fn is_auto(&self) -> bool {
        *self == PreCopyMode::Auto
    }
}

/// What pre-copy did, in the source's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreCopyReport {
    /// One entry per round sent while the container ran.
    #[serde(default)]
    pub rounds: Vec<PreCopyRound>,
    /// The final (stopping) dump: blocks sent whole, and the rest as
    /// references; `None` when it went as a plain copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_round: Option<PreCopyRound>,
    /// Why pre-copy did not run, or why the final dump went whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One round: page bytes dumped, bytes of blocks the target lacked (sent
/// whole), bytes on the wire, and how long the round took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreCopyRound {
    pub bytes_pages: u64,
    pub bytes_new: u64,
    pub bytes_wire: u64,
    pub ms: u64,
}

fn is_refuse(b: &BindMounts) -> bool {
    *b == BindMounts::Refuse
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            rate_limit: None,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            tcp: TcpMode::default(),
            bind_mounts: BindMounts::Refuse,
            precopy: PreCopyMode::Auto,
        }
    }
}

/// A rate limit as written in the job; converted to bytes/s elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RateSpec {
    /// Like "10MiB/s"; only known to be non-empty here.
    Text(String),
    /// Bytes per second, > 0.
    Bytes(u64),
}

/// Parses the payload of `{root}/{topic_node}/jobs/{job_id}`.
///
/// Hand-rolled over a JSON object rather than a derived enum so that every
/// rejection names its field in the contract's words and duplicate keys are
/// refused (a derive would let the last one win for the tag's siblings).
pub fn parse_job(
    topic_node: &str,
    job_id: &str,
    payload: &[u8],
) -> Result<JobRequest, ContractError> {
    if payload.len() > MAX_JOB_PAYLOAD {
        return Err(ContractError::TooLarge {
            size: payload.len(),
            max: MAX_JOB_PAYLOAD,
        });
    }
    validate_id("node id", topic_node)?;
    validate_id("job id", job_id)?;
    parse_job_object(topic_node, job_id, json_object(payload)?)
}

/// A payload as a JSON object, duplicate keys refused.
fn json_object(payload: &[u8]) -> Result<Map<String, Value>, ContractError> {
    match serde_json::from_slice::<StrictValue>(payload) {
        Ok(StrictValue(Value::Object(obj))) => Ok(obj),
        Ok(StrictValue(other)) => Err(ContractError::NotAnObject(json_kind(&other))),
        Err(e) => Err(ContractError::MalformedJson(e.to_string())),
    }
}

fn parse_job_object(
    topic_node: &str,
    job_id: &str,
    obj: Map<String, Value>,
) -> Result<JobRequest, ContractError> {
    let action = match obj.get("action") {
        None => return Err(ContractError::MissingField("action")),
        Some(Value::String(a)) => a.as_str(),
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "action",
                expected: "a string",
            })
        }
    };
    match action {
        "migrate" => {
            deny_unknown(&obj, "", &["action", "container", "target", "options"])?;
            let container = required_str(&obj, "container")?;
            validate_id("container", &container)?;
            let target = match obj.get("target") {
                None | Some(Value::Null) => return Err(ContractError::MissingField("target")),
                Some(v) => parse_target("target", v, topic_node)?,
            };
            let options = parse_options(obj.get("options"))?;
            Ok(JobRequest::Migrate {
                container,
                target,
                options,
            })
        }
        "evacuate" => {
            deny_unknown(&obj, "", &["action", "selector", "targets", "options"])?;
            let selector = match obj.get("selector") {
                None | Some(Value::Null) => Selector::default(),
                Some(Value::Object(sel)) => {
                    deny_unknown(sel, "selector.", &["label"])?;
                    match sel.get("label") {
                        None | Some(Value::Null) => Selector::default(),
                        Some(Value::String(l)) => Selector::parse_label(l)?,
                        Some(_) => {
                            return Err(ContractError::WrongType {
                                field: "selector.label",
                                expected: "a string KEY=VALUE",
                            })
                        }
                    }
                }
                Some(_) => {
                    return Err(ContractError::WrongType {
                        field: "selector",
                        expected: "an object",
                    })
                }
            };
            let targets = match obj.get("targets") {
                None | Some(Value::Null) => Target::Auto,
                Some(v) => match parse_target("targets", v, topic_node)? {
                    // One named node is a list of one: it is placed the same way.
                    Target::Node(n) => Target::Among(vec![n]),
                    t => t,
                },
            };
            let options = parse_options(obj.get("options"))?;
            Ok(JobRequest::Evacuate {
                selector,
                targets,
                options,
            })
        }
        "cancel" => {
            deny_unknown(&obj, "", &["action", "job"])?;
            let job = required_str(&obj, "job")?;
            validate_id("job", &job)?;
            if job == job_id {
                return Err(ContractError::CancelsItself(quoted(&job)));
            }
            Ok(JobRequest::Cancel { job })
        }
        other => Err(ContractError::UnknownAction(quoted(other))),
    }
}

/// A node id, `"auto"`, or a non-empty list of distinct node ids, none of
/// them the source.
fn parse_target(field: &'static str, v: &Value, topic_node: &str) -> Result<Target, ContractError> {
    let node = |n: &str| -> Result<String, ContractError> {
        validate_id(field, n)?;
        if n == topic_node {
            return Err(ContractError::TargetIsSource(quoted(n)));
        }
        if n == AUTO {
            return Err(ContractError::Targets {
                field,
                reason: format!("{} is a word of the contract, not a node id", quoted(n)),
            });
        }
        Ok(n.to_owned())
    };
    match v {
        Value::String(s) if s == AUTO => Ok(Target::Auto),
        Value::String(s) => Ok(Target::Node(node(s)?)),
        Value::Array(list) => {
            if list.is_empty() || list.len() > MAX_CANDIDATES {
                return Err(ContractError::Targets {
                    field,
                    reason: format!("a list needs 1 to {MAX_CANDIDATES} node ids"),
                });
            }
            let mut out: Vec<String> = Vec::with_capacity(list.len());
            for item in list {
                let Value::String(s) = item else {
                    return Err(ContractError::WrongType {
                        field,
                        expected: "a node id, \"auto\" or a list of node ids",
                    });
                };
                let n = node(s)?;
                if out.contains(&n) {
                    return Err(ContractError::Targets {
                        field,
                        reason: format!("{} is listed twice", quoted(&n)),
                    });
                }
                out.push(n);
            }
            Ok(Target::Among(out))
        }
        _ => Err(ContractError::WrongType {
            field,
            expected: "a node id, \"auto\" or a list of node ids",
        }),
    }
}

fn parse_options(v: Option<&Value>) -> Result<MigrateOptions, ContractError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(MigrateOptions::default()),
        Some(Value::Object(obj)) => obj,
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "options",
                expected: "an object",
            })
        }
    };
    deny_unknown(
        obj,
        "options.",
        &["rate_limit", "zstd_level", "tcp", "bind_mounts", "precopy"],
    )?;

    let rate_limit = match obj.get("rate_limit") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(ContractError::RateLimit("must not be empty".into()))
        }
        Some(Value::String(s)) if s.len() > MAX_RATE_TEXT => {
            return Err(ContractError::RateLimit(format!(
                "{} is longer than {MAX_RATE_TEXT} bytes",
                quoted(s)
            )))
        }
        Some(Value::String(s)) => Some(RateSpec::Text(s.clone())),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => return Err(ContractError::RateLimit("must be greater than zero".into())),
            Some(b) => Some(RateSpec::Bytes(b)),
            None => return Err(rate_type_error()),
        },
        Some(_) => return Err(rate_type_error()),
    };

    let zstd_level = match obj.get("zstd_level") {
        None | Some(Value::Null) => DEFAULT_ZSTD_LEVEL,
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            match n.as_i64().and_then(|l| i32::try_from(l).ok()) {
                Some(l) if ZSTD_LEVELS.contains(&l) => l,
                _ => return Err(ContractError::ZstdLevel(n.to_string())),
            }
        }
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "options.zstd_level",
                expected: "an integer",
            })
        }
    };

    let tcp = match obj.get("tcp") {
        None | Some(Value::Null) => TcpMode::default(),
        Some(Value::String(s)) => s.parse().map_err(|()| ContractError::Tcp(quoted(s)))?,
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "options.tcp",
                expected: "one of \"close\", \"established\", \"refuse\"",
            })
        }
    };

    let bind_mounts = match obj.get("bind_mounts") {
        None | Some(Value::Null) => BindMounts::Refuse,
        Some(Value::String(s)) if s == "refuse" => BindMounts::Refuse,
        Some(Value::String(s)) if s == "present" => BindMounts::Present,
        Some(Value::String(s)) => {
            return Err(ContractError::BindMounts(quoted(
                &s.chars().take(MAX_RATE_TEXT).collect::<String>(),
            )))
        }
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "options.bind_mounts",
                expected: "the string \"refuse\" or \"present\"",
            })
        }
    };

    let precopy = match obj.get("precopy") {
        None | Some(Value::Null) => PreCopyMode::Auto,
        Some(Value::String(s)) if s == "auto" => PreCopyMode::Auto,
        Some(Value::String(s)) if s == "off" => PreCopyMode::Off,
        Some(Value::String(s)) => {
            return Err(ContractError::PreCopy(quoted(
                &s.chars().take(MAX_RATE_TEXT).collect::<String>(),
            )))
        }
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "options.precopy",
                expected: "the string \"auto\" or \"off\"",
            })
        }
    };

    Ok(MigrateOptions {
        rate_limit,
        zstd_level,
        tcp,
        bind_mounts,
        precopy,
    })
}

fn rate_type_error() -> ContractError {
    ContractError::WrongType {
        field: "options.rate_limit",
        expected: "a string like \"10MiB/s\" or a positive integer of bytes per second",
    }
}

fn deny_unknown(
    obj: &Map<String, Value>,
    prefix: &str,
    known: &[&str],
) -> Result<(), ContractError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ContractError::UnknownField(quoted(&format!("{prefix}{k}")))),
        None => Ok(()),
    }
}

fn required_str(obj: &Map<String, Value>, field: &'static str) -> Result<String, ContractError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ContractError::MissingField(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ContractError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value that refuses duplicate object keys at any depth, so that two
/// readers of the same job (us, a broker plugin, a log viewer) cannot
/// disagree about which `"target"` counts. serde_json's recursion limit
/// still applies.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate field {}",
                    quoted(&key)
                )));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

// ---------------------------------------------------------------------------
// Signed orders

/// A job in its signed envelope, as published on `{root}/{node}/jobs/{id}`:
/// `job` is the job JSON as a string (the contract's job plus the
/// [`ORDER_FIELDS`]), `sig` the base64 (standard, padded) Ed25519 signature
/// over exactly the UTF-8 bytes of that string, `key_id` which manager key
/// signed it (informative: the signature decides). Signing a string, not a
/// re-serialized object, means any MQTT client can produce an envelope and
/// no canonical JSON is needed. Checking the signature is not done here
/// (see [`crate::order`]): this is its shape only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub job: String,
    pub sig: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// What a signed job carries besides the job itself: the node it is for
/// (the topic's node), its id (the topic's last level), when it was issued
/// and when it expires (Unix seconds).
pub const ORDER_FIELDS: [&str; 4] = ["node", "job_id", "issued_at", "expires_at"];

/// When a signed order holds, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub issued_at: u64,
    pub expires_at: u64,
}

/// A job as it arrived: bare (no signature; only a node without the
/// manager's key accepts it) or signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub request: JobRequest,
    /// The envelope, kept to verify it and to pass it on to the target.
    pub signed: Option<(Envelope, Validity)>,
}

/// Parses the payload of `{root}/{topic_node}/jobs/{job_id}`: a bare job
/// (an object with `"action"`) or an [`Envelope`]. A signed job must name
/// the topic's node and job id, so an order cannot be moved to another
/// node or another id. Only the shape is checked here.
pub fn parse_order(topic_node: &str, job_id: &str, payload: &[u8]) -> Result<Order, ContractError> {
    if payload.len() > MAX_JOB_PAYLOAD {
        return Err(ContractError::TooLarge {
            size: payload.len(),
            max: MAX_JOB_PAYLOAD,
        });
    }
    validate_id("node id", topic_node)?;
    validate_id("job id", job_id)?;
    let obj = json_object(payload)?;
    if obj.contains_key("action") {
        return Ok(Order {
            request: parse_job_object(topic_node, job_id, obj)?,
            signed: None,
        });
    }
    let envelope = parse_envelope(obj)?;
    let (request, validity) = parse_signed_job(topic_node, job_id, &envelope.job)?;
    Ok(Order {
        request,
        signed: Some((envelope, validity)),
    })
}

fn parse_envelope(obj: Map<String, Value>) -> Result<Envelope, ContractError> {
    deny_unknown(&obj, "", &["job", "sig", "key_id"])?;
    let job = required_str(&obj, "job")?;
    let sig = required_str(&obj, "sig")?;
    let key_id = match obj.get("key_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if k.len() <= MAX_ID_LEN => Some(k.clone()),
        Some(_) => {
            return Err(ContractError::WrongType {
                field: "key_id",
                expected: "a string of at most 128 bytes",
            })
        }
    };
    Ok(Envelope { job, sig, key_id })
}

/// The job inside an envelope: the contract's job plus the
/// [`ORDER_FIELDS`], which must name `topic_node` and `job_id`.
/// The `job_id` a signed job names, if it names one: which order a
/// `Prepare` claims to follow (an evacuation's covers its children).
pub fn signed_job_id(job: &str) -> Option<String> {
    let obj = json_object(job.as_bytes()).ok()?;
    obj.get("job_id")?.as_str().map(str::to_owned)
}

pub fn parse_signed_job(
    topic_node: &str,
    job_id: &str,
    job: &str,
) -> Result<(JobRequest, Validity), ContractError> {
    let mut obj = json_object(job.as_bytes())?;
    for (field, published) in [("node", topic_node), ("job_id", job_id)] {
        let named = required_str(&obj, field)?;
        if named != published {
            return Err(ContractError::OrderMismatch {
                field,
                named: quoted(&named),
                published: quoted(published),
            });
        }
    }
    let time = |field: &'static str| match obj.get(field) {
        None | Some(Value::Null) => Err(ContractError::MissingField(field)),
        Some(Value::Number(n)) => n.as_u64().ok_or(ContractError::WrongType {
            field,
            expected: "Unix seconds (a non-negative integer)",
        }),
        Some(_) => Err(ContractError::WrongType {
            field,
            expected: "Unix seconds (a non-negative integer)",
        }),
    };
    let validity = Validity {
        issued_at: time("issued_at")?,
        expires_at: time("expires_at")?,
    };
    for field in ORDER_FIELDS {
        obj.remove(field);
    }
    Ok((parse_job_object(topic_node, job_id, obj)?, validity))
}

// ---------------------------------------------------------------------------
// Replies and statuses

/// Published on `.../jobs/{id}/accepted` at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub job_id: String,
    pub node: String,
    /// A migrate job: the node it goes to (chosen by the source when the
    /// job said `"auto"` or gave a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Published on `.../jobs/{id}/rejected`; `reason` names the bad field or the
/// missing thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub job_id: String,
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    RolledBack,
    Canceled,
}

impl JobState {
    /// The contract's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::InProgress => "in_progress",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::RolledBack => "rolled_back",
            JobState::Canceled => "canceled",
        }
    }

    /// No further status follows a final one.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::RolledBack | JobState::Canceled
        )
    }
}

/// Migration phases in the order they run (`Ord` follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Precheck,
    /// Pre-copy rounds while the container runs (issue 10).
    Precopy,
    Checkpoint,
    Transfer,
    Restore,
    Cleanup,
}

/// Retained progress on `.../jobs/{id}/status`; source and target each
/// publish their own view under their own node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub node: String,
    pub role: Role,
    pub container: String,
    pub source: String,
    pub target: String,
    pub state: JobState,
    #[serde(default)]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub bytes_raw: u64,
    #[serde(default)]
    pub bytes_wire: u64,
    #[serde(default)]
    pub rate_bps: u64,
    /// Image bytes sent on the wire before the checkpoint (0 when the
    /// target had the image).
    #[serde(default)]
    pub bytes_image: u64,
    /// Tar bytes of the container's files and volumes inside the
    /// checkpoint (counted in `bytes_raw` too).
    #[serde(default)]
    pub bytes_state: u64,
    #[serde(default)]
    pub timings_ms: BTreeMap<Phase, u64>,
    #[serde(default)]
    pub error: Option<String>,
    /// Source only: how the checkpoint was taken, `runc` (straight into
    /// the engine's checkpoint folder) or `engine` (the engine's own call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_via: Option<String>,
    /// Why the engine's call was used instead of runc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_fallback: Option<String>,
    /// While `queued`: its place in the node's line (1 runs next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// The container's IP address on each of its networks on the source,
    /// and (in the target's status, once restored) on the target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub old_addresses: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub new_addresses: BTreeMap<String, String>,
    /// A placed job (`"auto"` or a list): why each candidate other than
    /// `target` was not chosen.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub excluded: BTreeMap<String, String>,
    /// A child of an evacuation: the evacuation's job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Source only: the pre-copy rounds, or why there were none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy: Option<PreCopyReport>,
    pub updated_ms: u64,
}

impl JobStatus {
    /// A `queued` status with no progress yet.
    pub fn new(
        job_id: impl Into<String>,
        node: impl Into<String>,
        role: Role,
        container: impl Into<String>,
        source: impl Into<String>,
        target: impl Into<String>,
        updated_ms: u64,
    ) -> Self {
        JobStatus {
            job_id: job_id.into(),
            node: node.into(),
            role,
            container: container.into(),
            source: source.into(),
            target: target.into(),
            state: JobState::Queued,
            phase: None,
            bytes_raw: 0,
            bytes_wire: 0,
            rate_bps: 0,
            bytes_image: 0,
            bytes_state: 0,
            timings_ms: BTreeMap::new(),
            error: None,
            checkpoint_via: None,
            checkpoint_fallback: None,
            position: None,
            old_addresses: BTreeMap::new(),
            new_addresses: BTreeMap::new(),
            excluded: BTreeMap::new(),
            parent: None,
            precopy: None,
            updated_ms,
        }
    }
}

/// Retained on `{root}/{node}/status`. Every field defaults so that the Last
/// Will's bare `{"online": false}` reads back as a status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    pub online: bool,
    pub version: String,
    pub arch: String,
    pub page_size: u64,
    /// The version of a CRIU that works here; `None` when none does.
    pub criu: Option<String>,
    /// Why CRIU cannot be used here (it fails `criu check`, or cannot dump
    /// sockets on this kernel), naming the version found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criu_error: Option<String>,
    /// The kernel release the engine runs containers on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    pub docker: Option<String>,
    pub data_addr: Option<String>,
    /// Memory this node offers to incoming containers, in bytes: what the
    /// kernel reports available, capped by the agent's `offer_memory`.
    /// Placement needs at least the container's memory use here.
    pub free_mem: u64,
    /// Free bytes in the work dir, where incoming checkpoints are staged.
    /// Placement needs at least the container's memory use here.
    pub free_disk: u64,
    /// Migrations running on this node (either role) and queued: placement
    /// prefers the node with the fewest.
    pub jobs: u32,
    pub updated_ms: u64,
}

/// One container of an evacuation, as the evacuation's status lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvacuationChild {
    /// `{evacuation id}.{n}`, n counting from 1; its own status is on
    /// `.../jobs/{job_id}/status` of the evacuated node.
    pub job_id: String,
    pub container: String,
    /// The node chosen for it, once placed.
    #[serde(default)]
    pub target: Option<String>,
    pub state: JobState,
    #[serde(default)]
    pub error: Option<String>,
}

/// Retained on `.../jobs/{id}/status` of an evacuate job: `action` tells it
/// from a migration's [`JobStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvacuationStatus {
    pub job_id: String,
    pub node: String,
    /// Always `"evacuate"`.
    pub action: String,
    /// The label matched, `KEY=VALUE`.
    pub selector: String,
    /// `succeeded` only when every matching container runs elsewhere.
    pub state: JobState,
    pub children: Vec<EvacuationChild>,
    #[serde(default)]
    pub error: Option<String>,
    pub updated_ms: u64,
}

impl NodeStatus {
    /// The Last Will payload (published retained by the broker when the
    /// agent vanishes, and by the client itself on a clean shutdown).
    pub fn offline_will() -> Vec<u8> {
        br#"{"online":false}"#.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(payload: &str) -> Result<JobRequest, ContractError> {
        parse_job("node-a", "job-1", payload.as_bytes())
    }

    fn reason(payload: &str) -> String {
        match job(payload) {
            Ok(j) => panic!("accepted {payload}: {j:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn migrate_with_all_options() {
        let j = job(
            r#"{"action":"migrate","container":"counter","target":"node-b",
                      "options":{"rate_limit":"10MiB/s","zstd_level":5,"tcp":"refuse",
                                 "bind_mounts":"present"}}"#,
        )
        .unwrap();
        assert_eq!(
            j,
            JobRequest::Migrate {
                container: "counter".into(),
                target: Target::Node("node-b".into()),
                options: MigrateOptions {
                    rate_limit: Some(RateSpec::Text("10MiB/s".into())),
                    zstd_level: 5,
                    tcp: TcpMode::Refuse,
                    bind_mounts: BindMounts::Present,
                    precopy: PreCopyMode::Auto,
                }
            }
        );
    }

    #[test]
    fn migrate_defaults_and_numeric_rate() {
        let j = job(r#"{"action":"migrate","container":"c","target":"b"}"#).unwrap();
        assert_eq!(
            j,
            JobRequest::Migrate {
                container: "c".into(),
                target: Target::Node("b".into()),
                options: MigrateOptions::default()
            }
        );
        let j = job(r#"{"action":"migrate","container":"c","target":"b","options":{"rate_limit":20971520}}"#)
            .unwrap();
        let JobRequest::Migrate { options, .. } = j else {
            panic!("not a migrate: {j:?}")
        };
        assert_eq!(options.rate_limit, Some(RateSpec::Bytes(20 * 1024 * 1024)));
        assert_eq!(options.zstd_level, 3);
        assert_eq!(options.tcp, TcpMode::Close);
        assert_eq!(options.bind_mounts, BindMounts::Refuse);
    }

    #[test]
    fn bind_mounts_is_refuse_or_present() {
        let with = |v: &str| {
            format!(
                r#"{{"action":"migrate","container":"c","target":"b","options":{{"bind_mounts":{v}}}}}"#
            )
        };
        for (v, want) in [
            ("\"refuse\"", BindMounts::Refuse),
            ("\"present\"", BindMounts::Present),
            ("null", BindMounts::Refuse),
        ] {
            let Ok(JobRequest::Migrate { options, .. }) = job(&with(v)) else {
                panic!("{v} refused")
            };
            assert_eq!(options.bind_mounts, want, "{v}");
        }
        assert_eq!(
            reason(&with("\"Present\"")),
            r#"bind_mounts "Present" is neither "refuse" nor "present""#
        );
        assert_eq!(
            reason(&with("true")),
            r#"invalid field "options.bind_mounts": expected the string "refuse" or "present""#
        );
        // Only a non-default value is written, so older agents still parse
        // the jobs a new CLI sends without the option.
        let default = serde_json::to_value(MigrateOptions::default()).unwrap();
        assert_eq!(default.get("bind_mounts"), None);
    }

    #[test]
    fn precopy_is_auto_or_off() {
        let with = |v: &str| {
            format!(
                r#"{{"action":"migrate","container":"c","target":"b","options":{{"precopy":{v}}}}}"#
            )
        };
        for (v, want) in [
            ("\"auto\"", PreCopyMode::Auto),
            ("\"off\"", PreCopyMode::Off),
            ("null", PreCopyMode::Auto),
        ] {
            let Ok(JobRequest::Migrate { options, .. }) = job(&with(v)) else {
                panic!("{v} refused")
            };
            assert_eq!(options.precopy, want, "{v}");
        }
        assert_eq!(
            reason(&with("\"on\"")),
            r#"precopy "on" is neither "auto" nor "off""#
        );
        assert_eq!(
            reason(&with("1")),
            r#"invalid field "options.precopy": expected the string "auto" or "off""#
        );
        let default = serde_json::to_value(MigrateOptions::default()).unwrap();
        assert_eq!(default.get("precopy"), None);
    }

    #[test]
    fn cancel() {
        assert_eq!(
            job(r#"{"action":"cancel","job":"job-0"}"#).unwrap(),
            JobRequest::Cancel {
                job: "job-0".into()
            }
        );
        assert_eq!(
            reason(r#"{"action":"cancel","job":"job-1"}"#),
            r#"cancel job "job-1" names the cancel job itself"#
        );
        assert_eq!(reason(r#"{"action":"cancel"}"#), r#"missing field "job""#);
        assert_eq!(
            reason(r#"{"action":"cancel","job":"x","container":"c"}"#),
            r#"unknown field "container""#
        );
    }

    #[test]
    fn serialized_job_parses_back() {
        for j in [
            JobRequest::Migrate {
                container: "counter".into(),
                target: Target::Node("node-b".into()),
                options: MigrateOptions {
                    rate_limit: Some(RateSpec::Text("20MiB/s".into())),
                    zstd_level: 7,
                    tcp: TcpMode::Established,
                    bind_mounts: BindMounts::Refuse,
                    precopy: PreCopyMode::Off,
                },
            },
            JobRequest::Migrate {
                container: "c".into(),
                target: Target::Node("b".into()),
                options: MigrateOptions {
                    rate_limit: Some(RateSpec::Bytes(1000)),
                    zstd_level: 1,
                    tcp: TcpMode::Refuse,
                    bind_mounts: BindMounts::Present,
                    precopy: PreCopyMode::Auto,
                },
            },
            JobRequest::Migrate {
                container: "c".into(),
                target: Target::Node("b".into()),
                options: MigrateOptions::default(),
            },
            JobRequest::Cancel { job: "j0".into() },
        ] {
            let bytes = serde_json::to_vec(&j).unwrap();
            assert_eq!(parse_job("node-a", "job-1", &bytes).unwrap(), j);
        }
        let v: Value = serde_json::to_value(JobRequest::Cancel { job: "j0".into() }).unwrap();
        assert_eq!(v, serde_json::json!({"action": "cancel", "job": "j0"}));
    }

    #[test]
    fn a_target_is_a_node_auto_or_a_list_of_candidates() {
        let with = |t: &str| format!(r#"{{"action":"migrate","container":"c","target":{t}}}"#);
        let target = |t: &str| match job(&with(t)) {
            Ok(JobRequest::Migrate { target, .. }) => target,
            other => panic!("{t}: {other:?}"),
        };
        assert_eq!(target(r#""auto""#), Target::Auto);
        assert_eq!(target(r#""b""#), Target::Node("b".into()));
        assert_eq!(
            target(r#"["b","c"]"#),
            Target::Among(vec!["b".into(), "c".into()])
        );
        for (t, want) in [
            ("[]", r#"invalid target: a list needs 1 to 64 node ids"#),
            (r#"["b","b"]"#, r#"invalid target: "b" is listed twice"#),
            (
                r#"["b","node-a"]"#,
                r#"target equals the source node "node-a""#,
            ),
            (
                r#"["b",3]"#,
                r#"invalid field "target": expected a node id, "auto" or a list of node ids"#,
            ),
            (r#"["b/x"]"#, "invalid target \"b/x\": contains '/'"),
            (
                r#"["auto"]"#,
                r#"invalid target: "auto" is a word of the contract, not a node id"#,
            ),
        ] {
            let got = reason(&with(t));
            assert!(got.starts_with(want), "{t}: {got}");
        }
        for t in [Target::Auto, Target::Among(vec!["x".into(), "y".into()])] {
            let j = JobRequest::Migrate {
                container: "c".into(),
                target: t,
                options: MigrateOptions::default(),
            };
            let bytes = serde_json::to_vec(&j).unwrap();
            assert_eq!(parse_job("node-a", "job-1", &bytes).unwrap(), j);
        }
    }

    #[test]
    fn state_words_are_the_serialized_ones() {
        use JobState::*;
        for s in [Queued, InProgress, Succeeded, Failed, RolledBack, Canceled] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn evacuate_defaults_to_the_migrate_label_and_auto_placement() {
        let j = job(r#"{"action":"evacuate"}"#).unwrap();
        assert_eq!(
            j,
            JobRequest::Evacuate {
                selector: Selector::default(),
                targets: Target::Auto,
                options: MigrateOptions::default(),
            }
        );
        assert_eq!(Selector::default().label(), "ferry.migrate=true");
        let j = job(
            r#"{"action":"evacuate","selector":{"label":"tier=edge=1"},"targets":"b",
                "options":{"zstd_level":1}}"#,
        )
        .unwrap();
        let JobRequest::Evacuate {
            selector,
            targets,
            options,
        } = &j
        else {
            panic!("{j:?}")
        };
        assert_eq!(
            (selector.label_key.as_str(), selector.label_value.as_str()),
            ("tier", "edge=1")
        );
        assert_eq!(targets, &Target::Among(vec!["b".into()]));
        assert_eq!(options.zstd_level, 1);
        let bytes = serde_json::to_vec(&j).unwrap();
        assert_eq!(parse_job("node-a", "job-1", &bytes).unwrap(), j);
        for (payload, want) in [
            (
                r#"{"action":"evacuate","selector":{"label":"=x"}}"#,
                r#"invalid selector.label "=x": expected KEY=VALUE"#,
            ),
            (
                r#"{"action":"evacuate","selector":{"label":"x"}}"#,
                r#"invalid selector.label "x": expected KEY=VALUE"#,
            ),
            (
                r#"{"action":"evacuate","selector":{"name":"x"}}"#,
                r#"unknown field "selector.name""#,
            ),
            (
                r#"{"action":"evacuate","targets":["node-a"]}"#,
                r#"target equals the source node "node-a""#,
            ),
            (
                r#"{"action":"evacuate","container":"c"}"#,
                r#"unknown field "container""#,
            ),
        ] {
            assert_eq!(reason(payload), want, "{payload}");
        }
    }

    #[test]
    fn rejections_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"action":"migrate""#, "malformed json: "),
            ("\u{ff}", "malformed json: "),
            (
                r#"{"action":"migrate","container":"c","target":"b"} x"#,
                "malformed json: ",
            ),
            ("[1,2]", "a job must be a JSON object, got an array"),
            (r#"{"container":"c"}"#, r#"missing field "action""#),
            (
                r#"{"action":7}"#,
                r#"invalid field "action": expected a string"#,
            ),
            (
                r#"{"action":"x"}"#,
                r#"unknown action "x" (expected migrate, evacuate or cancel)"#,
            ),
            (
                r#"{"action":"migrate","container":"c"}"#,
                r#"missing field "target""#,
            ),
            (
                r#"{"action":"migrate","target":"b"}"#,
                r#"missing field "container""#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","foo":1}"#,
                r#"unknown field "foo""#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"zstd":1}}"#,
                r#"unknown field "options.zstd""#,
            ),
            (
                r#"{"action":"migrate","container":"a/b","target":"b"}"#,
                r#"invalid container "a/b": contains '/'"#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"node+"}"#,
                r#"invalid target "node+": contains '+' (an MQTT wildcard)"#,
            ),
            (
                r##"{"action":"migrate","container":"c","target":"#"}"##,
                r##"invalid target "#": contains '#' (an MQTT wildcard)"##,
            ),
            (
                r#"{"action":"migrate","container":3,"target":"b"}"#,
                r#"invalid field "container": expected a string"#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"node-a"}"#,
                r#"target equals the source node "node-a""#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"zstd_level":40}}"#,
                "zstd_level 40 out of range 1..=19",
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"zstd_level":0}}"#,
                "zstd_level 0 out of range 1..=19",
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"zstd_level":99999999999}}"#,
                "zstd_level 99999999999 out of range 1..=19",
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"zstd_level":3.5}}"#,
                r#"invalid field "options.zstd_level": expected an integer"#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"rate_limit":""}}"#,
                "rate_limit must not be empty",
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"rate_limit":0}}"#,
                "rate_limit must be greater than zero",
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"rate_limit":-5}}"#,
                r#"invalid field "options.rate_limit": expected a string"#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"tcp":"keep"}}"#,
                r#"tcp "keep" is not close, established or refuse"#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":{"tcp":true}}"#,
                r#"invalid field "options.tcp": expected one of "close""#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","options":[]}"#,
                r#"invalid field "options": expected an object"#,
            ),
            (
                r#"{"action":"migrate","container":"c","target":"b","target":"x"}"#,
                r#"malformed json: duplicate field "target""#,
            ),
        ];
        for (payload, want) in cases {
            let got = reason(payload);
            assert!(
                got.starts_with(want),
                "{payload}\n got: {got}\nwant: {want}..."
            );
        }
    }

    #[test]
    fn envelopes_are_parsed_strictly() {
        let signed =
            |job: &str| serde_json::json!({"job": job, "sig": "c2ln", "key_id": "k1"}).to_string();
        let inner = r#"{"action":"migrate","container":"c","target":"b","node":"node-a","job_id":"job-1","issued_at":10,"expires_at":20}"#;
        let order = parse_order("node-a", "job-1", signed(inner).as_bytes()).unwrap();
        assert_eq!(
            order.request,
            JobRequest::Migrate {
                container: "c".into(),
                target: Target::Node("b".into()),
                options: MigrateOptions::default()
            }
        );
        let (envelope, validity) = order.signed.unwrap();
        assert_eq!(envelope.job, inner);
        assert_eq!(envelope.key_id.as_deref(), Some("k1"));
        assert_eq!(
            validity,
            Validity {
                issued_at: 10,
                expires_at: 20
            }
        );
        // A bare job is still a job; order fields outside an envelope are not.
        let bare = parse_order("node-a", "job-1", br#"{"action":"cancel","job":"j0"}"#).unwrap();
        assert!(bare.signed.is_none());
        let order_reason = |payload: &str| {
            parse_order("node-a", "job-1", payload.as_bytes())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| format!("accepted {payload}"))
        };
        assert_eq!(
            order_reason(r#"{"action":"cancel","job":"j0","issued_at":1}"#),
            r#"unknown field "issued_at""#
        );
        let cases: &[(String, &str)] = &[
            (r#"{"job":"{}"}"#.into(), r#"missing field "sig""#),
            (r#"{"sig":"x"}"#.into(), r#"missing field "job""#),
            (
                r#"{"job":{},"sig":"x"}"#.into(),
                r#"invalid field "job": expected a string"#,
            ),
            (
                r#"{"job":"{}","sig":"x","extra":1}"#.into(),
                r#"unknown field "extra""#,
            ),
            (
                r#"{"job":"{}","sig":"x","key_id":5}"#.into(),
                r#"invalid field "key_id""#,
            ),
            (
                r#"{"job":"{}","sig":"x","job":"{}"}"#.into(),
                r#"malformed json: duplicate field "job""#,
            ),
            (signed("{"), "malformed json: "),
            (signed("[]"), "a job must be a JSON object, got an array"),
            (
                signed(&inner.replace(r#""node":"node-a""#, r#""node":"node-b""#)),
                r#"signed job names node "node-b", but it was published as "node-a""#,
            ),
            (
                signed(&inner.replace(r#""job_id":"job-1""#, r#""job_id":"job-0""#)),
                r#"signed job names job_id "job-0", but it was published as "job-1""#,
            ),
            (
                signed(&inner.replace(r#","issued_at":10"#, "")),
                r#"missing field "issued_at""#,
            ),
            (
                signed(&inner.replace(r#""expires_at":20"#, r#""expires_at":-1"#)),
                r#"invalid field "expires_at": expected Unix seconds"#,
            ),
            (
                signed(&inner.replace(r#""expires_at":20"#, r#""expires_at":"20""#)),
                r#"invalid field "expires_at": expected Unix seconds"#,
            ),
            (
                signed(&inner.replace(r#""target":"b""#, r#""target":"b","x":1"#)),
                r#"unknown field "x""#,
            ),
            (
                signed(&inner.replace(r#""node":"node-a""#, r#""node":"node-a","node":"node-a""#)),
                r#"malformed json: duplicate field "node""#,
            ),
        ];
        for (payload, want) in cases {
            let got = order_reason(payload);
            assert!(
                got.starts_with(want),
                "{payload}\n got: {got}\nwant: {want}..."
            );
        }
        let big = signed(&" ".repeat(MAX_JOB_PAYLOAD));
        assert!(order_reason(&big).starts_with("payload too large"));
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let big = vec![b'{'; MAX_JOB_PAYLOAD + 1];
        assert_eq!(
            parse_job("node-a", "job-1", &big).unwrap_err().to_string(),
            "payload too large: 16385 bytes (max 16384)"
        );
        // Just under the cap, but nested deep enough to overflow a naive parser.
        let deep = "[".repeat(MAX_JOB_PAYLOAD);
        assert!(reason(&deep).starts_with("malformed json: recursion limit exceeded"));
    }

    #[test]
    fn topic_levels_are_validated() {
        assert_eq!(
            parse_job("node-a", "..", br#"{"action":"cancel","job":"x"}"#)
                .unwrap_err()
                .to_string(),
            r#"invalid job id "..": must not be only dots"#
        );
        assert!(parse_job("", "j", b"{}")
            .unwrap_err()
            .to_string()
            .starts_with("invalid node id"));
    }

    #[test]
    fn ids() {
        for ok in ["a", "node-1", "Counter_2.v3", "1234abcd", &"x".repeat(128)] {
            validate_id("node id", ok).unwrap();
        }
        let cases: &[(&str, &str)] = &[
            ("", r#"invalid node id "": must not be empty"#),
            ("a/b", r#"invalid node id "a/b": contains '/'"#),
            ("/a", r#"invalid node id "/a": contains '/'"#),
            ("a+", r#"invalid node id "a+": contains '+'"#),
            ("a#", r##"invalid node id "a#": contains '#'"##),
            ("a\0", r#"invalid node id "a\u{0}": contains NUL"#),
            ("a b", r#"invalid node id "a b": contains whitespace"#),
            ("a\nb", r#"invalid node id "a\u{a}b": contains whitespace"#),
            (
                "a\u{1b}",
                r#"invalid node id "a\u{1b}": contains a control character"#,
            ),
            ("é", r#"invalid node id "\u{e9}": contains '\u{e9}'"#),
            ("a:b", r#"invalid node id "a:b": contains ':'"#),
            ("..", r#"invalid node id "..": must not be only dots"#),
        ];
        for (id, want) in cases {
            let got = validate_id("node id", id).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "{id:?}\n got: {got}\nwant: {want}..."
            );
        }
        let long = "y".repeat(5000);
        let got = validate_id("container", &long).unwrap_err().to_string();
        assert!(
            got.contains("longer than 128 characters (5000 bytes)"),
            "{got}"
        );
        assert!(got.len() < 200, "a long value must be truncated: {got}");
    }

    #[test]
    fn quoting_escapes_and_truncates() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quoted("\u{202e}x"), r#""\u{202e}x""#);
        assert_eq!(
            quoted(&"z".repeat(100)),
            format!("\"{}\"... (100 bytes)", "z".repeat(64))
        );
    }

    #[test]
    fn topics_round_trip() {
        let t = Topics::default();
        assert_eq!(t.root(), "ferry/v1");
        assert_eq!(t.node_status("a"), "ferry/v1/a/status");
        assert_eq!(t.job("a", "j"), "ferry/v1/a/jobs/j");
        assert_eq!(t.job_accepted("a", "j"), "ferry/v1/a/jobs/j/accepted");
        assert_eq!(t.job_rejected("a", "j"), "ferry/v1/a/jobs/j/rejected");
        assert_eq!(t.job_status("a", "j"), "ferry/v1/a/jobs/j/status");
        assert_eq!(t.jobs_of("a"), "ferry/v1/a/jobs/+");
        assert_eq!(t.all_node_status(), "ferry/v1/+/status");
        assert_eq!(t.all_job_status(), "ferry/v1/+/jobs/+/status");

        let (n, j) = (String::from("a"), String::from("j"));
        let pairs = [
            (
                t.node_status("a"),
                TopicKind::NodeStatus { node: n.clone() },
            ),
            (
                t.job("a", "j"),
                TopicKind::Job {
                    node: n.clone(),
                    job_id: j.clone(),
                },
            ),
            (
                t.job_accepted("a", "j"),
                TopicKind::JobAccepted {
                    node: n.clone(),
                    job_id: j.clone(),
                },
            ),
            (
                t.job_rejected("a", "j"),
                TopicKind::JobRejected {
                    node: n.clone(),
                    job_id: j.clone(),
                },
            ),
            (
                t.job_status("a", "j"),
                TopicKind::JobStatus { node: n, job_id: j },
            ),
        ];
        for (topic, kind) in pairs {
            assert_eq!(t.parse(&topic), Some(kind), "{topic}");
        }
        // A node may be called "jobs": shapes differ by length.
        assert_eq!(
            t.parse("ferry/v1/jobs/status"),
            Some(TopicKind::NodeStatus {
                node: "jobs".into()
            })
        );
        for other in [
            "ferry/v1",
            "ferry/v1/",
            "ferry/v1/a",
            "ferry/v1x/a/status",
            "ferry/v2/a/status",
            "ferry/v1/a/jobs",
            "ferry/v1//status",
            "ferry/v1/a/jobs//status",
            "ferry/v1/a/jobs/j/other",
            "ferry/v1/a/jobs/j/status/x",
            "other/ferry/v1/a/status",
        ] {
            assert_eq!(t.parse(other), None, "{other}");
        }

        let custom = Topics::new("site-7/ferry").unwrap();
        assert_eq!(custom.job("a", "j"), "site-7/ferry/a/jobs/j");
        assert_eq!(
            custom.parse("site-7/ferry/a/jobs/j"),
            Some(TopicKind::Job {
                node: "a".into(),
                job_id: "j".into()
            })
        );
        assert_eq!(t.parse("site-7/ferry/a/jobs/j"), None);
    }

    #[test]
    fn topic_roots() {
        for bad in [
            "",
            "/ferry",
            "ferry/",
            "ferry//v1",
            "ferry/+",
            "ferry/#",
            "$SYS/x",
            "a b",
        ] {
            let err = Topics::new(bad).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid topic root {}", quoted(bad))),
                "{err}"
            );
        }
    }

    #[test]
    fn job_status_json() {
        let mut s = JobStatus::new(
            "j1",
            "node-a",
            Role::Source,
            "counter",
            "node-a",
            "node-b",
            1_700_000_000_000,
        );
        s.state = JobState::InProgress;
        s.phase = Some(Phase::Transfer);
        s.bytes_raw = 100;
        s.bytes_wire = 40;
        s.timings_ms.insert(Phase::Checkpoint, 120);
        s.timings_ms.insert(Phase::Precheck, 8);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "in_progress");
        assert_eq!(v["phase"], "transfer");
        assert_eq!(v["role"], "source");
        assert_eq!(
            v["timings_ms"],
            serde_json::json!({"precheck": 8, "checkpoint": 120})
        );
        assert_eq!(v["error"], Value::Null);
        let back: JobStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);

        let mut done = s.clone();
        done.state = JobState::RolledBack;
        done.error = Some("restore failed on node-b".into());
        let v = serde_json::to_value(&done).unwrap();
        assert_eq!(v["state"], "rolled_back");
        assert_eq!(serde_json::from_value::<JobStatus>(v).unwrap(), done);
    }

    #[test]
    fn final_states() {
        use JobState::*;
        let finals: Vec<JobState> = [Queued, InProgress, Succeeded, Failed, RolledBack, Canceled]
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(finals, [Succeeded, Failed, RolledBack, Canceled]);
    }

    #[test]
    fn node_status_and_will() {
        let will: NodeStatus = serde_json::from_slice(&NodeStatus::offline_will()).unwrap();
        assert_eq!(will, NodeStatus::default());
        assert!(!will.online);
        assert_eq!(
            serde_json::from_slice::<Value>(&NodeStatus::offline_will()).unwrap(),
            serde_json::json!({"online": false})
        );

        let up = NodeStatus {
            online: true,
            version: "0.1.0".into(),
            arch: "aarch64".into(),
            page_size: 4096,
            criu: Some("4.1".into()),
            criu_error: None,
            kernel: Some("6.12.34+rpt-rpi-v8".into()),
            docker: Some("28.0.1".into()),
            data_addr: Some("10.0.0.2:7070".into()),
            free_mem: 1 << 30,
            free_disk: 8 << 30,
            jobs: 1,
            updated_ms: 5,
        };
        let v = serde_json::to_value(&up).unwrap();
        for key in [
            "online",
            "version",
            "arch",
            "page_size",
            "criu",
            "kernel",
            "docker",
            "data_addr",
            "free_mem",
            "free_disk",
            "jobs",
        ] {
            assert!(v.get(key).is_some(), "node status lacks {key}");
        }
        assert_eq!(serde_json::from_value::<NodeStatus>(v).unwrap(), up);
    }

    #[test]
    fn replies_json() {
        let r = Rejected {
            job_id: "j".into(),
            node: "a".into(),
            reason: r#"missing field "target""#.into(),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"job_id": "j", "node": "a", "reason": "missing field \"target\""})
        );
        assert_eq!(serde_json::from_value::<Rejected>(v).unwrap(), r);
        let a = Accepted {
            job_id: "j".into(),
            node: "a".into(),
            target: None,
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::json!({"job_id": "j", "node": "a"})
        );
    }
}
