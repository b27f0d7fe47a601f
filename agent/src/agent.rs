//! `ferry agent`: the service that runs on every device. One task owns the
//! MQTT connection, one the data port; each job runs in its own task, and
//! this loop routes orders between them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::config::AgentConfig;
use crate::migration::source::{self, MigrateJob};
use crate::migration::{now_ms, target, JobHandle, Node};
use crate::mqtt::contract::{
    self, Accepted, JobRequest, NodeStatus, RateSpec, Rejected, TopicKind,
};
use crate::mqtt::JobLedger;
use crate::mqtt::{self, ClientSettings, Inbound};
use crate::runtime::{Docker, Engine};
use crate::stream::ratelimit::parse_rate;

/// Node status is refreshed this often even when nothing happens, so free
/// memory and disk stay current for the fleet manager; otherwise idle.
const STATUS_REFRESH: Duration = Duration::from_secs(60);
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long a job naming a node without a known status waits for it.
const PEER_STATUS_WAIT: Duration = Duration::from_secs(3);
/// After the drain deadline cancels running jobs, how long their rollback
/// may take before the agent exits anyway.
const ROLLBACK_GRACE: Duration = Duration::from_secs(25);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("cannot use work dir {path}: {source}")]
    WorkDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
    #[error("mqtt: {0}")]
    Mqtt(String),
}

