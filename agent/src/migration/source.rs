//! Drives a migration on the node that holds the container: performs each
//! step the [`SourceMachine`] asks for, feeds back the outcome and publishes
//! the job's status. Cancels reach it through the job's [`CommitGate`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::RestartPolicy;
use tokio::sync::watch;
use tracing::{info, warn};

use super::check::{self, CheckError};
use super::gate::CommitGate;
use super::journal::{Entry, Phase};
use super::machine::{Outcome, SourceMachine, Step};
use super::precopy::{self, Next};
use super::protocol::{self, Prepare, ToSource, ToTarget};
use super::{checkpoint_name, now_ms, Conn, JobGuard, MigrationError, Node, Unconfirmed};
use crate::mqtt::contract::{JobStatus, PreCopyMode, PreCopyReport, PreCopyRound, Role};
use crate::runtime::mounts::BindMounts;
use crate::runtime::state::{self, StatePlan};
use crate::runtime::{
    networks, sockets, volumes, CheckpointOptions, Container, Engine, RuntimeError, TcpDump,
    TcpMode,
};
use crate::stream::delta::Known;
use crate::stream::wire::{self, Progress, SendOptions, TransferHeader};

/// A migrate job as accepted from MQTT.
#[derive(Debug, Clone)]
pub struct MigrateJob {
    pub job_id: String,
    pub container: String,
    pub target: String,
    pub rate_limit: Option<u64>,
    pub zstd_level: i32,
    /// What happens to the container's established TCP connections.
    pub tcp: TcpMode,
    /// Whether the container's bind mounts exist on the target as here.
    pub bind_mounts: BindMounts,
    /// A placed job: why each other candidate was not chosen.
    pub excluded: std::collections::BTreeMap<String, String>,
    /// A child of an evacuation: the evacuation's job id.
    pub parent: Option<String>,
    /// The manager's signed order, passed on to the target in `Prepare`.
    pub order: Option<crate::mqtt::contract::Envelope>,
    pub precopy: PreCopyMode,
}

/// How long a rollback waits for a target that went silent after the
/// stream to say it holds no copy.
const TARGET_EMPTY_WAIT: Duration = Duration::from_secs(120);

/// The file an exported image travels as, in its own folder.
pub const IMAGE_TAR: &str = "image.tar";

/// What a migrate job must pass before it is accepted, and again in the
/// precheck: `container` (the job's `asked` name or id, as found here) runs,
/// and `target` is online, reachable and compatible. `peer_wait` allows for
/// a target status not seen yet.
pub async fn check_ready<E: Engine>(
    node: &Node<E>,
    asked: &str,
    container: &Container,
    target: &str,
    peer_wait: Duration,
) -> Result<(), CheckError> {
    check::running(asked, &node.id, container)?;
    let peer = node.peers.wait_for(target, peer_wait).await;
    check::target_ready(&node.facts(), target, peer.as_ref())
}

/// How the checkpoint must treat the established TCP connections of
/// container `id` under the job's `tcp` mode, or why the job stops here.
async fn tcp_plan<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    id: &str,
) -> Result<TcpDump, MigrationError> {
    let state = node
        .engine
        .tcp_state(id)
        .await
        .map_err(MigrationError::TcpState)?;
    sockets::plan(job.tcp, &state).map_err(|refusal| {
        MigrationError::Precheck(CheckError::Tcp {
            container: job.container.clone(),
            refusal,
        })
    })
}

/// The status a source publishes for `job` before anything has happened.
pub fn first_status(node_id: &str, job: &MigrateJob) -> JobStatus {
    let mut status = JobStatus::new(
        &job.job_id,
        node_id,
        Role::Source,
        &job.container,
        node_id,
        &job.target,
        now_ms(),
    );
    status.excluded = job.excluded.clone();
    status.parent = job.parent.clone();
    status
}

