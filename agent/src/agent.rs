//! `ferry agent`: the service that runs on every device. [`run`] is its
//! life in three parts: start-up (engine, work dir, TLS, data port, broker),
//! serve (the main loop: routes MQTT orders to jobs, keeps the node status
//! current, pings the watchdog) and drain (no new work, running jobs end or
//! roll back, then offline). One task owns the MQTT connection, one the data
//! port; each job runs in its own task.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::config::AgentConfig;
use crate::migration::source::{self, MigrateJob};
use crate::migration::{
    check, now_ms, target, JobGuard, JobRegistry, MigrationError, MqttReporter, Node, Peers,
    RegisterError, TcpDialer, Timeouts,
};
use crate::mqtt::contract::{
    self, Accepted, JobRequest, JobState, NodeStatus, RateSpec, Rejected, Role, TopicKind, Topics,
};
use crate::mqtt::{self, Ack, ClientSettings, Inbound, JobLedger, MqttHandle};
use crate::runtime::{Deadlines, Docker, Engine, EngineDeadlines};
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
/// How long the broker connection gets to say goodbye.
const MQTT_GOODBYE: Duration = Duration::from_secs(5);

/// What only the agent itself can fail at; the modules' own errors join
/// these in [`crate::Error`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
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
    #[error("mqtt: the broker connection task ended")]
    BrokerTaskEnded,
}

/// Runs the agent until `shutdown` fires, then drains: no new jobs, running
/// ones finish or roll back within the configured deadline.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), crate::Error> {
    let mut agent = Agent::start(&config).await?;
    let served = agent.serve(&shutdown).await;
    agent.drain(config.drain_timeout).await;
    Ok(served?)
}

/// The engine as the agent drives it: every call with a deadline.
type AgentEngine = Deadlines<Docker>;

/// A running agent: what the main loop and the drain work with.
struct Agent {
    node: Arc<Node<AgentEngine>>,
    replies: Replies,
    inbound: mpsc::Receiver<Inbound>,
    mqtt_stop: CancellationToken,
    mqtt_task: JoinHandle<()>,
    ledger: JobLedger,
    /// Every job task and data connection, waited for by the drain.
    tasks: TaskTracker,
    accept_stop: CancellationToken,
    advertise: String,
    service: crate::systemd::Service,
    /// A job task registered or ended: the job count changed.
    jobs_changed: (mpsc::Sender<()>, mpsc::Receiver<()>),
}

/// The broker connection and the job replies a node publishes.
#[derive(Clone)]
struct Replies {
    node: String,
    mqtt: MqttHandle,
    topics: Topics,
}