/// Runs the agent until `shutdown` fires, then drains: no new jobs, running
/// ones finish or roll back within the configured deadline.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let engine = Docker::connect(&config.docker).await?;
    let engine_info = engine.info().await?;
    let criu = crate::sysinfo::criu_status();
    if let Err(why) = &criu {
        warn!(%why, "CRIU does not work here: this node can neither send nor receive migrations");
    }
    std::fs::create_dir_all(&config.work_dir).map_err(|source| AgentError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    // Nothing runs yet: whatever is staged is left from a crash.
    let staging = config.work_dir.join("staging");
    if staging.exists() {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            warn!(path = %staging.display(), error = %e, "cannot clear stale staging");
        }
    }
    let mut ledger = JobLedger::open(config.work_dir.join("jobs-seen")).map_err(|source| {
        AgentError::WorkDir {
            path: config.work_dir.clone(),
            source,
        }
    })?;
    if config.insecure {
        warn!("--insecure: plain TCP is allowed where no TLS files are given; never use this on a real fleet");
    }
    if let Some(files) = &config.tls {
        crate::stream::tls::check_identity(files, &config.node_id)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
    }
    let (tls_client, tls_server) = match &config.tls {
        Some(files) => (
            Some(
                crate::stream::tls::client_config(files)
                    .map_err(|e| AgentError::Tls(e.to_string()))?,
            ),
            Some(
                crate::stream::tls::server_config(files)
                    .map_err(|e| AgentError::Tls(e.to_string()))?,
            ),
        ),
        None => (None, None),
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;

    let advertise = match config.advertise {
        Some(a) => a,
        None => listener.local_addr().map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?,
    };
    let topics = config.topics.clone();
    let will = (
        topics.node_status(&config.node_id),
        NodeStatus::offline_will(),
        true,
    );
    let mqtt_settings = ClientSettings {
        url: config.mqtt.clone(),
        client_id: config.node_id.clone(),
        // A persistent session: jobs published while the agent was briefly
        // offline are delivered when it comes back.
        clean_session: false,
        keep_alive: KEEP_ALIVE,
        tls: if config.mqtt.is_tls() {
            tls_client.clone()
        } else {
            None
        },
        last_will: Some(will),
        subscriptions: vec![topics.jobs_of(&config.node_id), topics.all_node_status()],
    };
    let mqtt_stop = CancellationToken::new();
    let (mqtt, mut inbound, mqtt_task) = mqtt::spawn(mqtt_settings, mqtt_stop.clone())
        .map_err(|e| AgentError::Mqtt(e.to_string()))?;

    let node = Arc::new(Node {
        id: config.node_id.clone(),
        engine,
        engine_info,
        page_size: crate::sysinfo::page_size(),
        criu,
        work_dir: config.work_dir.clone(),
        topics: topics.clone(),
        mqtt: mqtt.clone(),
        tls_client,
        peers: Mutex::new(HashMap::new()),
        jobs: Mutex::new(HashMap::new()),
    });
    info!(
        node = %node.id,
        arch = %node.engine_info.arch,
        data = %advertise,
        work_dir = %config.work_dir.display(),
        "agent started"
    );

    let tasks = TaskTracker::new();
    let accept_stop = CancellationToken::new();
    tasks.spawn(serve_data_port(
        node.clone(),
        listener,
        tls_server,
        accept_stop.clone(),
        tasks.clone(),
    ));

    let advertise = advertise.to_string();
    let publish_status = |online: bool| {
        let node = node.clone();
        let advertise = advertise.clone();
        async move {
            let status = node_status(&node, online, &advertise);
            let topic = node.topics.node_status(&node.id);
            if let Err(e) = node.mqtt.publish_json(&topic, &status, true).await {
                warn!(error = %e, "cannot publish node status");
            }
        }
    };

    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<String>(16);
    let mut refresh = tokio::time::interval(STATUS_REFRESH);
    refresh.tick().await;
    let mut service = crate::systemd::Service::from_env();
    let mut mqtt_lost = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = service.watchdog_due() => service.watchdog(),
            _ = refresh.tick() => publish_status(true).await,
            Some(job_id) = done_rx.recv() => {
                node.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(&job_id);
                publish_status(true).await;
            }
            msg = inbound.recv() => {
                let Some(msg) = msg else {
                    // Exit non-zero after the drain so systemd restarts us.
                    error!("mqtt task ended");
                    mqtt_lost = true;
                    break;
                };
                match msg {
                    Inbound::Connected { .. } => {
                        info!("connected to the broker");
                        publish_status(true).await;
                        service.ready("connected to the broker");
                    }
                    Inbound::Disconnected { error, retry_in } => {
                        warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "broker connection lost")
                    }
                    Inbound::Message { topic, payload, .. } => {
                        match topics.parse(&topic) {
                            Some(TopicKind::NodeStatus { node: peer }) => {
                                match serde_json::from_slice::<NodeStatus>(&payload) {
                                    Ok(s) => {
                                        node.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, s);
                                    }
                                    Err(e) => warn!(%topic, error = %e, "ignoring unreadable node status"),
                                }
                            }
                            Some(TopicKind::Job { node: to, job_id }) if to == node.id => {
                                handle_job(&node, &mut ledger, &tasks, &done_tx, &job_id, &payload).await;
                                publish_status(true).await;
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    // Drain: refuse new work, let running jobs end (or cancel them at the
    // deadline, which rolls them back), then say we are gone. The broker
    // connection keeps being served so statuses still go out and new jobs
    // get a clear rejection.
    info!(running = node.job_count(), "draining");
    service.stopping("draining");
    accept_stop.cancel();
    tasks.close();
    let soft = tokio::time::sleep(config.drain_timeout);
    let hard = tokio::time::sleep(config.drain_timeout + ROLLBACK_GRACE);
    tokio::pin!(soft, hard);
    let mut canceled = false;
    loop {
        tokio::select! {
            _ = tasks.wait() => break,
            _ = &mut soft, if !canceled => {
                warn!("drain deadline passed; canceling running jobs");
                for handle in node.jobs.lock().unwrap_or_else(|p| p.into_inner()).values() {
                    handle.try_cancel();
                }
                canceled = true;
            }
            _ = &mut hard => {
                error!(running = node.job_count(), "jobs did not end after cancel; exiting anyway");
                break;
            }
            msg = inbound.recv() => match msg {
                Some(Inbound::Message { topic, .. }) => {
                    if let Some(TopicKind::Job { node: to, job_id }) = topics.parse(&topic) {
                        if to == node.id {
                            let reason = format!("node {} is shutting down", node.id);
                            reply(&node, &job_id, Err(reason)).await;
                        }
                    }
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    publish_status(false).await;
    mqtt_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), mqtt_task).await;
    info!("agent stopped");
    if mqtt_lost {
        return Err(AgentError::Mqtt("the broker connection task ended".into()));
    }
    Ok(())
}

fn node_status<E: Engine>(node: &Node<E>, online: bool, advertise: &str) -> NodeStatus {
    NodeStatus {
        online,
        version: env!("CARGO_PKG_VERSION").to_string(),
        arch: node.engine_info.arch.clone(),
        page_size: node.page_size,
        criu: node.criu.as_ref().ok().cloned(),
        docker: Some(node.engine_info.version.clone()),
        data_addr: Some(advertise.to_string()),
        free_mem: crate::sysinfo::mem_available().unwrap_or(0),
        free_disk: crate::sysinfo::free_disk(&node.work_dir).unwrap_or(0),
        jobs: node.job_count() as u32,
        updated_ms: now_ms(),
    }
}

async fn reply<E: Engine>(node: &Node<E>, job_id: &str, result: Result<(), String>) {
    let (topic, payload) = match result {
        Ok(()) => (
            node.topics.job_accepted(&node.id, job_id),
            serde_json::to_value(Accepted {
                job_id: job_id.to_string(),
                node: node.id.clone(),
            }),
        ),
        Err(reason) => {
            warn!(job = %job_id, %reason, "job rejected");
            (
                node.topics.job_rejected(&node.id, job_id),
                serde_json::to_value(Rejected {
                    job_id: job_id.to_string(),
                    node: node.id.clone(),
                    reason,
                }),
            )
        }
    };
    match payload {
        Ok(p) => {
            if let Err(e) = node.mqtt.publish_json(&topic, &p, false).await {
                warn!(%topic, error = %e, "cannot publish job reply");
            }
        }
        Err(e) => warn!(%topic, error = %e, "cannot encode job reply"),
    }
}

async fn handle_job<E: Engine + 'static>(
    node: &Arc<Node<E>>,
    ledger: &mut JobLedger,
    tasks: &TaskTracker,
    done: &tokio::sync::mpsc::Sender<String>,
    job_id: &str,
    payload: &[u8],
) {
    if let Err(e) = contract::validate_id("job id", job_id) {
        // The topic level itself is unusable: no reply topic can be built.
        warn!(error = %e, "ignoring job with an invalid id");
        return;
    }
    match ledger.first_seen(job_id) {
        Ok(true) => {}
        Ok(false) => {
            info!(job = %job_id, "job seen before; not run again");
            return;
        }
        Err(e) => {
            reply(
                node,
                job_id,
                Err(format!("cannot record job id in the work dir: {e}")),
            )
            .await;
            return;
        }
    }
    let request = match contract::parse_job(&node.id, job_id, payload) {
        Ok(r) => r,
        Err(e) => return reply(node, job_id, Err(e.to_string())).await,
    };
    match request {
        JobRequest::Cancel { job } => {
            let handle = node
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&job)
                .cloned();
            let result = match handle {
                None => Err(format!("job {job} is not running on {}", node.id)),
                Some(h) if h.role == contract::Role::Target => Err(format!(
                    "job {job} is the target side on {}: cancel it on its source node",
                    node.id
                )),
                Some(h) if h.try_cancel() => Ok(()),
                Some(_) => Err(format!(
                    "job {job} is past the point of no return: the target confirmed the restore"
                )),
            };
            reply(node, job_id, result).await;
        }
        JobRequest::Migrate {
            container,
            target,
            options,
        } => {
            let rate_limit = match options
                .rate_limit
                .map(|r| match r {
                    RateSpec::Text(t) => parse_rate(&t).map_err(|e| e.to_string()),
                    RateSpec::Bytes(n) => Ok(n),
                })
                .transpose()
            {
                Ok(r) => r,
                Err(e) => {
                    return reply(
                        node,
                        job_id,
                        Err(format!("invalid options.rate_limit: {e}")),
                    )
                    .await
                }
            };
            let handle = JobHandle::new(&container, contract::Role::Source);
            let already = {
                let mut jobs = node.jobs.lock().unwrap_or_else(|p| p.into_inner());
                let already = jobs.values().any(|j| j.container == container);
                if !already {
                    jobs.insert(job_id.to_string(), handle.clone());
                }
                already
            };
            if already {
                let reason = format!("container {container} is already being migrated");
                return reply(node, job_id, Err(reason)).await;
            }
            let job = MigrateJob {
                job_id: job_id.to_string(),
                container: container.clone(),
                target: target.clone(),
                rate_limit,
                zstd_level: options.zstd_level,
            };
            let span = tracing::info_span!("migrate", job = %job_id, %container, peer = %target);
            let node = node.clone();
            let done = done.clone();
            let job_id = job_id.to_string();
            // Its own task: the acceptance check may wait for the target's
            // retained status, which this loop delivers.
            tasks.spawn(
                async move {
                    match quick_check(&node, &job.container, &job.target).await {
                        Some(reason) => reply(&node, &job_id, Err(reason)).await,
                        None => {
                            reply(&node, &job_id, Ok(())).await;
                            source::run(node.clone(), job, handle).await;
                        }
                    }
                    let _ = done.send(job_id).await;
                }
                .instrument(span),
            );
        }
    }
}

/// Reasons to reject a migrate job at once, before it is accepted: the
/// fleet manager learns about a typo without a job ever starting.
async fn quick_check<E: Engine>(node: &Node<E>, container: &str, target: &str) -> Option<String> {
    match node.engine.inspect(container).await {
        Ok(c) if !c.running => {
            return Some(format!(
                "container {container} is not running on {}",
                node.id
            ))
        }
        Ok(_) => {}
        Err(crate::runtime::RuntimeError::NotFound(_)) => {
            return Some(format!("container {container} not found on {}", node.id))
        }
        Err(e) => return Some(format!("cannot inspect container {container}: {e}")),
    }
    // Right after a reconnect, jobs queued in the session arrive before the
    // retained statuses of the other nodes: give those a moment.
    let deadline = tokio::time::Instant::now() + PEER_STATUS_WAIT;
    let peer = loop {
        match node.peer(target) {
            Some(p) => break Some(p),
            None if tokio::time::Instant::now() >= deadline => break None,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    match peer {
        None => Some(format!("target node {target} is unknown (no status seen)")),
        Some(p) if !p.online => Some(format!("target node {target} is offline")),
        Some(_) => None,
    }
}

async fn serve_data_port<E: Engine + 'static>(
    node: Arc<Node<E>>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        crate::stream::tls::MAX_PENDING_HANDSHAKES,
    ));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "data port accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        tcp.set_nodelay(true).ok();
        // Anonymous until the handshake ends: only so many at once.
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            warn!(%addr, "too many data connections in their TLS handshake; closed");
            continue;
        };
        let node = node.clone();
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let Some(acceptor) = acceptor else {
                drop(permit);
                return target::serve(node, tcp, None).await;
            };
            let accepted = tokio::select! {
                r = crate::stream::tls::accept_peer(
                    &acceptor,
                    tcp,
                    crate::stream::tls::HANDSHAKE_TIMEOUT,
                ) => r,
                // Draining: a peer still anonymous gets nothing more.
                _ = stop.cancelled() => return,
            };
            drop(permit);
            match accepted {
                Ok((tls, names)) => {
                    let span = tracing::info_span!("incoming", peer = ?names);
                    target::serve(node, tls, Some(names)).instrument(span).await
                }
                Err(e) => warn!(%addr, error = %e, "data port TLS handshake failed"),
            }
        });
    }
}
