//! The fleet manager's side of the `ferry` binary: publish a job and follow
//! it, list nodes, watch job statuses. Everything goes through the broker,
//! exactly as any other fleet manager would (see the README's contract).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::mqtt::contract::{JobState, JobStatus, NodeStatus, Rejected, Role, TopicKind, Topics};
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
    #[arg(long)]
    pub to: String,
    /// Wire rate limit, e.g. 10MiB/s or bytes per second.
    #[arg(long)]
    pub rate_limit: Option<String>,
    #[arg(long, default_value_t = crate::mqtt::contract::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Established TCP connections: close (peers reconnect), established (kept) or refuse.
    #[arg(long, value_parser = parse_tcp)]
    pub tcp: Option<crate::runtime::TcpMode>,
    /// `present`: the container's bind mounts exist on the target as on
    /// the source (default `refuse`: a container with bind mounts stays).
    #[arg(long, value_parser = ["refuse", "present"])]
    pub bind_mounts: Option<String>,
    /// `auto` (default): pre-copy memory while the container runs; `off`:
    /// stop and copy.
    #[arg(long, value_parser = ["auto", "off"])]
    pub precopy: Option<String>,
    /// Job id (default: generated).
    #[arg(long)]
    pub job_id: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
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
    for (field, v) in [
        ("job id", &job_id),
        ("--from", &args.from),
        ("--to", &args.to),
        ("container", &args.container),
    ] {
        crate::mqtt::contract::validate_id(field, v).map_err(|e| CliError::Invalid {
            field: "arguments",
            message: e.to_string(),
        })?;
    }
    let topics = topics(&args.broker.topic_root)?;
    let job_topic = topics.job(&args.from, &job_id);
    let subscriptions = vec![
        topics.job_accepted(&args.from, &job_id),
        topics.job_rejected(&args.from, &job_id),
        topics.job_status(&args.from, &job_id),
    ];
    let mut session = Session::open(&args.broker, subscriptions).await?;
    let mut options = serde_json::json!({ "zstd_level": args.zstd_level });
    if let Some(tcp) = args.tcp {
        options["tcp"] = tcp.as_str().into();
    }
    if let Some(rate) = &args.rate_limit {
        options["rate_limit"] = serde_json::Value::String(rate.clone());
    }
    if let Some(b) = &args.bind_mounts {
        options["bind_mounts"] = serde_json::Value::String(b.clone());
    }
    if let Some(p) = &args.precopy {
        options["precopy"] = serde_json::Value::String(p.clone());
    }
    let job = serde_json::json!({
        "action": "migrate",
        "container": args.container,
        "target": args.to,
        "options": options,
    });
    session
        .handle
        .publish_json(&job_topic, &job, false)
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
            Some(TopicKind::JobAccepted { .. }) => accepted = true,
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
        let Ok(s) = serde_json::from_slice::<JobStatus>(&payload) else {
            continue;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_in_binary_units() {
        let mut s = JobStatus::new("j", "a", Role::Source, "c", "a", "b", 0);
        (s.bytes_raw, s.bytes_wire, s.rate_bps) = (3 << 30, 1536 << 10, 10 << 20);
        assert_eq!(volumes(&s), "raw=3.00 GiB wire=1.50 MiB rate=10.00 MiB/s");
        (s.bytes_raw, s.bytes_wire, s.rate_bps) = (0, 512, 0);
        assert_eq!(volumes(&s), "raw=0 B wire=512 B rate=0 B/s");
    }
}