/// Runs the job to its final state; `guard` keeps it registered meanwhile.
pub async fn run<E: Engine>(node: Arc<Node<E>>, job: MigrateJob, guard: JobGuard) -> JobStatus {
    let status = first_status(&node.id, &job);
    let mut entry = Entry::new(
        Role::Source,
        &job.job_id,
        &job.container,
        &checkpoint_name(&job.job_id),
        &job.target,
    );
    let mut machine = SourceMachine::new(status, now_ms());
    let mut driver = Driver {
        node: &node,
        job: &job,
        gate: guard.gate(),
        container: None,
        conn: None,
        estimate: 0,
        plan: None,
        image_wanted: None,
        prepared: false,
        paused_policy: None,
        restored: false,
        restore_unknown: false,
        confirmed: false,
        journaled: false,
        known: None,
    };
    loop {
        node.publish_job(machine.status()).await;
        let step = machine.step();
        if step == Step::Finish {
            break;
        }
        // The journal names the step before it acts.
        let outcome = match driver.journal(&mut entry, step).await {
            Ok(()) => driver.perform(step, &mut machine).await,
            Err(e) => Outcome::Failed(e),
        };
        if let Outcome::Failed(reason) = &outcome {
            warn!(job = %job.job_id, ?step, %reason, "step failed");
        }
        machine.on(outcome, now_ms());
    }
    let status = machine.status().clone();
    // A decision the target has not confirmed stays on record: the target
    // asks for it (`Decision`), and the next start carries it out.
    let unconfirmed =
        matches!(entry.phase, Phase::Commit | Phase::Abort) && driver.restored && !driver.confirmed;
    if unconfirmed {
        warn!(job = %job.job_id, phase = ?entry.phase, "the target has not confirmed the decision; it stays in the journal");
    } else {
        node.journal_remove(&entry);
    }
    info!(job = %job.job_id, state = ?status.state, error = ?status.error, "migration ended");
    status
}

/// What the steps share as the job goes on.
struct Driver<'a, E> {
    node: &'a Node<E>,
    job: &'a MigrateJob,
    gate: &'a CommitGate,
    container: Option<Container>,
    conn: Option<Box<dyn Conn>>,
    estimate: u64,
    /// What moves besides memory, from the precheck.
    plan: Option<StatePlan>,
    /// The target lacks the image and has these layer chains.
    image_wanted: Option<HashSet<String>>,
    /// The target answered `Prepared`.
    prepared: bool,
    /// The policy `PausePolicy` replaced with `no`.
    paused_policy: Option<RestartPolicy>,
    /// The target answered `Restored`: it runs a copy.
    restored: bool,
    /// The stream was sent, then the target went silent or away before it
    /// answered: it may have restored a copy.
    restore_unknown: bool,
    /// The target confirmed the decision (`Committed`, or the end of the
    /// connection before it restored).
    confirmed: bool,
    /// The job has a journal record.
    journaled: bool,
    /// The block hashes the target holds after pre-copy: the final dump
    /// goes as deltas against them.
    known: Option<Known>,
}

