//! The fleet manager's side of the `ferry` binary: publish a job and follow
//! it, list nodes, watch job statuses. Everything goes through the broker,
//! exactly as any other fleet manager would (see the README's contract).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::mqtt::contract::{
    Accepted, EvacuationStatus, JobState, JobStatus, NodeStatus, Rejected, Role, Selector, Target,
    TopicKind, Topics, AUTO,
};
use crate::mqtt::{self, BrokerUrl, ClientSettings, Inbound, MqttHandle};

/// How long `migrate` waits for the source agent's accepted/rejected reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Retained statuses arrive right after subscribing; this much quiet ends the list.
const RETAINED_QUIET: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("broker: {0}")]
    Broker(String),
    #[error("job {job} rejected by {node}: {reason}")]
    Rejected {
        job: String,
        node: String,
        reason: String,
    },
    #[error("no reply from {node} within {secs} s: is its agent online?")]
    NoReply { node: String, secs: u64 },
    #[error("job {job} ended {state}{}", .error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unsuccessful {
        job: String,
        state: String,
        error: Option<String>,
    },
}

/// How the manager reaches the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL: mqtt://host[:port] or mqtts://host[:port].
    #[arg(long, env = "FERRY_MQTT", default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt: String,
    #[arg(long, env = "FERRY_TOPIC_ROOT", default_value = crate::mqtt::contract::DEFAULT_TOPIC_ROOT)]
    pub topic_root: String,
    /// Fleet CA, and the manager's certificate and key (PEM), for mqtts://.
    #[arg(long, env = "FERRY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[arg(long, env = "FERRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "FERRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

fn topics(root: &str) -> Result<Topics, CliError> {
    Topics::new(root).map_err(|e| CliError::Invalid {
        field: "topic_root",
        message: e.to_string(),
    })
}

struct Session {
    topics: Topics,
    handle: MqttHandle,
    inbound: tokio::sync::mpsc::Receiver<Inbound>,
    stop: CancellationToken,
}

