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
use crate::migration::placement::{self, Need};
use crate::migration::source::{self, MigrateJob};
use crate::migration::{
    check, now_ms, target, JobGuard, JobRegistry, MigrationError, MqttReporter, Node, Peers,
    RegisterError, TcpDialer, Timeouts,
};
use crate::mqtt::contract::{
    self, Accepted, EvacuationChild, EvacuationStatus, JobRequest, JobState, JobStatus,
    MigrateOptions, NodeStatus, RateSpec, Rejected, Role, Target, TopicKind, Topics,
};
use crate::mqtt::{self, Ack, ClientSettings, Inbound, JobLedger, MqttHandle};
use crate::order::{OrderError, OrderKey, Orders};
use crate::runtime::{Container, Deadlines, Docker, Engine, EngineDeadlines};
use crate::stream::ratelimit::parse_rate;
use crate::stream::tls::Current;

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
    #[error(transparent)]
    Journal(Box<crate::migration::journal::JournalError>),
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
    #[error("order_key: {0}")]
    OrderKey(Box<crate::order::OrderError>),
    #[error("mqtt: the broker connection task ended")]
    BrokerTaskEnded,
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
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
    /// Caps the memory the node status offers.
    offer_memory: Option<u64>,
    /// The evacuations running here, for a cancel.
    evacuations: Evacuations,
    /// The drain began: evacuations start no further container.
    draining: CancellationToken,
    hangup: tokio::signal::unix::Signal,
    tls: Option<TlsReload>,
}

/// What SIGHUP reloads: the data port's TLS (both sides) from the files.
/// The broker connection keeps the certificate it started with.
struct TlsReload {
    files: crate::stream::tls::TlsFiles,
    crl: Option<std::path::PathBuf>,
    node: String,
    server: Arc<Current<rustls::ServerConfig>>,
    client: Arc<Current<rustls::ClientConfig>>,
}