impl<E: Engine> Driver<'_, E> {
    /// Journals the phase `step` enters, if it changes, before it runs.
    async fn journal(&mut self, entry: &mut Entry, step: Step) -> Result<(), MigrationError> {
        let phase = match step {
            Step::Precheck | Step::PrepareTarget | Step::SendImage | Step::PreCopy => {
                Phase::Started
            }
            Step::PausePolicy => Phase::PolicyPaused,
            Step::Checkpoint | Step::PackState => Phase::Checkpointing,
            Step::Transfer => Phase::Transferring,
            Step::AwaitRestore => Phase::RestoreRequested,
            Step::Commit => Phase::Commit,
            Step::Abort | Step::RollBack => Phase::Abort,
            Step::ResumePolicy | Step::Finish => entry.phase,
        };
        if phase == entry.phase && self.journaled && step != Step::PausePolicy {
            return Ok(());
        }
        self.journaled = true;
        entry.phase = phase;
        entry.updated_ms = now_ms();
        if let Some(c) = &self.container {
            entry.container_id = Some(c.id.clone());
        }
        if let Some(plan) = &self.plan {
            entry.volumes = plan.volumes.iter().map(|v| v.name.clone()).collect();
            entry.restart_policy = serde_json::to_value(&plan.restart_policy).ok();
        }
        entry.peer_addr = self
            .node
            .peers
            .get(&self.job.target)
            .and_then(|p| p.data_addr);
        self.node.journal_write(entry)?;
        super::journal::test_pause(Role::Source, phase).await;
        Ok(())
    }

    async fn perform(&mut self, step: Step, machine: &mut SourceMachine) -> Outcome {
        let gate = self.gate;
        let result = match step {
            Step::Precheck => {
                let r = self.precheck().await;
                if let Some(c) = &self.container {
                    machine.old_addresses(networks::addresses(&c.spec.networks));
                }
                r
            }
            Step::PrepareTarget => tokio::select! {
                biased;
                _ = gate.canceled() => return Outcome::Canceled,
                r = self.prepare_target() => r,
            },
            Step::SendImage => tokio::select! {
                biased;
                _ = gate.canceled() => return Outcome::Canceled,
                r = self.send_image(machine) => r,
            },
            // A cancel stops it between dumps and during a send, never in
            // the middle of a dump (CRIU has the container frozen then).
            Step::PreCopy => self.precopy(machine).await,
            // Not interruptible: a cancel is honoured once it returns.
            Step::PausePolicy => self.pause_policy().await,
            // Not interruptible: the engine finishes the call regardless.
            // The target hears `Progress` meanwhile, and may say it fails.
            Step::Checkpoint | Step::PackState => self.idle_step(step, machine).await,
            Step::Transfer => tokio::select! {
                biased;
                _ = gate.canceled() => return Outcome::Canceled,
                r = self.transfer(machine) => r,
            },
            Step::AwaitRestore => {
                let r = tokio::select! {
                    biased;
                    _ = gate.canceled() => return Outcome::Canceled,
                    r = self.await_restore() => r,
                };
                // The point of no return, unless a cancel got there first.
                if r.is_ok() && !gate.try_commit() {
                    return Outcome::Canceled;
                }
                r
            }
            Step::Commit => self.commit().await,
            Step::Abort => {
                // Closing the connection tells the target to drop its copy.
                self.conn = None;
                Ok(())
            }
            Step::RollBack => self.roll_back().await,
            Step::ResumePolicy => self.resume_policy().await,
            Step::Finish => Ok(()),
        };
        // A cancel that arrived while a step before the commit ran is
        // honoured as soon as the step returns.
        let cancelable = matches!(
            step,
            Step::Precheck
                | Step::PrepareTarget
                | Step::SendImage
                | Step::PreCopy
                | Step::PausePolicy
                | Step::Checkpoint
                | Step::PackState
                | Step::Transfer
        );
        match result {
            Ok(()) if cancelable && gate.is_canceled() => Outcome::Canceled,
            Ok(()) => Outcome::Done,
            Err(reason) => Outcome::Failed(reason),
        }
    }

    fn container(&self) -> Result<&Container, MigrationError> {
        self.container
            .as_ref()
            .ok_or(MigrationError::Missing("no container inspected"))
    }

    fn conn(&mut self) -> Result<&mut Box<dyn Conn>, MigrationError> {
        self.conn
            .as_mut()
            .ok_or(MigrationError::Missing("no connection to the target"))
    }

    fn plan(&self) -> Result<&StatePlan, MigrationError> {
        self.plan
            .as_ref()
            .ok_or(MigrationError::Missing("no state surveyed"))
    }

    fn target(&self) -> String {
        self.job.target.clone()
    }

    fn send_options(&self) -> SendOptions {
        SendOptions {
            zstd_level: self.job.zstd_level,
            rate_limit: self.job.rate_limit,
        }
    }

    fn header(&self, checkpoint: String) -> TransferHeader {
        TransferHeader {
            job_id: self.job.job_id.clone(),
            source_node: self.node.id.clone(),
            target_node: self.job.target.clone(),
            container: self.job.container.clone(),
            checkpoint,
        }
    }

    async fn precheck(&mut self) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let found = node.engine.inspect(&job.container).await;
        let container =
            check::found(&job.container, &node.id, found).map_err(MigrationError::Precheck)?;
        check_ready(
            node,
            &job.container,
            &container,
            &job.target,
            Duration::ZERO,
        )
        .await
        .map_err(MigrationError::Precheck)?;
        tcp_plan(node, job, &container.id).await?;
        // The mounts decide whether it can move at all; the spec was
        // inspected before anything changes its restart policy.
        let plan = node
            .engine
            .survey(&container.name, job.bind_mounts)
            .await
            .map_err(|e| MigrationError::Survey(Box::new(e)))?;
        let memory = node.engine.memory_usage(&container.id).await.unwrap_or(0);
        let files = node
            .engine
            .estimate_state_bytes(&container.id, &plan)
            .await
            .map_err(|e| MigrationError::Survey(Box::new(e)))?;
        let estimate = memory.saturating_add(files);
        let root = &node.engine_info.root_dir;
        let free = crate::sysinfo::free_disk(root).unwrap_or(u64::MAX);
        check::room(&node.id, "engine root", root, free, estimate)
            .map_err(MigrationError::Precheck)?;
        let mut container = container;
        // The target creates each anonymous volume under its name here.
        volumes::name_anonymous_volumes(&mut container.spec.create_body, &plan.volumes);
        self.estimate = estimate;
        self.container = Some(container);
        self.plan = Some(plan);
        Ok(())
    }

    async fn prepare_target(&mut self) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let addr = node
            .peers
            .get(&job.target)
            .and_then(|p| p.data_addr)
            .ok_or_else(|| CheckError::NoDataAddress {
                node: job.target.clone(),
            })?;
        let prepare = ToTarget::Prepare(Box::new(Prepare {
            job_id: job.job_id.clone(),
            source_node: node.id.clone(),
            target_node: job.target.clone(),
            checkpoint: checkpoint_name(&job.job_id),
            spec: self.container()?.spec.clone(),
            state: Some(self.plan()?.clone()),
            estimate_bytes: self.estimate,
            arch: node.engine_info.arch.clone(),
            page_size: node.page_size,
            container_id: self.container()?.id.clone(),
            order: job.order.clone(),
        }));
        let mut conn = node.dialer.dial(&job.target, &addr).await?;
        let failed = |source| MigrationError::Prepare {
            target: job.target.clone(),
            source,
        };
        protocol::send(&mut conn, &prepare).await.map_err(failed)?;
        let reply = tokio::time::timeout(
            node.timeouts.prepare,
            protocol::recv::<_, ToSource>(&mut conn),
        )
        .await
        .map_err(|_| MigrationError::PrepareTimeout {
            target: self.target(),
        })?
        .map_err(failed)?;
        self.conn = Some(conn);
        if let ToSource::SendImage { have } = reply {
            info!(job = %job.job_id, target = %job.target, layers_there = have.len(), "target lacks the image");
            self.image_wanted = Some(have.into_iter().collect());
            return Ok(());
        }
        self.prepared(reply)
    }

    /// The target's answer once it created the container.
    fn prepared(&mut self, reply: ToSource) -> Result<(), MigrationError> {
        match reply {
            ToSource::Prepared { container_id } => {
                info!(job = %self.job.job_id, target = %self.job.target, %container_id, "target prepared");
                self.prepared = true;
                Ok(())
            }
            ToSource::Refused { reason } => Err(MigrationError::Refused {
                target: self.target(),
                reason,
            }),
            other => Err(MigrationError::UnexpectedPrepareAnswer {
                target: self.target(),
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Sends the layers the target lacks (if it asked), as a stream of its
    /// own on the data connection, then waits for `Prepared`.
    async fn send_image(&mut self, machine: &mut SourceMachine) -> Result<(), MigrationError> {
        let Some(have) = self.image_wanted.take() else {
            return Ok(());
        };
        let (node, job) = (self.node, self.job);
        let image = self.plan()?.image.clone();
        let dir = node
            .work_dir
            .join("staging")
            .join(format!("{}@image", job.job_id));
        let sent = self.export_and_send(&image, &have, &dir).await;
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            warn!(job = %job.job_id, error = %e, "cannot remove the exported image");
        }
        let bytes_wire = sent?;
        machine.image_sent(bytes_wire);
        let failed = |source| MigrationError::Prepare {
            target: job.target.clone(),
            source,
        };
        let conn = self.conn()?;
        let reply =
            tokio::time::timeout(node.timeouts.prepare, protocol::recv::<_, ToSource>(conn))
                .await
                .map_err(|_| MigrationError::PrepareTimeout {
                    target: job.target.clone(),
                })?
                .map_err(failed)?;
        self.prepared(reply)
    }

    /// Returns the image's bytes on the wire.
    async fn export_and_send(
        &mut self,
        image: &crate::runtime::images::ImageRef,
        have: &HashSet<String>,
        dir: &std::path::Path,
    ) -> Result<u64, MigrationError> {
        let (node, job) = (self.node, self.job);
        let export_failed = |source| MigrationError::ExportImage {
            target: job.target.clone(),
            source: Box::new(source),
        };
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| export_failed(state::StateError::io(dir, "creating", e)))?;
        let export = node
            .engine
            .export_image(image, have, &dir.join(IMAGE_TAR))
            .await
            .map_err(export_failed)?;
        let header = self.header(format!("{}@image", checkpoint_name(&job.job_id)));
        let options = self.send_options();
        let conn = self.conn()?;
        let report = wire::send_checkpoint(conn, &header, dir, &options, |_| {})
            .await
            .map_err(|source| MigrationError::SendImage {
                target: job.target.clone(),
                source,
            })?;
        info!(
            job = %job.job_id,
            image = %image.id,
            tar_bytes = export.tar_bytes,
            layers_sent = export.layers_sent,
            layers_left_out = export.layers_left_out,
            bytes_wire = report.bytes_wire,
            "image sent"
        );
        Ok(report.bytes_wire)
    }

    /// Pre-copy rounds while the container runs, unless the job or the
    /// container's connections rule them out; the status says which.
    async fn precopy(&mut self, machine: &mut SourceMachine) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let mut report = PreCopyReport::default();
        if job.precopy == PreCopyMode::Off {
            report.note = Some("pre-copy off (job option precopy = \"off\")".into());
            machine.precopied(report, now_ms());
            return Ok(());
        }
        let id = self.container()?.id.clone();
        let tcp = tcp_plan(node, job, &id).await?;
        if let Some(why) = precopy::skip_reason(tcp) {
            info!(job = %job.job_id, %why, "no pre-copy");
            report.note = Some(why);
            machine.precopied(report, now_ms());
            return Ok(());
        }
        let base = node.work_dir.join("precopy").join(&job.job_id);
        let result = self.precopy_rounds(&id, &base, &mut report, machine).await;
        if let Err(e) = tokio::fs::remove_dir_all(&base).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(job = %job.job_id, error = %e, "cannot remove the pre-copy folder");
            }
        }
        machine.precopied(report, now_ms());
        result
    }

    async fn precopy_rounds(
        &mut self,
        id: &str,
        base: &Path,
        report: &mut PreCopyReport,
        machine: &mut SourceMachine,
    ) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let name = checkpoint_name(&job.job_id);
        let options = CheckpointOptions {
            tcp: TcpDump::Plain,
        };
        let mut known = Known::default();
        let mut new_bytes = Vec::new();
        let gate = self.gate;
        for round in 1.. {
            if gate.is_canceled() {
                return Ok(());
            }
            let start = Instant::now();
            let dump = base.join("dump");
            let send = base.join("send");
            // The dump and its hashing leave the connection idle: the
            // target hears keepalives meanwhile, as during the checkpoint.
            let mut dumped = None;
            let work = async {
                match node
                    .engine
                    .dump_running(id, &format!("{name}-pre{round}"), &dump, options)
                    .await
                {
                    Ok(()) => {}
                    Err(RuntimeError::Unsupported(why)) if round == 1 => {
                        dumped = Some(Err(why));
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(MigrationError::PreCopyDump {
                            round,
                            source: Box::new(e),
                        })
                    }
                }
                let (dump2, send2, known2) =
                    (dump.clone(), send.clone(), std::mem::take(&mut known));
                let encoded = tokio::task::spawn_blocking(move || {
                    precopy::encode_round(&dump2, &send2, &known2)
                })
                .await
                .map_err(MigrationError::PreCopyTask)??;
                dumped = Some(Ok(encoded));
                Ok(())
            };
            let mut conn = self.conn.take();
            let result = keeping_alive(conn.as_mut(), "precopy", Some(dump.clone()), work).await;
            self.conn = conn;
            if let Some(reason) = result? {
                return Err(MigrationError::TargetFailedEarly {
                    target: job.target.clone(),
                    phase: "precopy",
                    reason,
                });
            }
            let (st, hashes) = match dumped {
                Some(Ok(encoded)) => encoded,
                Some(Err(why)) => {
                    let why = format!("pre-copy skipped: {why}");
                    info!(job = %job.job_id, %why, "no pre-copy");
                    report.note = Some(why);
                    return Ok(());
                }
                None => return Err(MigrationError::Missing("the pre-copy dump's result")),
            };
            let _ = tokio::fs::remove_dir_all(&dump).await;
            self.tell_sending().await?;
            let header = self.header(format!("{name}@pre{round}"));
            let opts = self.send_options();
            let conn = self.conn()?;
            let sent = tokio::select! {
                biased;
                _ = gate.canceled() => return Ok(()),
                r = wire::send_checkpoint(conn, &header, &send, &opts, |_| {}) => r,
            }
            .map_err(|source| MigrationError::PreCopySend {
                round,
                target: job.target.clone(),
                source,
            })?;
            let _ = tokio::fs::remove_dir_all(&send).await;
            known = Known::new(hashes);
            let r = PreCopyRound {
                bytes_pages: st.bytes,
                bytes_new: st.literal_bytes(),
                bytes_wire: sent.bytes_wire,
                ms: start.elapsed().as_millis() as u64,
            };
            info!(job = %job.job_id, round, ?r, known_blocks = known.len(), index_bytes = known.heap_bytes(), "pre-copy round sent");
            report.rounds.push(r);
            machine.precopied(report.clone(), now_ms());
            node.publish_job(machine.status()).await;
            new_bytes.push(r.bytes_new);
            match precopy::next_after(&new_bytes, st.bytes) {
                Next::Round => {}
                Next::FinalDelta => {
                    self.known = Some(known);
                    return Ok(());
                }
                Next::FinalWhole { note } => {
                    info!(job = %job.job_id, %note, "pre-copy gave up");
                    report.note = Some(note);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn pause_policy(&mut self) -> Result<(), MigrationError> {
        if !self.prepared {
            return Err(MigrationError::Missing(
                "the target never answered Prepared",
            ));
        }
        let id = &self.container()?.id;
        let before = self
            .node
            .engine
            .pause_restart_policy(id)
            .await
            .map_err(|e| MigrationError::PausePolicy(Box::new(e)))?;
        self.paused_policy = Some(before);
        Ok(())
    }

    async fn resume_policy(&mut self) -> Result<(), MigrationError> {
        let policy = match &self.paused_policy {
            Some(p) => p.clone(),
            None => self.plan()?.restart_policy.clone(),
        };
        let id = &self.container()?.id;
        self.node
            .engine
            .set_restart_policy(id, &policy)
            .await
            .map_err(|source| MigrationError::ResumePolicy {
                node: self.node.id.clone(),
                source: Box::new(source),
            })
    }

    /// Files and volumes go into the checkpoint folder, and travel with it.
    async fn pack_state(&mut self, machine: &mut SourceMachine) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let id = &self.container()?.id;
        let dir = node
            .engine
            .checkpoint_dir(id, &checkpoint_name(&job.job_id))
            .await
            .map_err(MigrationError::CheckpointDir)?;
        let report = node
            .engine
            .pack_state(id, self.plan()?, &dir)
            .await
            .map_err(|e| MigrationError::PackState(Box::new(e)))?;
        machine.state_packed(report.bytes());
        info!(
            job = %job.job_id,
            bytes = report.bytes(),
            files = report.rootfs.files,
            volumes = report.volumes.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "files and volumes packed"
        );
        Ok(())
    }

    async fn checkpoint(&mut self, machine: &mut SourceMachine) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let id = self.container()?.id.clone();
        // Again right before the dump: a connection opened since the
        // precheck must not make a checkpoint that cannot be restored.
        let tcp = match tcp_plan(node, job, &id).await {
            Err(MigrationError::Precheck(CheckError::Tcp { refusal, .. })) => {
                return Err(MigrationError::TcpAtCheckpoint(refusal))
            }
            other => other?,
        };
        let done = node
            .engine
            .checkpoint(
                &id,
                &checkpoint_name(&job.job_id),
                CheckpointOptions { tcp },
            )
            .await
            .map_err(MigrationError::Checkpoint)?;
        info!(job = %job.job_id, via = ?done.via, dir = %done.dir.display(), ?tcp, "checkpointed");
        machine.checkpointed(&done.via, now_ms());
        Ok(())
    }

    /// Runs a step that leaves the connection idle (checkpoint, pack) with
    /// keepalives to the target; see [`keeping_alive`].
    async fn idle_step(
        &mut self,
        step: Step,
        machine: &mut SourceMachine,
    ) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let dir = match &self.container {
            Some(c) => node
                .engine
                .checkpoint_dir(&c.id, &checkpoint_name(&job.job_id))
                .await
                .ok(),
            None => None,
        };
        let mut conn = self.conn.take();
        let (phase, result) = match step {
            Step::Checkpoint => {
                let work = self.checkpoint(machine);
                (
                    "checkpoint",
                    keeping_alive(conn.as_mut(), "checkpoint", dir, work).await,
                )
            }
            _ => {
                let work = self.pack_state(machine);
                (
                    "pack",
                    keeping_alive(conn.as_mut(), "pack", dir, work).await,
                )
            }
        };
        self.conn = conn;
        let heard = result?;
        match heard {
            Some(reason) => Err(MigrationError::TargetFailedEarly {
                target: job.target.clone(),
                phase,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Ends the keepalives: a stream follows at once.
    async fn tell_sending(&mut self) -> Result<(), MigrationError> {
        let target = self.job.target.clone();
        protocol::send(self.conn()?, &ToTarget::Sending)
            .await
            .map_err(|e| MigrationError::Transfer {
                target,
                source: match e {
                    protocol::ProtocolError::Stream(s) => s,
                    protocol::ProtocolError::Closed => {
                        crate::stream::StreamError::Truncated("the target closed".into())
                    }
                },
            })
    }

    async fn transfer(&mut self, machine: &mut SourceMachine) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let dir = node
            .engine
            .checkpoint_dir(&self.container()?.id, &checkpoint_name(&job.job_id))
            .await
            .map_err(MigrationError::CheckpointDir)?;
        let header = self.header(checkpoint_name(&job.job_id));
        let options = self.send_options();
        // After pre-copy the page images go as deltas, from a mirror of
        // the folder next to it (hard links); the folder stays whole for a
        // rollback.
        let mut delta_dir: Option<PathBuf> = None;
        let dir = match self.known.take() {
            None => dir,
            Some(known) => {
                let start = Instant::now();
                let out = dir.with_file_name(format!("{}-delta", checkpoint_name(&job.job_id)));
                let (from, to) = (dir.clone(), out.clone());
                let encoded =
                    tokio::task::spawn_blocking(move || precopy::encode_final(&from, &to, &known))
                        .await
                        .map_err(MigrationError::PreCopyTask)?;
                delta_dir = Some(out.clone());
                let st = match encoded {
                    Ok(st) => st,
                    Err(e) => {
                        let _ = tokio::fs::remove_dir_all(&out).await;
                        return Err(e.into());
                    }
                };
                let mut report = machine.status().precopy.clone().unwrap_or_default();
                report.final_round = Some(PreCopyRound {
                    bytes_pages: st.bytes,
                    bytes_new: st.literal_bytes(),
                    bytes_wire: 0,
                    ms: start.elapsed().as_millis() as u64,
                });
                machine.precopied(report, now_ms());
                info!(job = %job.job_id, pages = st.bytes, new = st.literal_bytes(), delta = st.delta_bytes, encode_ms = start.elapsed().as_millis() as u64, "final dump encoded against pre-copy");
                out
            }
        };
        let result = self.send_final(machine, &header, &dir, &options).await;
        if let Some(out) = delta_dir {
            if let Err(e) = tokio::fs::remove_dir_all(&out).await {
                warn!(job = %job.job_id, error = %e, "cannot remove the delta folder");
            }
        }
        let wire = result?;
        if let Some(mut report) = machine.status().precopy.clone() {
            if let Some(f) = report.final_round.as_mut() {
                f.bytes_wire = wire;
                machine.precopied(report, now_ms());
            }
        }
        Ok(())
    }

    /// Sends the checkpoint folder `dir`, publishing progress; returns the
    /// bytes on the wire.
    async fn send_final(
        &mut self,
        machine: &mut SourceMachine,
        header: &TransferHeader,
        dir: &Path,
        options: &SendOptions,
    ) -> Result<u64, MigrationError> {
        let (node, job) = (self.node, self.job);
        self.tell_sending().await?;
        let (tx, mut rx) = watch::channel(Progress {
            bytes_raw: 0,
            bytes_wire: 0,
            rate_bps: 0,
        });
        let conn = self.conn()?;
        let send = wire::send_checkpoint(conn, header, dir, options, move |p| {
            let _ = tx.send(p);
        });
        tokio::pin!(send);
        let mut tick = tokio::time::interval(node.timeouts.progress_every);
        let report = loop {
            tokio::select! {
                r = &mut send => break r,
                _ = tick.tick() => {
                    if rx.has_changed().unwrap_or(false) {
                        let p = *rx.borrow_and_update();
                        machine.progress(p.bytes_raw, p.bytes_wire, p.rate_bps, now_ms());
                        node.publish_job(machine.status()).await;
                    }
                }
            }
        }
        .map_err(|source| MigrationError::Transfer {
            target: job.target.clone(),
            source,
        })?;
        machine.progress(
            report.bytes_raw,
            report.bytes_wire,
            report.rate_bps,
            now_ms(),
        );
        info!(
            job = %job.job_id,
            bytes_raw = report.bytes_raw,
            bytes_wire = report.bytes_wire,
            rate_bps = report.rate_bps,
            "checkpoint sent"
        );
        Ok(report.bytes_wire)
    }

    async fn await_restore(&mut self) -> Result<(), MigrationError> {
        let wait = self.node.timeouts.restore;
        let conn = self.conn()?;
        let reply = tokio::time::timeout(wait, protocol::recv::<_, ToSource>(conn)).await;
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Err(_) => {
                self.restore_unknown = true;
                return Err(MigrationError::RestoreTimeout);
            }
            Ok(Err(e)) => {
                self.restore_unknown = true;
                return Err(MigrationError::AwaitRestore(e));
            }
        };
        match reply {
            ToSource::Restored => {
                self.restored = true;
                Ok(())
            }
            ToSource::Failed { reason } => Err(MigrationError::RestoreFailedOnTarget { reason }),
            other => Err(MigrationError::UnexpectedRestoreAnswer {
                answer: format!("{other:?}"),
            }),
        }
    }

    async fn commit(&mut self) -> Result<(), MigrationError> {
        let wait = self.node.timeouts.commit;
        let conn = self.conn()?;
        let unconfirmed = MigrationError::CommitUnconfirmed;
        let told = match protocol::send(conn, &ToTarget::Commit).await {
            Err(e) => Err(unconfirmed(Unconfirmed::Send(e))),
            Ok(()) => match tokio::time::timeout(wait, protocol::recv::<_, ToSource>(conn)).await {
                Ok(Ok(ToSource::Committed)) => {
                    self.confirmed = true;
                    Ok(())
                }
                Ok(Ok(other)) => Err(unconfirmed(Unconfirmed::Answer(format!("{other:?}")))),
                Ok(Err(e)) => Err(unconfirmed(Unconfirmed::Recv(e))),
                Err(_) => Err(unconfirmed(Unconfirmed::Timeout)),
            },
        };
        match told {
            Ok(()) => {}
            // The decision is journaled: the target asks for it and keeps
            // its copy, so the original goes as after a confirmed commit.
            Err(e) if self.node.journal.is_some() => {
                warn!(job = %self.job.job_id, error = %e, "commit not confirmed; the target learns it from the journal");
            }
            Err(e) => return Err(e),
        }
        self.conn = None;
        // Removing the stopped original also removes its checkpoint folder.
        let node = self.node;
        node.engine
            .remove(&self.container()?.id)
            .await
            .map_err(MigrationError::RemoveOriginal)?;
        // Only now, and only those no other container mounts.
        let volumes = &self.plan()?.volumes;
        let removed = node
            .engine
            .remove_unused_volumes(volumes)
            .await
            .map_err(|e| MigrationError::RemoveVolumes(Box::new(e)))?;
        let kept: Vec<&str> = volumes
            .iter()
            .map(|v| v.name.as_str())
            .filter(|v| !removed.iter().any(|r| r == v))
            .collect();
        info!(job = %self.job.job_id, ?removed, ?kept, "source volumes after the commit");
        Ok(())
    }

    async fn roll_back(&mut self) -> Result<(), MigrationError> {
        // First let the target drop its copy: a target that never said
        // `Restored` removes it when the connection ends.
        self.conn = None;
        if !self.restored {
            self.confirmed = true;
        }
        if self.restore_unknown && self.node.journal.is_some() {
            if let Some(name) = self.container.as_ref().map(|c| c.spec.name.clone()) {
                let (node, job) = (self.node, self.job);
                await_target_empty(node, job, &name).await;
            }
        }
        let node = self.node;
        let id = &self.container()?.id;
        let current = node
            .engine
            .inspect(id)
            .await
            .map_err(MigrationError::RollbackInspect)?;
        let name = checkpoint_name(&self.job.job_id);
        if !current.running {
            // The packed files and volumes need not reach the engine's copy
            // of the images; the originals never left. Best effort: CRIU
            // ignores a folder it does not know.
            let discarded = match node.engine.checkpoint_dir(id, &name).await {
                Ok(dir) => state::discard_state(&dir).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = discarded {
                warn!(job = %self.job.job_id, %error, "rolling back with the packed state left in the checkpoint");
            }
            node.engine
                .restore(id, &name)
                .await
                .map_err(|source| MigrationError::Rollback {
                    node: node.id.clone(),
                    source: Box::new(source),
                })?;
        }
        if let Err(e) = node.engine.delete_checkpoint(id, &name).await {
            warn!(job = %self.job.job_id, error = %e, "rolled back, but the checkpoint could not be deleted");
        }
        Ok(())
    }
}

/// The target may have restored a copy before it went away: the
/// journaled abort reaches it when it asks (its agent restarted, or the
/// restore it was in ended), and it removes the copy. Waits, asking, for
/// it to hold nothing, so the original does not come back beside a copy;
/// after [`TARGET_EMPTY_WAIT`] the original comes back regardless
/// (logged; the README's known limits).
async fn await_target_empty<E: Engine>(node: &Node<E>, job: &MigrateJob, name: &str) {
    let started = Instant::now();
    let mut last = super::recovery::Answer::NotAsked;
    while started.elapsed() < TARGET_EMPTY_WAIT {
        last = super::recovery::ask_holding(node, &job.target, None, &job.job_id, name).await;
        if last == super::recovery::Answer::Target(super::recovery::Holding::Nothing) {
            info!(job = %job.job_id, waited_ms = started.elapsed().as_millis() as u64, "the target holds nothing; restoring the original");
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    warn!(job = %job.job_id, target = %job.target, ?last, "the target did not say it holds nothing; restoring the original regardless");
}

/// Runs `work` while telling the target every
/// [`KEEPALIVE_EVERY`](protocol::KEEPALIVE_EVERY) that this side is at
/// `phase` with so many bytes in the checkpoint folder `dir`, and listening
/// for the target's `Failed` (its agent stops). Returns what `work` returned
/// and, if the target failed or went away meanwhile, why.
async fn keeping_alive<F>(
    conn: Option<&mut Box<dyn Conn>>,
    phase: &str,
    dir: Option<std::path::PathBuf>,
    work: F,
) -> Result<Option<String>, MigrationError>
where
    F: std::future::Future<Output = Result<(), MigrationError>>,
{
    let Some(conn) = conn else {
        return work.await.map(|()| None);
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    tokio::pin!(work);
    let listen = protocol::recv::<_, ToSource>(&mut rd);
    tokio::pin!(listen);
    let mut tick = tokio::time::interval(protocol::KEEPALIVE_EVERY);
    let mut heard: Option<String> = None;
    loop {
        tokio::select! {
            r = &mut work => return r.map(|()| heard),
            _ = tick.tick(), if heard.is_none() => {
                let bytes = dir.as_deref().map_or(0, crate::sysinfo::tree_bytes);
                let msg = ToTarget::Progress { phase: phase.to_owned(), bytes };
                if let Err(e) = protocol::send(&mut wr, &msg).await {
                    heard = Some(format!("cannot tell it progress: {e}"));
                }
            }
            msg = &mut listen, if heard.is_none() => {
                heard = Some(match msg {
                    Ok(ToSource::Failed { reason } | ToSource::Refused { reason }) => reason,
                    Ok(other) => format!("unexpected answer {other:?}"),
                    Err(e) => e.to_string(),
                });
            }
        }
    }
}