impl Session {
    async fn open(args: &BrokerArgs, subscriptions: Vec<String>) -> Result<Self, CliError> {
        let url = BrokerUrl::parse(&args.mqtt).map_err(|e| CliError::Invalid {
            field: "mqtt",
            message: e.to_string(),
        })?;
        let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(
                crate::stream::tls::client_config(&crate::stream::tls::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .map_err(|e| CliError::Invalid {
                    field: "tls",
                    message: e.to_string(),
                })?,
            ),
            (None, None, None) if !url.is_tls() => None,
            _ => {
                return Err(CliError::Invalid {
                    field: "tls",
                    message: "mqtts:// needs --tls-ca, --tls-cert and --tls-key".into(),
                })
            }
        };
        let settings = ClientSettings {
            url,
            client_id: format!(
                "ferry-cli-{}-{}",
                std::process::id(),
                crate::migration::now_ms()
            ),
            clean_session: true,
            keep_alive: Duration::from_secs(30),
            tls,
            last_will: None,
            subscriptions,
            manual_acks: false,
        };
        let stop = CancellationToken::new();
        let (handle, mut inbound, _task) =
            mqtt::spawn(settings, stop.clone()).map_err(|e| CliError::Broker(e.to_string()))?;
        // Wait for the first connection so publishes are not lost in a queue
        // that never drains.
        let connected = tokio::time::timeout(REPLY_TIMEOUT, async {
            loop {
                match inbound.recv().await {
                    Some(Inbound::Connected { .. }) => return Ok(()),
                    Some(Inbound::Disconnected { error, .. }) => return Err(error),
                    Some(_) => continue,
                    None => return Err("connection task ended".to_string()),
                }
            }
        })
        .await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(CliError::Broker(format!(
                    "cannot connect to {}: {e}",
                    args.mqtt
                )))
            }
            Err(_) => return Err(CliError::Broker(format!("no answer from {}", args.mqtt))),
        }
        Ok(Self {
            topics: topics(&args.topic_root)?,
            handle,
            inbound,
            stop,
        })
    }

    async fn next_message(&mut self) -> Option<(String, Vec<u8>)> {
        loop {
            match self.inbound.recv().await? {
                Inbound::Message { topic, payload, .. } => return Some((topic, payload.to_vec())),
                _ => continue,
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Container name or id on the source node.
    pub container: String,
    #[arg(long)]
    pub from: String,
    /// The target node, `auto` (the source picks one) or a comma-separated list of candidates.
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub options: JobOptionArgs,
    /// `present`: the container's bind mounts exist on the target as on
    /// the source (default `refuse`: a container with bind mounts stays).
    #[arg(long, value_parser = ["refuse", "present"])]
    pub bind_mounts: Option<String>,
    /// Job id (default: generated).
    #[arg(long)]
    pub job_id: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub signing: SignArgs,
}

/// How the manager signs the jobs it publishes.
#[derive(Debug, Clone, clap::Args)]
pub struct SignArgs {
    /// The manager's order signing key (order.key from ferry certs). Without it the job goes out unsigned, which only agents without an order key accept.
    #[arg(long, env = "FERRY_ORDER_KEY")]
    pub order_key: Option<PathBuf>,
    /// Seconds the signed job stays valid (at most a day).
    #[arg(long, default_value_t = crate::order::DEFAULT_TTL.as_secs())]
    pub order_ttl: u64,
}

/// Signs the manager's jobs (or, without a key, leaves them bare): what
/// every command that publishes a job uses.
#[derive(Debug)]
pub struct JobSigner {
    key: Option<crate::order::ManagerKey>,
    ttl: Duration,
}

impl JobSigner {
    pub fn new(args: &SignArgs) -> Result<Self, CliError> {
        let ttl = Duration::from_secs(args.order_ttl);
        if ttl.is_zero() || ttl > crate::order::MAX_LIFETIME {
            return Err(CliError::Invalid {
                field: "--order-ttl",
                message: format!(
                    "{} s: must be 1 to {} s",
                    args.order_ttl,
                    crate::order::MAX_LIFETIME.as_secs()
                ),
            });
        }
        let key = args
            .order_key
            .as_deref()
            .map(crate::order::ManagerKey::load)
            .transpose()
            .map_err(|e| CliError::Invalid {
                field: "--order-key",
                message: e.to_string(),
            })?;
        Ok(JobSigner { key, ttl })
    }

    pub fn is_signing(&self) -> bool {
        self.key.is_some()
    }

    /// The payload to publish on `{root}/{node}/jobs/{job_id}`: the job in
    /// a signed envelope issued now, or the bare job without a key.
    pub fn payload(
        &self,
        job: &serde_json::Value,
        node: &str,
        job_id: &str,
    ) -> Result<serde_json::Value, CliError> {
        let Some(key) = &self.key else {
            return Ok(job.clone());
        };
        let invalid = |message: String| CliError::Invalid {
            field: "job",
            message,
        };
        let serde_json::Value::Object(obj) = job else {
            return Err(invalid("a job must be a JSON object".into()));
        };
        let envelope = key
            .sign(obj, node, job_id, crate::order::unix_now(), self.ttl)
            .map_err(|e| invalid(e.to_string()))?;
        serde_json::to_value(envelope).map_err(|e| invalid(e.to_string()))
    }
}

/// `ferry sign`: the envelope of the job JSON `job` for `node` as
/// `job_id`, as one line of JSON.
pub fn sign(signing: &SignArgs, node: &str, job_id: &str, job: &str) -> Result<String, CliError> {
    let signer = JobSigner::new(signing)?;
    if !signer.is_signing() {
        return Err(CliError::Invalid {
            field: "--order-key",
            message: "ferry sign needs the manager's order key".into(),
        });
    }
    for (field, v) in [("--node", node), ("--job-id", job_id)] {
        crate::mqtt::contract::validate_id(field, v).map_err(|e| CliError::Invalid {
            field: "arguments",
            message: e.to_string(),
        })?;
    }
    let job: serde_json::Value = serde_json::from_str(job).map_err(|e| CliError::Invalid {
        field: "job",
        message: format!("standard input is not JSON: {e}"),
    })?;
    Ok(signer.payload(&job, node, job_id)?.to_string())
}

/// `--to`: a node, `auto`, or `a,b,c` (candidates).
pub fn parse_to(s: &str) -> Result<Target, CliError> {
    let invalid = |e: crate::mqtt::contract::ContractError| CliError::Invalid {
        field: "--to",
        message: e.to_string(),
    };
    if s == AUTO {
        return Ok(Target::Auto);
    }
    let list: Vec<String> = s.split(',').map(str::to_owned).collect();
    for n in &list {
        crate::mqtt::contract::validate_id("node", n).map_err(invalid)?;
    }
    Ok(match <[String; 1]>::try_from(list) {
        Ok([one]) => Target::Node(one),
        Err(list) => Target::Among(list),
    })
}

/// The options a job carries, from the command line (`migrate`, and each
/// container of an `evacuate`).
#[derive(Debug, Clone, clap::Args)]
pub struct JobOptionArgs {
    /// Wire rate limit, e.g. 10MiB/s or bytes per second.
    #[arg(long)]
    pub rate_limit: Option<String>,
    #[arg(long, default_value_t = crate::mqtt::contract::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Established TCP connections: close (peers reconnect), established (kept) or refuse.
    #[arg(long, value_parser = parse_tcp)]
    pub tcp: Option<crate::runtime::TcpMode>,
    /// `auto` (default): pre-copy memory while the container runs; `off`:
    /// stop and copy.
    #[arg(long, value_parser = ["auto", "off"])]
    pub precopy: Option<String>,
}

impl JobOptionArgs {
    /// The job's `options` object; `bind_mounts` only where the command
    /// has it.
    fn to_json(&self, bind_mounts: Option<&String>) -> serde_json::Value {
        let mut options = serde_json::json!({ "zstd_level": self.zstd_level });
        if let Some(tcp) = self.tcp {
            options["tcp"] = tcp.as_str().into();
        }
        if let Some(rate) = &self.rate_limit {
            options["rate_limit"] = serde_json::Value::String(rate.clone());
        }
        if let Some(b) = bind_mounts {
            options["bind_mounts"] = serde_json::Value::String(b.clone());
        }
        if let Some(p) = &self.precopy {
            options["precopy"] = serde_json::Value::String(p.clone());
        }
        options
    }
}

fn parse_tcp(s: &str) -> Result<crate::runtime::TcpMode, String> {
    s.parse()
        .map_err(|()| format!("{s:?} is not close, established or refuse"))
}

/// Publishes a migrate job and follows it to its final state. Returns the
/// source's final status; an error unless it `succeeded`.
pub async fn migrate(args: MigrateArgs) -> Result<JobStatus, CliError> {
    let job_id = args
        .job_id
        .clone()
        .unwrap_or_else(|| format!("m{}-{}", crate::migration::now_ms(), std::process::id()));
    let target = parse_to(&args.to)?;
    for (field, v) in [
        ("job id", &job_id),
        ("--from", &args.from),
        ("container", &args.container),
    ] {
        crate::mqtt::contract::validate_id(field, v).map_err(|e| CliError::Invalid {
            field: "arguments",
            message: e.to_string(),
        })?;
    }
    let signer = JobSigner::new(&args.signing)?;
    let topics = topics(&args.broker.topic_root)?;
    let job_topic = topics.job(&args.from, &job_id);
    let subscriptions = vec![
        topics.job_accepted(&args.from, &job_id),
        topics.job_rejected(&args.from, &job_id),
        topics.job_status(&args.from, &job_id),
    ];
    let mut session = Session::open(&args.broker, subscriptions).await?;
    let options = args.options.to_json(args.bind_mounts.as_ref());
    let job = serde_json::json!({
        "action": "migrate",
        "container": args.container,
        "target": target,
        "options": options,
    });
    let payload = signer.payload(&job, &args.from, &job_id)?;
    if !signer.is_signing() {
        eprintln!(
            "no --order-key: job {job_id} goes out unsigned; agents with an order key reject it"
        );
    }
    session
        .handle
        .publish_json(&job_topic, &payload, false)
        .await
        .map_err(|e| CliError::Broker(e.to_string()))?;
    eprintln!(
        "job {job_id}: migrate {} from {} to {}",
        args.container, args.from, args.to
    );

    let bar = progress_bar();
    let mut accepted = false;
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let next = if accepted {
            session.next_message().await
        } else {
            match tokio::time::timeout_at(deadline, session.next_message()).await {
                Ok(m) => m,
                Err(_) => {
                    bar.abandon();
                    return Err(CliError::NoReply {
                        node: args.from.clone(),
                        secs: REPLY_TIMEOUT.as_secs(),
                    });
                }
            }
        };
        let Some((topic, payload)) = next else {
            return Err(CliError::Broker("connection ended".into()));
        };
        match session.topics.parse(&topic) {
            Some(TopicKind::JobAccepted { .. }) => {
                accepted = true;
                if let Ok(Accepted {
                    target: Some(to), ..
                }) = serde_json::from_slice(&payload)
                {
                    if target != Target::Node(to.clone()) {
                        bar.suspend(|| eprintln!("job {job_id}: placed on {to}"));
                    }
                }
            }
            Some(TopicKind::JobRejected { node, .. }) => {
                bar.abandon();
                let reason = serde_json::from_slice::<Rejected>(&payload)
                    .map(|r| r.reason)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&payload).into_owned());
                return Err(CliError::Rejected {
                    job: job_id,
                    node,
                    reason,
                });
            }
            Some(TopicKind::JobStatus { .. }) => {
                let Ok(status) = serde_json::from_slice::<JobStatus>(&payload) else {
                    continue;
                };
                accepted = true;
                show_progress(&bar, &status);
                if status.state.is_final() {
                    bar.finish_and_clear();
                    print_summary(&status);
                    if status.state == JobState::Succeeded {
                        return Ok(status);
                    }
                    return Err(CliError::Unsuccessful {
                        job: job_id,
                        state: state_name(status.state),
                        error: status.error,
                    });
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct EvacuateArgs {
    /// The node to empty.
    pub node: String,
    /// Move the running containers with this label.
    #[arg(long, default_value = "ferry.migrate=true")]
    pub label: String,
    /// Where to: `auto` (the node picks for each container) or a comma-separated list of candidates.
    #[arg(long, default_value = AUTO)]
    pub to: String,
    /// The options of each container's migration.
    #[command(flatten)]
    pub options: JobOptionArgs,
    /// Job id of the evacuation (default: generated); its containers' jobs are ID.1, ID.2, ...
    #[arg(long)]
    pub job_id: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub signing: SignArgs,
}

/// Publishes an evacuate job and follows it, one progress line per
/// container, until it ends. Returns its final status; an error unless it
/// `succeeded`.
pub async fn evacuate(args: EvacuateArgs) -> Result<EvacuationStatus, CliError> {
    let job_id = args
        .job_id
        .clone()
        .unwrap_or_else(|| format!("e{}-{}", crate::migration::now_ms(), std::process::id()));
    for (field, v) in [("job id", &job_id), ("node", &args.node)] {
        crate::mqtt::contract::validate_id(field, v).map_err(|e| CliError::Invalid {
            field: "arguments",
            message: e.to_string(),
        })?;
    }
    let selector = Selector::parse_label(&args.label).map_err(|e| CliError::Invalid {
        field: "--label",
        message: e.to_string(),
    })?;
    let targets = parse_to(&args.to)?;
    let signer = JobSigner::new(&args.signing)?;
    let topics = topics(&args.broker.topic_root)?;
    let subscriptions = vec![
        topics.job_accepted(&args.node, &job_id),
        topics.job_rejected(&args.node, &job_id),
        topics.job_status(&args.node, "+"),
    ];
    let mut session = Session::open(&args.broker, subscriptions).await?;
    let job = serde_json::json!({
        "action": "evacuate",
        "selector": selector,
        "targets": targets,
        "options": args.options.to_json(None),
    });
    let payload = signer.payload(&job, &args.node, &job_id)?;
    if !signer.is_signing() {
        eprintln!(
            "no --order-key: job {job_id} goes out unsigned; agents with an order key reject it"
        );
    }
    session
        .handle
        .publish_json(&topics.job(&args.node, &job_id), &payload, false)
        .await
        .map_err(|e| CliError::Broker(e.to_string()))?;
    eprintln!(
        "job {job_id}: evacuate {} (containers labelled {}) to {}",
        args.node,
        selector.label(),
        targets
    );

    let terminal = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let mut lines = EvacuationLines::default();
    let child_prefix = format!("{job_id}.");
    let mut accepted = false;
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let next = if accepted {
            session.next_message().await
        } else {
            match tokio::time::timeout_at(deadline, session.next_message()).await {
                Ok(m) => m,
                Err(_) => {
                    return Err(CliError::NoReply {
                        node: args.node.clone(),
                        secs: REPLY_TIMEOUT.as_secs(),
                    })
                }
            }
        };
        let Some((topic, payload)) = next else {
            return Err(CliError::Broker("connection ended".into()));
        };
        match session.topics.parse(&topic) {
            Some(TopicKind::JobAccepted { .. }) => accepted = true,
            Some(TopicKind::JobRejected { node, .. }) => {
                let reason = serde_json::from_slice::<Rejected>(&payload)
                    .map(|r| r.reason)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&payload).into_owned());
                return Err(CliError::Rejected {
                    job: job_id,
                    node,
                    reason,
                });
            }
            Some(TopicKind::JobStatus { job_id: id, .. }) if id == job_id => {
                let Ok(status) = serde_json::from_slice::<EvacuationStatus>(&payload) else {
                    continue;
                };
                accepted = true;
                lines.evacuation(&multi, &status, terminal);
                if status.state.is_final() {
                    lines.finish();
                    for c in &status.children {
                        println!(
                            "{} {}: {}{}{}",
                            c.job_id,
                            c.container,
                            c.state.as_str(),
                            match (&c.target, c.state) {
                                (Some(t), JobState::Succeeded) => format!(" on {t}"),
                                (Some(t), _) => format!(" (target {t})"),
                                (None, _) => String::new(),
                            },
                            c.error
                                .as_ref()
                                .map(|e| format!("; error: {e}"))
                                .unwrap_or_default()
                        );
                    }
                    println!("job {job_id} {}", status.state.as_str());
                    if status.state == JobState::Succeeded {
                        return Ok(status);
                    }
                    return Err(CliError::Unsuccessful {
                        job: job_id,
                        state: status.state.as_str().into(),
                        error: status.error,
                    });
                }
            }
            Some(TopicKind::JobStatus { job_id: id, .. }) if id.starts_with(&child_prefix) => {
                if let Ok(status) = serde_json::from_slice::<JobStatus>(&payload) {
                    accepted = true;
                    lines.child(&multi, &status, terminal);
                }
            }
            _ => {}
        }
    }
}

/// One progress line per container of an evacuation, by child job id; off
/// a terminal, one printed line per change of state or phase.
#[derive(Default)]
struct EvacuationLines {
    bars: BTreeMap<String, ProgressBar>,
    /// What was last printed for each child off a terminal.
    printed: BTreeMap<String, String>,
}

impl EvacuationLines {
    fn bar(&mut self, multi: &MultiProgress, job: &str, container: &str) -> &ProgressBar {
        self.bars.entry(job.to_owned()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg:40} [{bar:20}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(container.to_owned());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        })
    }

    fn evacuation(&mut self, multi: &MultiProgress, s: &EvacuationStatus, terminal: bool) {
        for c in &s.children {
            let line = format!(
                "{} -> {} {}",
                c.container,
                c.target.as_deref().unwrap_or("?"),
                c.state.as_str()
            );
            let bar = self.bar(multi, &c.job_id, &c.container);
            if c.state.is_final() {
                bar.set_message(line.clone());
                bar.abandon();
            } else if bar.message().is_empty() {
                bar.set_message(line.clone());
            }
            self.print(&c.job_id, line, terminal);
        }
    }

    fn child(&mut self, multi: &MultiProgress, s: &JobStatus, terminal: bool) {
        let line = format!(
            "{} -> {} {} {}",
            s.container,
            s.target,
            s.state.as_str(),
            s.phase.map(state_name).unwrap_or_default()
        );
        let bar = self.bar(multi, &s.job_id, &s.container);
        if !bar.is_finished() {
            bar.set_message(line.clone());
            bar.set_length(s.bytes_raw.max(s.bytes_wire));
            bar.set_position(s.bytes_wire);
        }
        self.print(&s.job_id, line, terminal);
    }

    fn print(&mut self, job: &str, line: String, terminal: bool) {
        if terminal || self.printed.get(job) == Some(&line) {
            return;
        }
        eprintln!("{job} {line}");
        self.printed.insert(job.to_owned(), line);
    }

    fn finish(&self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

fn state_name<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn progress_bar() -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:14} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show_progress(bar: &ProgressBar, s: &JobStatus) {
    let phase = s.phase.map(state_name).unwrap_or_default();
    if bar.is_hidden() {
        eprintln!("{} {} {}", state_name(s.state), phase, volumes(s));
    }
    bar.set_message(phase);
    // The wire total is unknown until the end; the raw size is the closest
    // estimate of progress that both sides report.
    bar.set_length(s.bytes_raw.max(s.bytes_wire));
    bar.set_position(s.bytes_wire);
}

fn print_summary(s: &JobStatus) {
    let timings: Vec<String> = s
        .timings_ms
        .iter()
        .map(|(p, ms)| format!("{} {ms} ms", state_name(*p)))
        .collect();
    println!(
        "job {} {}: {}; {}{}",
        s.job_id,
        state_name(s.state),
        volumes(s),
        timings.join(", "),
        s.error
            .as_ref()
            .map(|e| format!("; error: {e}"))
            .unwrap_or_default()
    );
}

/// Lists every node's retained status.
pub async fn nodes(broker: BrokerArgs) -> Result<BTreeMap<String, NodeStatus>, CliError> {
    let topics = topics(&broker.topic_root)?;
    let mut session = Session::open(&broker, vec![topics.all_node_status()]).await?;
    let mut nodes = BTreeMap::new();
    while let Ok(Some((topic, payload))) =
        tokio::time::timeout(RETAINED_QUIET, session.next_message()).await
    {
        if let Some(TopicKind::NodeStatus { node }) = session.topics.parse(&topic) {
            if let Ok(s) = serde_json::from_slice::<NodeStatus>(&payload) {
                nodes.insert(node, s);
            }
        }
    }
    println!(
        "{:<16} {:<7} {:<8} {:>5} {:<8} {:<16} {:<22} {:>11} {:>11} {:>4}",
        "NODE", "ONLINE", "ARCH", "PAGE", "CRIU", "DOCKER", "DATA", "FREE MEM", "FREE DISK", "JOBS"
    );
    for (name, s) in &nodes {
        println!(
            "{:<16} {:<7} {:<8} {:>5} {:<8} {:<16} {:<22} {:>11} {:>11} {:>4}",
            name,
            if s.online { "yes" } else { "no" },
            s.arch,
            s.page_size,
            s.criu.as_deref().unwrap_or("-"),
            s.docker.as_deref().unwrap_or("-"),
            s.data_addr.as_deref().unwrap_or("-"),
            HumanBytes(s.free_mem).to_string(),
            HumanBytes(s.free_disk).to_string(),
            s.jobs
        );
    }
    Ok(nodes)
}

/// A job's byte counts for people, in the binary units of `--rate-limit`.
fn volumes(s: &JobStatus) -> String {
    format!(
        "raw={} wire={} rate={}/s",
        HumanBytes(s.bytes_raw),
        HumanBytes(s.bytes_wire),
        HumanBytes(s.rate_bps)
    )
}

/// Prints job statuses as they change; with a job id, stops at its final
/// state on the source.
pub async fn watch(broker: BrokerArgs, job: Option<String>) -> Result<(), CliError> {
    let topics = topics(&broker.topic_root)?;
    let mut session = Session::open(&broker, vec![topics.all_job_status()]).await?;
    while let Some((topic, payload)) = session.next_message().await {
        let Some(TopicKind::JobStatus { node, job_id }) = session.topics.parse(&topic) else {
            continue;
        };
        if job.as_ref().is_some_and(|j| j != &job_id) {
            continue;
        }
        let s = match serde_json::from_slice::<JobStatus>(&payload) {
            Ok(s) => s,
            Err(_) => {
                let Ok(e) = serde_json::from_slice::<EvacuationStatus>(&payload) else {
                    continue;
                };
                println!("{job_id} @{node} {}", evacuation_line(&e));
                if job.is_some() && e.state.is_final() {
                    break;
                }
                continue;
            }
        };
        println!(
            "{job_id} @{node} ({}) {} {} {}{}",
            state_name(s.role),
            state_name(s.state),
            s.phase.map(state_name).unwrap_or_default(),
            volumes(&s),
            s.error
                .as_ref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        );
        if job.is_some() && s.role == Role::Source && s.state.is_final() {
            break;
        }
    }
    Ok(())
}

/// An evacuation's status for `watch`: its state and how many of its
/// containers ended where.
fn evacuation_line(e: &EvacuationStatus) -> String {
    let count = |state: JobState| e.children.iter().filter(|c| c.state == state).count();
    format!(
        "(evacuate {}) {}: {} container(s), {} moved, {} running, {} queued{}",
        e.selector,
        e.state.as_str(),
        e.children.len(),
        count(JobState::Succeeded),
        count(JobState::InProgress),
        count(JobState::Queued),
        e.error
            .as_ref()
            .map(|x| format!(" error: {x}"))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_sums_up_an_evacuation() {
        let child = |state| crate::mqtt::contract::EvacuationChild {
            job_id: "e.1".into(),
            container: "c".into(),
            target: None,
            state,
            error: None,
        };
        let e = EvacuationStatus {
            job_id: "e".into(),
            node: "a".into(),
            action: "evacuate".into(),
            selector: "ferry.migrate=true".into(),
            state: JobState::InProgress,
            children: vec![
                child(JobState::Succeeded),
                child(JobState::InProgress),
                child(JobState::Queued),
            ],
            error: None,
            updated_ms: 0,
        };
        assert_eq!(
            evacuation_line(&e),
            "(evacuate ferry.migrate=true) in_progress: 3 container(s), 1 moved, 1 running, 1 queued"
        );
        // A migration's status does not read as an evacuation's.
        let m = JobStatus::new("j", "a", Role::Source, "c", "a", "b", 0);
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(serde_json::from_slice::<EvacuationStatus>(&bytes).is_err());
        let bytes = serde_json::to_vec(&e).unwrap();
        assert!(serde_json::from_slice::<JobStatus>(&bytes).is_err());
    }

    #[test]
    fn to_is_a_node_auto_or_a_list() {
        assert_eq!(parse_to("auto").unwrap(), Target::Auto);
        assert_eq!(parse_to("b").unwrap(), Target::Node("b".into()));
        assert_eq!(
            parse_to("b,c").unwrap(),
            Target::Among(vec!["b".into(), "c".into()])
        );
        let e = parse_to("b,,c").unwrap_err().to_string();
        assert_eq!(e, "invalid --to: invalid node \"\": must not be empty");
    }

    #[test]
    fn sign_prints_an_envelope_the_agent_admits() {
        let dir = crate::stream::testutil::TempDir::new("cli-sign");
        crate::certs::generate(
            dir.path(),
            &crate::certs::FleetSpec {
                nodes: vec!["node1".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let args = SignArgs {
            order_key: Some(dir.join(crate::order::ORDER_KEY_FILE)),
            order_ttl: 60,
        };
        let job = r#"{"action":"cancel","job":"j0"}"#;
        let line = sign(&args, "node1", "j1", job).unwrap();
        assert!(!line.contains('\n'));
        let public = crate::order::OrderKey::load(&dir.join(crate::order::ORDER_PUB_FILE)).unwrap();
        let ledger = crate::mqtt::JobLedger::open(dir.join(crate::order::INCOMING_LEDGER)).unwrap();
        let orders = crate::order::Orders::signed(public, ledger);
        let now = crate::order::unix_now();
        let order = orders.admit("node1", "j1", line.as_bytes(), now).unwrap();
        assert_eq!(
            order.request,
            crate::mqtt::JobRequest::Cancel { job: "j0".into() }
        );
        let (_, validity) = order.signed.unwrap();
        assert_eq!(validity.expires_at - validity.issued_at, 60);
        // Checked before anything is signed.
        for (node, id, job, want) in [
            ("node/1", "j1", job, "invalid --node"),
            ("node1", "j1", "{", "standard input is not JSON"),
            ("node1", "j1", "[1]", "a job must be a JSON object"),
        ] {
            let err = sign(&args, node, id, job).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let err = sign(
            &SignArgs {
                order_ttl: 86_401,
                ..args.clone()
            },
            "node1",
            "j1",
            job,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--order-ttl"), "{err}");
    }

    #[test]
    fn volumes_are_in_binary_units() {
        let mut s = JobStatus::new("j", "a", Role::Source, "c", "a", "b", 0);
        (s.bytes_raw, s.bytes_wire, s.rate_bps) = (3 << 30, 1536 << 10, 10 << 20);
        assert_eq!(volumes(&s), "raw=3.00 GiB wire=1.50 MiB rate=10.00 MiB/s");
        (s.bytes_raw, s.bytes_wire, s.rate_bps) = (0, 512, 0);
        assert_eq!(volumes(&s), "raw=0 B wire=512 B rate=0 B/s");
    }
}