impl Agent {
    /// Start-up: everything that can fail does so here, before the broker
    /// hears of this node.
    async fn start(config: &AgentConfig) -> Result<Agent, crate::Error> {
        let engine = Deadlines::new(
            Docker::connect(&config.docker)
                .await?
                .with_checkpoint(config.runc.clone(), config.criu_config.clone()),
            EngineDeadlines::default(),
        );
        let engine_info = engine.info().await?;
        let criu = crate::sysinfo::criu_status();
        if let Err(why) = &criu {
            warn!(%why, "CRIU does not work here: this node can neither send nor receive migrations");
        }
        let ledger = open_work_dir(config)?;
        if config.insecure {
            warn!("--insecure: plain TCP is allowed where no TLS is configured; never use this on a real fleet");
        }
        let (tls_client, tls_server) = match &config.tls {
            Some(files) => {
                crate::stream::tls::check_identity(files, &config.node_id)?;
                (
                    Some(crate::stream::tls::client_config(files)?),
                    Some(crate::stream::tls::server_config(files)?),
                )
            }
            None => (None, None),
        };
        let listen = |source| AgentError::Listen {
            addr: config.listen,
            source,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(listen)?;
        let advertise = match config.advertise {
            Some(a) => a,
            None => listener.local_addr().map_err(listen)?,
        };
        let topics = config.topics.clone();
        let mqtt_stop = CancellationToken::new();
        let (mqtt, inbound, mqtt_task) = mqtt::spawn(
            broker_settings(config, tls_client.clone()),
            mqtt_stop.clone(),
        )?;

        let timeouts = Timeouts::default();
        let node = Arc::new(Node {
            id: config.node_id.clone(),
            engine,
            engine_info,
            page_size: crate::sysinfo::page_size(),
            criu,
            work_dir: config.work_dir.clone(),
            advertise: Some(advertise),
            reporter: Box::new(MqttReporter {
                mqtt: mqtt.clone(),
                topics: topics.clone(),
            }),
            dialer: Box::new(TcpDialer {
                tls: tls_client,
                connect_timeout: timeouts.connect,
            }),
            timeouts,
            peers: Peers::default(),
            jobs: JobRegistry::new(&config.node_id),
        });
        if let (Ok(_), Some(why)) = (&node.criu, node.criu_problem()) {
            warn!(%why, "this node can neither send nor receive migrations");
        }
        info!(
            node = %node.id,
            arch = %node.engine_info.arch,
            kernel = %node.engine_info.kernel,
            criu = ?node.criu,
            data = %advertise,
            work_dir = %config.work_dir.display(),
            state_dir = %config.state_dir.display(),
            "agent started"
        );
        let tasks = TaskTracker::new();
        let accept_stop = CancellationToken::new();
        let jobs_changed = mpsc::channel(16);
        tasks.spawn(serve_data_port(
            node.clone(),
            listener,
            tls_server,
            accept_stop.clone(),
            tasks.clone(),
            jobs_changed.0.clone(),
        ));
        Ok(Agent {
            replies: Replies {
                node: node.id.clone(),
                mqtt,
                topics,
            },
            node,
            inbound,
            mqtt_stop,
            mqtt_task,
            ledger,
            tasks,
            accept_stop,
            advertise: advertise.to_string(),
            service: crate::systemd::Service::from_env(),
            jobs_changed,
        })
    }

    /// The main loop, until `shutdown` fires or the broker task ends.
    async fn serve(&mut self, shutdown: &CancellationToken) -> Result<(), AgentError> {
        let mut refresh = tokio::time::interval(STATUS_REFRESH);
        refresh.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = self.service.watchdog_due() => self.service.watchdog(),
                _ = refresh.tick() => self.publish_status(true),
                Some(()) = self.jobs_changed.1.recv() => self.publish_status(true),
                msg = self.inbound.recv() => match msg {
                    // Exit non-zero after the drain so systemd restarts us.
                    None => {
                        error!("mqtt task ended");
                        return Err(AgentError::BrokerTaskEnded);
                    }
                    Some(msg) => self.on_inbound(msg).await,
                },
            }
        }
    }

    async fn on_inbound(&mut self, msg: Inbound) {
        match msg {
            Inbound::Connected { .. } => {
                info!("connected to the broker");
                self.publish_status(true);
                self.service.ready("connected to the broker");
            }
            Inbound::Disconnected { error, retry_in } => {
                warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "broker connection lost")
            }
            Inbound::Message {
                topic,
                payload,
                ack,
                ..
            } => {
                match self.replies.topics.parse(&topic) {
                    Some(TopicKind::NodeStatus { node: peer }) => {
                        match serde_json::from_slice::<NodeStatus>(&payload) {
                            Ok(s) => self.node.peers.update(peer, s),
                            Err(e) => warn!(%topic, error = %e, "ignoring unreadable node status"),
                        }
                    }
                    Some(TopicKind::Job { node: to, job_id }) if to == self.node.id => {
                        self.on_job(&job_id, &payload).await;
                        self.publish_status(true);
                    }
                    _ => {}
                }
                // A job is recorded in the ledger (or rejected) by now: the
                // broker may forget it.
                self.ack(&ack).await;
            }
        }
    }

    async fn ack(&self, ack: &Ack) {
        if let Err(e) = self.replies.mqtt.ack(ack).await {
            warn!(error = %e, "cannot acknowledge a message; the broker will deliver it again");
        }
    }

    /// Drain: refuse new work, let running jobs end (or cancel them at the
    /// deadline, which rolls them back), then say we are gone. The broker
    /// connection keeps being served so statuses still go out and new jobs
    /// get a clear rejection.
    async fn drain(mut self, deadline: Duration) {
        info!(running = self.node.jobs.len(), "draining");
        self.service.stopping("draining");
        self.node.jobs.cancel_queued();
        self.node.jobs.cancel_incoming();
        self.accept_stop.cancel();
        self.tasks.close();
        let soft = tokio::time::sleep(deadline);
        let hard = tokio::time::sleep(deadline + ROLLBACK_GRACE);
        tokio::pin!(soft, hard);
        let mut canceled = false;
        loop {
            tokio::select! {
                _ = self.tasks.wait() => break,
                _ = &mut soft, if !canceled => {
                    warn!("drain deadline passed; canceling running jobs");
                    self.node.jobs.cancel_all();
                    canceled = true;
                }
                _ = &mut hard => {
                    error!(running = self.node.jobs.len(), "jobs did not end after cancel; exiting anyway");
                    break;
                }
                msg = self.inbound.recv() => match msg {
                    Some(Inbound::Message { topic, ack, .. }) => {
                        if let Some(TopicKind::Job { node: to, job_id }) = self.replies.topics.parse(&topic) {
                            if to == self.node.id {
                                let reason = format!("node {} is shutting down", self.node.id);
                                self.replies.send(&job_id, Err(reason)).await;
                            }
                        }
                        self.ack(&ack).await;
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
        self.publish_status(false);
        self.mqtt_stop.cancel();
        let _ = tokio::time::timeout(MQTT_GOODBYE, self.mqtt_task).await;
        info!("agent stopped");
    }

    /// Never waits: the latest node status goes out when the broker can
    /// take it, and again after every reconnect (the broker may have
    /// published our will meanwhile).
    fn publish_status(&self, online: bool) {
        let status = node_status(&self.node, online, &self.advertise);
        let topic = self.replies.topics.node_status(&self.node.id);
        if let Err(e) = self.replies.mqtt.publish_latest(&topic, &status, true) {
            warn!(error = %e, "cannot publish node status");
        }
    }

    async fn on_job(&mut self, job_id: &str, payload: &[u8]) {
        let replies = &self.replies;
        if let Err(e) = contract::validate_id("job id", job_id) {
            // The topic level itself is unusable: no reply topic can be built.
            warn!(error = %e, "ignoring job with an invalid id");
            return;
        }
        match self.ledger.first_seen(job_id) {
            Ok(true) => {}
            Ok(false) => {
                info!(job = %job_id, "job seen before; not run again");
                return;
            }
            Err(e) => {
                let reason = format!("cannot record job id in the work dir: {e}");
                return replies.send(job_id, Err(reason)).await;
            }
        }
        let request = match contract::parse_job(&self.node.id, job_id, payload) {
            Ok(r) => r,
            Err(e) => return replies.send(job_id, Err(e)).await,
        };
        match request {
            JobRequest::Cancel { job } => replies.send(job_id, self.node.jobs.cancel(&job)).await,
            JobRequest::Migrate {
                container,
                target,
                options,
            } => {
                let rate_limit = match options
                    .rate_limit
                    .map(|r| match r {
                        RateSpec::Text(t) => parse_rate(&t),
                        RateSpec::Bytes(n) => Ok(n),
                    })
                    .transpose()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let reason = format!("invalid options.rate_limit: {e}");
                        return replies.send(job_id, Err(reason)).await;
                    }
                };
                let job = MigrateJob {
                    job_id: job_id.to_string(),
                    container,
                    target,
                    rate_limit,
                    zstd_level: options.zstd_level,
                    tcp: options.tcp,
                    bind_mounts: options.bind_mounts,
                };
                self.spawn_migration(job);
            }
        }
    }

    /// The job's own task: the early check may wait for the target's
    /// retained status, which the main loop delivers.
    fn spawn_migration(&self, job: MigrateJob) {
        let span = tracing::info_span!("migrate", job = %job.job_id, container = %job.container, peer = %job.target);
        let (node, replies) = (self.node.clone(), self.replies.clone());
        let changed = self.jobs_changed.0.clone();
        self.tasks.spawn(
            async move {
                match admit(&node, &job).await {
                    Err(reason) => replies.send(&job.job_id, Err(reason)).await,
                    Ok(guard) => {
                        let _ = changed.send(()).await;
                        replies
                            .send(&job.job_id, Ok::<(), MigrationError>(()))
                            .await;
                        if wait_in_line(&node, &job, &guard).await {
                            source::run(node, job, guard).await;
                        }
                        let _ = changed.send(()).await;
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// One outgoing migration at a time per node: until its turn, the job is
/// `queued` with its place in line. False if it was canceled meanwhile
/// (its final status published).
async fn wait_in_line<E: Engine>(node: &Node<E>, job: &MigrateJob, guard: &JobGuard) -> bool {
    let mut status = source::first_status(&node.id, job);
    let mut position = guard.position();
    while position > 0 {
        info!(job = %job.job_id, position, "queued behind another migration");
        status.position = Some(position as u32);
        status.updated_ms = now_ms();
        node.publish_job(&status).await;
        position = tokio::select! {
            p = guard.position_change(position) => p,
            () = guard.gate().canceled() => {
                status.state = JobState::Canceled;
                status.error = Some(format!("{} while queued", MigrationError::Canceled));
                status.updated_ms = now_ms();
                node.publish_job(&status).await;
                info!(job = %job.job_id, "canceled while queued");
                return false;
            }
        };
    }
    true
}

/// Creates the work dir and clears staging left from a crash; opens the
/// ledger in the state dir, which must survive a reboot.
fn open_work_dir(config: &AgentConfig) -> Result<JobLedger, AgentError> {
    let failed = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| AgentError::WorkDir { path, source }
    };
    std::fs::create_dir_all(&config.work_dir).map_err(failed(&config.work_dir))?;
    std::fs::create_dir_all(&config.state_dir).map_err(failed(&config.state_dir))?;
    if crate::sysinfo::is_tmpfs(&config.state_dir) {
        error!(
            state_dir = %config.state_dir.display(),
            "the state dir is on tmpfs: a reboot forgets which jobs already ran, and a manager's retry then runs a job again; set state_dir to persistent storage (default /var/lib/ferry)"
        );
    }
    // Nothing runs yet: whatever is staged is left from a crash.
    let staging = config.work_dir.join("staging");
    if staging.exists() {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            warn!(path = %staging.display(), error = %e, "cannot clear stale staging");
        }
    }
    let ledger = config.state_dir.join(JobLedger::FILE_NAME);
    JobLedger::open(&ledger).map_err(failed(&ledger))
}

fn broker_settings(
    config: &AgentConfig,
    tls_client: Option<Arc<rustls::ClientConfig>>,
) -> ClientSettings {
    let topics = &config.topics;
    ClientSettings {
        url: config.mqtt.clone(),
        client_id: config.node_id.clone(),
        // A persistent session: jobs published while the agent was briefly
        // offline are delivered when it comes back.
        clean_session: false,
        keep_alive: KEEP_ALIVE,
        tls: tls_client.filter(|_| config.mqtt.is_tls()),
        last_will: Some((
            topics.node_status(&config.node_id),
            NodeStatus::offline_will(),
            true,
        )),
        subscriptions: vec![topics.jobs_of(&config.node_id), topics.all_node_status()],
        // A job is acknowledged once the ledger holds it.
        manual_acks: true,
    }
}

/// The early check of a migrate job, before it is accepted: the fleet
/// manager learns about a typo without a job ever starting. The job is
/// registered by the container's engine id, so a name and an id cannot run
/// two jobs for one container.
async fn admit<E: Engine>(node: &Node<E>, job: &MigrateJob) -> Result<JobGuard, MigrationError> {
    let found = node.engine.inspect(&job.container).await;
    let container = check::found(&job.container, &node.id, found)?;
    let guard = node
        .jobs
        .try_register(&job.job_id, &container.id, Role::Source)
        .map_err(|e| match e {
            RegisterError::ContainerBusy { .. } => RegisterError::ContainerBusy {
                container: job.container.clone(),
            },
            e => e,
        })?;
    source::check_ready(
        node,
        &job.container,
        &container,
        &job.target,
        PEER_STATUS_WAIT,
    )
    .await?;
    Ok(guard)
}

fn node_status<E: Engine>(node: &Node<E>, online: bool, advertise: &str) -> NodeStatus {
    let problem = node.criu_problem();
    NodeStatus {
        online,
        version: env!("CARGO_PKG_VERSION").to_string(),
        arch: node.engine_info.arch.clone(),
        page_size: node.page_size,
        criu: problem.is_none().then(|| node.criu.clone().ok()).flatten(),
        criu_error: problem,
        kernel: Some(node.engine_info.kernel.clone()).filter(|k| !k.is_empty()),
        docker: Some(node.engine_info.version.clone()),
        data_addr: Some(advertise.to_string()),
        free_mem: crate::sysinfo::mem_available().unwrap_or(0),
        free_disk: crate::sysinfo::free_disk(&node.work_dir).unwrap_or(0),
        jobs: node.jobs.len() as u32,
        updated_ms: now_ms(),
    }
}

impl Replies {
    /// `accepted`, or `rejected` with the reason as the contract carries it.
    async fn send(&self, job_id: &str, result: Result<(), impl Display>) {
        let (topic, payload) = match result {
            Ok(()) => (
                self.topics.job_accepted(&self.node, job_id),
                serde_json::to_value(Accepted {
                    job_id: job_id.to_string(),
                    node: self.node.clone(),
                }),
            ),
            Err(reason) => {
                let reason = reason.to_string();
                warn!(job = %job_id, %reason, "job rejected");
                (
                    self.topics.job_rejected(&self.node, job_id),
                    serde_json::to_value(Rejected {
                        job_id: job_id.to_string(),
                        node: self.node.clone(),
                        reason,
                    }),
                )
            }
        };
        match payload {
            Ok(p) => {
                if let Err(e) = self.mqtt.publish_json(&topic, &p, false).await {
                    warn!(%topic, error = %e, "cannot publish job reply");
                }
            }
            Err(e) => warn!(%topic, error = %e, "cannot encode job reply"),
        }
    }
}

async fn serve_data_port<E: Engine + 'static>(
    node: Arc<Node<E>>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    jobs_changed: mpsc::Sender<()>,
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
        let changed = jobs_changed.clone();
        // An incoming job ended: the node status's job count changed (a
        // full channel already has a refresh pending).
        let ended = move || {
            let _ = changed.try_send(());
        };
        tasks.spawn(async move {
            let Some(acceptor) = acceptor else {
                drop(permit);
                target::serve(node, tcp, None).await;
                return ended();
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
                    target::serve(node, tls, Some(names)).instrument(span).await;
                    ended();
                }
                Err(e) => warn!(%addr, error = %e, "data port TLS handshake failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::testing::{online, test_node};
    use crate::stream::testutil::TempDir;

    fn job(id: &str, container: &str) -> MigrateJob {
        MigrateJob {
            job_id: id.into(),
            container: container.into(),
            target: "b".into(),
            rate_limit: None,
            zstd_level: 3,
            tcp: Default::default(),
            bind_mounts: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_second_job_for_a_container_is_refused_by_name_and_by_id() {
        let dir = TempDir::new("admit");
        let (node, _) = test_node("a", &dir, Box::new(|_| {}));
        let id = node.engine.run("web", "ferry/counter:1");
        node.peers.update("b", online("x86_64"));

        let _first = admit(&node, &job("j1", "web")).await.unwrap();
        for (job_id, asked) in [("j2", id.as_str()), ("j3", "web")] {
            let err = admit(&node, &job(job_id, asked)).await.err().unwrap();
            assert_eq!(
                err.to_string(),
                format!("container {asked} is already being migrated")
            );
        }
        let err = admit(&node, &job("j1", &id)).await.err().unwrap();
        assert_eq!(err.to_string(), "job j1 is already running on a");
        assert_eq!(node.jobs.len(), 1);
    }
}