impl TlsReload {
    /// New connections use the files as they are now; a file that fails
    /// its checks leaves the ones in use in place.
    fn reload(&self) {
        match crate::stream::tls::load_node_tls(&self.files, &self.node, self.crl.as_deref()) {
            Ok((server, client)) => {
                self.server.replace(server);
                self.client.replace(client);
                info!(
                    cert = %self.files.cert.display(),
                    crl = ?self.crl,
                    "SIGHUP: the data port uses the reloaded certificate, key and CRL for new connections"
                );
            }
            Err(e) => {
                error!(error = %e, "SIGHUP: cannot reload the TLS files; keeping the ones in use")
            }
        }
    }
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
        let journal = crate::migration::journal::Journal::open(&config.state_dir)
            .map_err(|e| AgentError::Journal(Box::new(e)))?;
        let orders = open_orders(config)?;
        if config.insecure {
            warn!("--insecure: plain TCP is allowed where no TLS is configured; never use this on a real fleet");
        }
        // SIGHUP reloads the TLS files; installed before anything runs, as
        // its default action would end the agent.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(AgentError::Signal)?;
        let (tls_client, tls_server) = match &config.tls {
            Some(files) => {
                let (server, client) = crate::stream::tls::load_node_tls(
                    files,
                    &config.node_id,
                    config.tls_crl.as_deref(),
                )?;
                (
                    Some(Arc::new(Current::new(client))),
                    Some(Arc::new(Current::new(server))),
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
            broker_settings(config, tls_client.as_ref().map(|c| c.get())),
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
                tls: tls_client.clone(),
                connect_timeout: timeouts.connect,
            }),
            timeouts,
            peers: Peers::default(),
            jobs: JobRegistry::new(&config.node_id),
            journal: Some(journal.clone()),
            orders,
            policy: config.policy.clone(),
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
            order_key = node.orders.key().map_or("none", |k| k.id()),
            "agent started"
        );
        let tasks = TaskTracker::new();
        // Every job a crash or a restart left in flight is driven to a final
        // state; its container is registered meanwhile, so no new job for
        // it starts before.
        let in_flight = journal
            .load()
            .map_err(|e| AgentError::Journal(Box::new(e)))?;
        for entry in in_flight {
            let guard = node
                .jobs
                .try_register(&entry.job_id, &entry.container, entry.role);
            let node = node.clone();
            tasks.spawn(async move {
                crate::migration::recovery::recover(&node, entry).await;
                drop(guard);
            });
        }
        let accept_stop = CancellationToken::new();
        let jobs_changed = mpsc::channel(16);
        tasks.spawn(serve_data_port(
            node.clone(),
            listener,
            tls_server.clone(),
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
            offer_memory: config.offer_memory,
            evacuations: Evacuations::default(),
            draining: CancellationToken::new(),
            hangup,
            tls: config.tls.clone().zip(tls_server).zip(tls_client).map(
                |((files, server), client)| TlsReload {
                    files,
                    crl: config.tls_crl.clone(),
                    node: config.node_id.clone(),
                    server,
                    client,
                },
            ),
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
                _ = self.hangup.recv() => match &self.tls {
                    Some(tls) => tls.reload(),
                    None => info!("SIGHUP: no TLS files to reload"),
                },
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
        self.draining.cancel();
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
        let status = node_status(&self.node, online, &self.advertise, self.offer_memory);
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
        // Signature, node, id and time first: an order that is not the
        // manager's neither runs nor uses up its id.
        let order =
            match self
                .node
                .orders
                .admit(&self.node.id, job_id, payload, crate::order::unix_now())
            {
                Ok(o) => o,
                Err(e) => return replies.send(job_id, Err(e)).await,
            };
        match self.ledger.first_seen(job_id) {
            Ok(true) => {}
            Ok(false) => {
                info!(job = %job_id, "job seen before; not run again");
                let replayed = OrderError::Replayed {
                    job_id: job_id.to_string(),
                    node: self.node.id.clone(),
                };
                return replies.send(job_id, Err(replayed)).await;
            }
            Err(e) => {
                let reason = format!("cannot record job id in the work dir: {e}");
                return replies.send(job_id, Err(reason)).await;
            }
        }
        let envelope = order.signed.map(|(envelope, _)| envelope);
        match order.request {
            JobRequest::Cancel { job } if self.evacuations.cancel(&job) => {
                info!(evacuation = %job, "evacuation canceled");
                replies.send(job_id, Ok::<(), String>(())).await
            }
            JobRequest::Cancel { job } => replies.send(job_id, self.node.jobs.cancel(&job)).await,
            JobRequest::Migrate {
                container,
                target,
                options,
            } => {
                let mut job = match migrate_job(job_id, container, &target, options) {
                    Ok(j) => j,
                    Err(reason) => return replies.send(job_id, Err(reason)).await,
                };
                job.order = envelope;
                self.spawn_migration(job, target);
            }
            JobRequest::Evacuate {
                selector,
                targets,
                options,
            } => {
                // A template for the children: each gets its own id,
                // container and target.
                let mut template = match migrate_job(job_id, String::new(), &targets, options) {
                    Ok(j) => j,
                    Err(reason) => return replies.send(job_id, Err(reason)).await,
                };
                // Every child carries the evacuation's order: the target
                // checks the child's id and container against it.
                template.order = envelope;
                let listed = self
                    .node
                    .engine
                    .list_running(&selector.label_key, &selector.label_value)
                    .await;
                let containers = match listed {
                    Ok(c) => c,
                    Err(e) => {
                        let reason = format!("cannot list the containers to evacuate: {e}");
                        return replies.send(job_id, Err(reason)).await;
                    }
                };
                if let Err(e) =
                    contract::validate_id("child job id", &child_id(job_id, containers.len()))
                {
                    let reason = format!("job id too long for its children's ids: {e}");
                    return replies.send(job_id, Err(reason)).await;
                }
                replies.send(job_id, Ok::<(), String>(())).await;
                let evacuation = Evacuation {
                    node: self.node.clone(),
                    replies: self.replies.clone(),
                    changed: self.jobs_changed.0.clone(),
                    status: EvacuationStatus {
                        job_id: job_id.to_owned(),
                        node: self.node.id.clone(),
                        action: "evacuate".into(),
                        selector: selector.label(),
                        state: JobState::InProgress,
                        children: containers
                            .iter()
                            .enumerate()
                            .map(|(i, (_, name))| EvacuationChild {
                                job_id: child_id(job_id, i + 1),
                                container: name.clone(),
                                target: None,
                                state: JobState::Queued,
                                error: None,
                            })
                            .collect(),
                        error: None,
                        updated_ms: now_ms(),
                    },
                    template,
                    targets,
                    entry: self.evacuations.register(job_id),
                    draining: self.draining.clone(),
                };
                let span =
                    tracing::info_span!("evacuate", job = %job_id, selector = %selector.label());
                self.tasks.spawn(evacuation.run().instrument(span));
            }
        }
    }

    /// The job's own task: the early check may wait for the target's
    /// retained status, which the main loop delivers.
    fn spawn_migration(&self, mut job: MigrateJob, target: Target) {
        let span = tracing::info_span!("migrate", job = %job.job_id, container = %job.container, peer = %target);
        let (node, replies) = (self.node.clone(), self.replies.clone());
        let changed = self.jobs_changed.0.clone();
        self.tasks.spawn(
            async move {
                match admit(&node, &mut job, &target).await {
                    Err(reason) => replies.send(&job.job_id, Err(reason)).await,
                    Ok(guard) => {
                        let _ = changed.send(()).await;
                        replies.accept(&job.job_id, Some(&job.target)).await;
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

/// The manager's public key from `order_key`, and the target's ledger of
/// the signed incoming jobs it accepted; without a key, every well-formed
/// job is run, with a warning.
fn open_orders(config: &AgentConfig) -> Result<Orders, AgentError> {
    let Some(path) = &config.order_key else {
        warn!("no order_key: unsigned jobs are run, and anyone who may publish to this node's job topic can order a migration; set order_key to the manager's order.pub (development beds only without)");
        return Ok(Orders::open());
    };
    let key = OrderKey::load(path).map_err(|e| AgentError::OrderKey(Box::new(e)))?;
    let ledger = config.state_dir.join(crate::order::INCOMING_LEDGER);
    let incoming = JobLedger::open(&ledger).map_err(|source| AgentError::WorkDir {
        path: ledger,
        source,
    })?;
    info!(key_id = %key.id(), path = %path.display(), "jobs must be signed by the manager's order key");
    Ok(Orders::signed(key, incoming))
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
async fn admit<E: Engine>(
    node: &Node<E>,
    job: &mut MigrateJob,
    target: &Target,
) -> Result<JobGuard, MigrationError> {
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
    if !matches!(target, Target::Node(_)) {
        check::running(&job.container, &node.id, &container)?;
        let choice = place(node, &container, target).await?;
        info!(job = %job.job_id, target = %choice.node, excluded = ?choice.excluded, "placed");
        job.target = choice.node;
        job.excluded = choice.excluded;
        tracing::Span::current().record("peer", job.target.as_str());
    }
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

/// Chooses the target of a job for `"auto"` (every node with a status
/// seen) or a list (waiting briefly for a listed node not seen yet).
async fn place<E: Engine>(
    node: &Node<E>,
    container: &Container,
    target: &Target,
) -> Result<placement::Choice, MigrationError> {
    let candidates: Vec<(String, Option<NodeStatus>)> = match target {
        Target::Node(n) => vec![(n.clone(), node.peers.get(n))],
        Target::Auto => node
            .peers
            .all()
            .into_iter()
            .map(|(n, s)| (n, Some(s)))
            .collect(),
        Target::Among(list) => {
            let deadline = tokio::time::Instant::now() + PEER_STATUS_WAIT;
            let mut out = Vec::with_capacity(list.len());
            for n in list {
                let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
                out.push((n.clone(), node.peers.wait_for(n, wait).await));
            }
            out
        }
    };
    // The checkpoint is about the size of the memory the container uses.
    let memory = node.engine.memory_usage(&container.id).await.unwrap_or(0);
    let need = Need {
        memory,
        staging: memory,
    };
    placement::choose(
        &node.facts(),
        candidates.iter().map(|(n, s)| (n.as_str(), s.as_ref())),
        need,
    )
    .map_err(MigrationError::Precheck)
}

/// The job a migrate order (or, as a template, an evacuate order) runs;
/// its target is set once placed. `Err`: a bad rate limit.
fn migrate_job(
    job_id: &str,
    container: String,
    target: &Target,
    options: MigrateOptions,
) -> Result<MigrateJob, String> {
    let rate_limit = options
        .rate_limit
        .map(|r| match r {
            RateSpec::Text(t) => parse_rate(&t),
            RateSpec::Bytes(n) => Ok(n),
        })
        .transpose()
        .map_err(|e| format!("invalid options.rate_limit: {e}"))?;
    Ok(MigrateJob {
        job_id: job_id.to_string(),
        container,
        target: match target {
            Target::Node(n) => n.clone(),
            Target::Auto | Target::Among(_) => String::new(),
        },
        rate_limit,
        zstd_level: options.zstd_level,
        tcp: options.tcp,
        bind_mounts: options.bind_mounts,
        precopy: options.precopy,
        excluded: Default::default(),
        parent: None,
        order: None,
    })
}

/// How an evacuation ends once every child has: `succeeded` only when every
/// matching container moved; otherwise `failed`, naming each that stayed
/// and why.
fn evacuation_outcome(children: &[EvacuationChild]) -> (JobState, Option<String>) {
    let stayed: Vec<String> = children
        .iter()
        .filter(|c| c.state != JobState::Succeeded)
        .map(|c| {
            format!(
                "{} {} ({})",
                c.container,
                c.state.as_str(),
                c.error.as_deref().unwrap_or("no reason given")
            )
        })
        .collect();
    if stayed.is_empty() {
        return (JobState::Succeeded, None);
    }
    let error = format!(
        "{} of {} containers did not move: {}",
        stayed.len(),
        children.len(),
        stayed.join("; ")
    );
    (JobState::Failed, Some(error))
}

/// The id of an evacuation's `n`th child (from 1).
fn child_id(evacuation: &str, n: usize) -> String {
    format!("{evacuation}.{n}")
}

/// An evacuate job: its children run one after the other, each placed
/// when its turn comes (the statuses then show the earlier ones landed).
struct Evacuation {
    node: Arc<Node<AgentEngine>>,
    replies: Replies,
    changed: mpsc::Sender<()>,
    status: EvacuationStatus,
    /// Options, rate limit; id, container and target are set per child.
    template: MigrateJob,
    targets: Target,
    /// Canceled by a `cancel` of the evacuation's id.
    entry: EvacuationEntry,
    draining: CancellationToken,
}

/// The evacuations running on this node, by job id.
#[derive(Clone, Default)]
struct Evacuations(Arc<std::sync::Mutex<std::collections::HashMap<String, CancellationToken>>>);

/// One evacuation's registration, undone on drop.
struct EvacuationEntry {
    registry: Evacuations,
    id: String,
    canceled: CancellationToken,
}

impl Evacuations {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, CancellationToken>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, id: &str) -> EvacuationEntry {
        let canceled = CancellationToken::new();
        self.lock().insert(id.to_owned(), canceled.clone());
        EvacuationEntry {
            registry: self.clone(),
            id: id.to_owned(),
            canceled,
        }
    }

    /// Cancels evacuation `id`; false when none by that id runs here.
    fn cancel(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

impl Drop for EvacuationEntry {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Evacuation {
    async fn run(mut self) {
        info!(
            containers = self.status.children.len(),
            "evacuation started"
        );
        self.publish();
        for i in 0..self.status.children.len() {
            let stop = if self.entry.canceled.is_cancelled() {
                Some("the evacuation was canceled".to_owned())
            } else if self.draining.is_cancelled() {
                Some(format!("node {} is shutting down", self.node.id))
            } else {
                None
            };
            if let Some(why) = stop {
                let child = &mut self.status.children[i];
                child.state = JobState::Canceled;
                child.error = Some(why);
                continue;
            }
            let ended = self.child(i).await;
            let child = &mut self.status.children[i];
            child.state = ended.state;
            child.error = ended.error;
            if !ended.target.is_empty() {
                child.target = Some(ended.target);
            }
            self.publish();
        }
        (self.status.state, self.status.error) = evacuation_outcome(&self.status.children);
        if self.entry.canceled.is_cancelled() {
            self.status.state = JobState::Canceled;
        }
        info!(state = ?self.status.state, error = ?self.status.error, "evacuation ended");
        self.publish();
    }

    /// Runs child `i` to its end; its own status is published under its id.
    async fn child(&mut self, i: usize) -> JobStatus {
        let node = self.node.clone();
        let mut job = self.template.clone();
        job.job_id = self.status.children[i].job_id.clone();
        job.container = self.status.children[i].container.clone();
        job.parent = Some(self.status.job_id.clone());
        let span = tracing::info_span!("migrate", job = %job.job_id, container = %job.container, peer = tracing::field::Empty);
        async {
            let guard = match admit(&node, &mut job, &self.targets).await {
                Ok(g) => g,
                Err(reason) => {
                    warn!(%reason, "cannot start this container's migration");
                    let mut status = source::first_status(&node.id, &job);
                    status.state = JobState::Failed;
                    status.error = Some(reason.to_string());
                    node.publish_job(&status).await;
                    return status;
                }
            };
            let _ = self.changed.send(()).await;
            let child = &mut self.status.children[i];
            child.target = Some(job.target.clone());
            child.state = JobState::InProgress;
            self.publish();
            let work = {
                let (node, job) = (node.clone(), job.clone());
                async move {
                    if wait_in_line(&node, &job, &guard).await {
                        source::run(node.clone(), job, guard).await
                    } else {
                        let mut s = source::first_status(&node.id, &job);
                        s.state = JobState::Canceled;
                        s
                    }
                }
            };
            tokio::pin!(work);
            let canceled = self.entry.canceled.clone();
            // A cancel of the evacuation cancels the running child too (it
            // ends as a cancel of its own id would end it).
            let status = tokio::select! {
                s = &mut work => s,
                () = canceled.cancelled() => {
                    if let Err(e) = node.jobs.cancel(&job.job_id) {
                        info!(reason = %e, "the running container's job cannot be canceled");
                    }
                    work.await
                }
            };
            let _ = self.changed.send(()).await;
            status
        }
        .instrument(span)
        .await
    }

    fn publish(&mut self) {
        self.status.updated_ms = now_ms();
        let r = &self.replies;
        let topic = r.topics.job_status(&r.node, &self.status.job_id);
        let live = !self.status.state.is_final();
        if let Err(e) = r.mqtt.publish_latest(&topic, &self.status, live) {
            warn!(%topic, error = %e, "cannot publish the evacuation status");
        }
    }
}

fn node_status<E: Engine>(
    node: &Node<E>,
    online: bool,
    advertise: &str,
    offer_memory: Option<u64>,
) -> NodeStatus {
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
        free_mem: crate::sysinfo::mem_available()
            .unwrap_or(0)
            .min(offer_memory.unwrap_or(u64::MAX)),
        free_disk: crate::sysinfo::free_disk(&node.work_dir).unwrap_or(0),
        jobs: node.jobs.len() as u32,
        updated_ms: now_ms(),
    }
}

impl Replies {
    /// `accepted` naming the target a migration goes to.
    async fn accept(&self, job_id: &str, target: Option<&str>) {
        let topic = self.topics.job_accepted(&self.node, job_id);
        let accepted = Accepted {
            job_id: job_id.to_string(),
            node: self.node.clone(),
            target: target.map(str::to_owned),
        };
        match serde_json::to_value(accepted) {
            Ok(p) => {
                if let Err(e) = self.mqtt.publish_json(&topic, &p, false).await {
                    warn!(%topic, error = %e, "cannot publish job reply");
                }
            }
            Err(e) => warn!(%topic, error = %e, "cannot encode job reply"),
        }
    }

    /// `accepted`, or `rejected` with the reason as the contract carries it.
    async fn send(&self, job_id: &str, result: Result<(), impl Display>) {
        let (topic, payload) = match result {
            Ok(()) => return self.accept(job_id, None).await,
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
    tls: Option<Arc<Current<rustls::ServerConfig>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    jobs_changed: mpsc::Sender<()>,
) {
    // Beyond these bounds a connection is closed at once, so a flood of
    // silent peers costs a bounded number of sockets (each for at most
    // the handshake timeout), and one host cannot take every place.
    let handshakes = crate::stream::admission::Handshakes::default();
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
        // Anonymous until the handshake ends: only so many at once, and
        // fewer from one peer.
        let permit = match handshakes.admit(addr.ip()) {
            Ok(p) => p,
            Err((refused, log)) => {
                if log {
                    warn!(%addr, %refused, "data connection closed before its TLS handshake (logged for the 1st, 2nd, 4th, 8th... such)");
                }
                continue;
            }
        };
        let node = node.clone();
        // The config current now (SIGHUP may replace it for later ones).
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.get()));
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

    fn b() -> Target {
        Target::Node("b".into())
    }

    fn job(id: &str, container: &str) -> MigrateJob {
        MigrateJob {
            job_id: id.into(),
            container: container.into(),
            target: "b".into(),
            rate_limit: None,
            zstd_level: 3,
            tcp: Default::default(),
            bind_mounts: Default::default(),
            excluded: Default::default(),
            parent: None,
            order: None,
            precopy: Default::default(),
        }
    }

    #[test]
    fn an_evacuation_is_canceled_by_its_id_while_it_runs() {
        let running = Evacuations::default();
        let entry = running.register("e1");
        assert!(!running.cancel("e2"));
        assert!(running.cancel("e1"));
        assert!(entry.canceled.is_cancelled());
        drop(entry);
        assert!(!running.cancel("e1"), "an ended evacuation is forgotten");
    }

    #[test]
    fn an_evacuation_succeeds_only_when_every_container_moved() {
        let child = |c: &str, state, error: Option<&str>| EvacuationChild {
            job_id: format!("e.{c}"),
            container: c.into(),
            target: Some("b".into()),
            state,
            error: error.map(str::to_owned),
        };
        assert_eq!(evacuation_outcome(&[]), (JobState::Succeeded, None));
        let moved = child("web", JobState::Succeeded, None);
        assert_eq!(
            evacuation_outcome(std::slice::from_ref(&moved)),
            (JobState::Succeeded, None)
        );
        let (state, error) = evacuation_outcome(&[
            moved,
            child("db", JobState::RolledBack, Some("checkpoint: criu failed")),
            child("cache", JobState::Failed, None),
        ]);
        assert_eq!(state, JobState::Failed);
        assert_eq!(
            error.as_deref(),
            Some(
                "2 of 3 containers did not move: db rolled_back (checkpoint: criu failed); \
                 cache failed (no reason given)"
            )
        );
    }

    #[tokio::test]
    async fn a_job_for_auto_is_placed_and_one_that_fits_nowhere_is_refused_with_each_reason() {
        let dir = TempDir::new("place");
        let (node, _) = test_node("a", &dir, Box::new(|_| {}));
        node.engine.run("web", "ferry/counter:1");
        let mut small = online("x86_64");
        small.free_mem = 1;
        node.peers.update("b", small);
        node.peers.update(
            "c",
            NodeStatus {
                online: false,
                ..Default::default()
            },
        );
        let err = admit(&node, &mut job("j1", "web"), &Target::Auto)
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "precheck: no candidate node fits: b: b offers 1 bytes of memory for a container \
             using 65536 bytes; c: target node c is offline"
        );
        let mut roomy = online("x86_64");
        (roomy.free_mem, roomy.free_disk) = (1 << 30, 1 << 30);
        node.peers.update("d", roomy);
        let mut placed = job("j2", "web");
        let among = Target::Among(vec!["b".into(), "d".into()]);
        let _guard = admit(&node, &mut placed, &among).await.unwrap();
        assert_eq!(placed.target, "d");
        assert_eq!(
            placed.excluded.keys().collect::<Vec<_>>(),
            ["b"],
            "{:?}",
            placed.excluded
        );
    }

    #[tokio::test]
    async fn a_second_job_for_a_container_is_refused_by_name_and_by_id() {
        let dir = TempDir::new("admit");
        let (node, _) = test_node("a", &dir, Box::new(|_| {}));
        let id = node.engine.run("web", "ferry/counter:1");
        node.peers.update("b", online("x86_64"));

        let _first = admit(&node, &mut job("j1", "web"), &b()).await.unwrap();
        for (job_id, asked) in [("j2", id.as_str()), ("j3", "web")] {
            let err = admit(&node, &mut job(job_id, asked), &b())
                .await
                .err()
                .unwrap();
            assert_eq!(
                err.to_string(),
                format!("container {asked} is already being migrated")
            );
        }
        let err = admit(&node, &mut job("j1", &id), &b()).await.err().unwrap();
        assert_eq!(err.to_string(), "job j1 is already running on a");
        assert_eq!(node.jobs.len(), 1);
    }
}
