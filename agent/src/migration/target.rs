//! Serves one incoming migration on the data port: performs each step the
//! [`TargetMachine`] asks for (precheck and create, receive and verify,
//! restore, keep only once the source commits) and publishes the job's
//! status under this node's own topics.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::check::{self, Facts};
use super::gate::CommitGate;
use super::journal::{Entry, Phase};
use super::machine::{Outcome, TargetMachine, TargetStep};
use super::precopy::{self, Staged};
use super::protocol::{self, Prepare, ProtocolError, ToSource, ToTarget};
use super::recovery::{answer_decision, Decision, Holding};
use super::{now_ms, MigrationError, Node};
use crate::mqtt::contract::{JobStatus, Role};
use crate::runtime::networks::{self, Placement};
use crate::runtime::state::{StatePlan, STATE_DIR};
use crate::runtime::Engine;
use crate::stream::archive::UnpackLimits;
use crate::stream::{wire, StreamError};

/// Handles one data connection. `peer` is the node id proven by the peer's
/// certificate (`None` only on an insecure plain-TCP port).
pub async fn serve<E, S>(node: Arc<Node<E>>, mut conn: S, peer: Option<Vec<String>>)
where
    E: Engine,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let first = tokio::time::timeout(
        node.timeouts.prepare_wait,
        protocol::recv::<_, ToTarget>(&mut conn),
    )
    .await;
    let refused = match first {
        Ok(Ok(ToTarget::Prepare(prepare))) => {
            // Identity and naming checks come before anything is published.
            let checked = check::prepare_identity(&prepare, &node.id, peer.as_deref())
                .map_err(MigrationError::from)
                .and_then(|()| {
                    node.orders
                        .admit_prepare(&prepare, &node.id, crate::order::unix_now())
                        .map_err(MigrationError::from)
                });
            match checked {
                Ok(()) => {
                    match node
                        .jobs
                        .try_register(&prepare.job_id, &prepare.spec.name, Role::Target)
                    {
                        Ok(guard) => {
                            run(&node, &mut conn, &prepare, guard.gate()).await;
                            drop(guard);
                            return;
                        }
                        Err(e) => MigrationError::from(e),
                    }
                }
                Err(e) => e,
            }
        }
        Ok(Ok(ToTarget::Outcome { job_id, container })) => {
            let holding = holding(&node, &job_id, &container).await;
            info!(job = %job_id, ?peer, ?holding, "source asked what this node holds");
            let _ = protocol::send(&mut conn, &ToSource::Holding { holding }).await;
            return;
        }
        Ok(Ok(ToTarget::Decision { job_id })) => {
            let decision = decision(&node, &job_id, peer.as_deref());
            info!(job = %job_id, ?peer, ?decision, "target asked for the decision");
            let _ = protocol::send(&mut conn, &ToSource::Decided { decision }).await;
            return;
        }
        Ok(Ok(_)) => MigrationError::NotPrepare,
        Ok(Err(e)) => MigrationError::BadPrepare(e),
        Err(_) => {
            warn!(?peer, "data connection sent nothing; closed");
            return;
        }
    };
    let reason = refused.to_string();
    warn!(?peer, %reason, "data connection refused");
    let _ = protocol::send(&mut conn, &ToSource::Refused { reason }).await;
}

/// What this node holds of `container` for a source that asks during
/// recovery: a job still under way here is busy, else it runs or it is not.
pub async fn holding<E: Engine>(node: &Node<E>, job_id: &str, container: &str) -> Holding {
    if let Some(j) = &node.journal {
        match j.read(Role::Target, job_id) {
            Ok(Some(e)) if !matches!(e.phase, Phase::Restored | Phase::Commit) => {
                return Holding::Busy
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "cannot read the journal");
                return Holding::Busy;
            }
        }
    }
    let journaled = node
        .journal
        .as_ref()
        .is_some_and(|j| matches!(j.read(Role::Target, job_id), Ok(Some(_))));
    match node.engine.inspect(container).await {
        Ok(c) if c.running && journaled => Holding::Running,
        Ok(c) if c.running => Holding::Kept,
        Ok(_) => Holding::Busy,
        Err(_) => Holding::Nothing,
    }
}

/// The decision this node (the job's source) journaled, for a target that
/// asks; only the job's target may ask.
fn decision<E>(node: &Node<E>, job_id: &str, peer: Option<&[String]>) -> Decision {
    let Some(j) = &node.journal else {
        return Decision::Pending;
    };
    match j.read(Role::Source, job_id) {
        Ok(Some(e)) if peer.is_some_and(|names| !names.contains(&e.peer_node)) => {
            warn!(job = %job_id, ?peer, "a node that is not the job's target asked for its decision");
            Decision::Pending
        }
        Ok(record) => answer_decision(record.map(|e| e.phase)),
        Err(error) => {
            warn!(%error, "cannot read the journal");
            Decision::Pending
        }
    }
}

/// Asks the source for its decision until it has one: a target that runs
/// a restored copy never removes it on its own.
pub async fn learn_decision<E>(node: &Node<E>, job_id: &str, source: &str) -> Decision {
    let mut tries = 0u32;
    loop {
        match ask_decision(node, job_id, source).await {
            Ok(d @ (Decision::Commit | Decision::Abort)) => return d,
            Ok(Decision::Pending) => {}
            Err(error) if tries % 15 == 0 => {
                warn!(job = %job_id, %source, %error, "cannot learn the decision yet; asking again")
            }
            Err(_) => {}
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

pub(super) async fn ask_decision<E>(
    node: &Node<E>,
    job_id: &str,
    source: &str,
) -> Result<Decision, String> {
    let addr = node
        .peers
        .get(source)
        .and_then(|p| p.data_addr)
        .ok_or("no data address for the source yet")?;
    let mut conn = node
        .dialer
        .dial(source, &addr)
        .await
        .map_err(|e| e.to_string())?;
    let ask = ToTarget::Decision {
        job_id: job_id.to_owned(),
    };
    protocol::send(&mut conn, &ask)
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        node.timeouts.prepare,
        protocol::recv::<_, ToSource>(&mut conn),
    )
    .await
    {
        Ok(Ok(ToSource::Decided { decision })) => Ok(decision),
        Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// Runs a registered incoming job to its final state. `gate` fires when
/// this agent drains: before `Restored` the job fails, tells the source and
/// removes what it created; after it, the job waits for the commit.
async fn run<E, S>(node: &Node<E>, conn: &mut S, prepare: &Prepare, gate: &CommitGate)
where
    E: Engine,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let status = JobStatus::new(
        &prepare.job_id,
        &node.id,
        Role::Target,
        &prepare.spec.name,
        &prepare.source_node,
        &node.id,
        now_ms(),
    );
    let mut machine = TargetMachine::new(status, now_ms());
    let mut entry = Entry::new(
        Role::Target,
        &prepare.job_id,
        &prepare.spec.name,
        &prepare.checkpoint,
        &prepare.source_node,
    );
    let mut journaled = false;
    let mut driver = Driver {
        node,
        conn,
        prepare,
        staging: node.work_dir.join("staging").join(&prepare.job_id),
        container_id: None,
        image_wanted: None,
        volumes: Vec::new(),
        staged: None,
    };
    loop {
        let step = machine.step();
        if step == TargetStep::Finish {
            driver.clear_staging().await;
        }
        if let Some(status) = machine.to_publish() {
            node.publish_job(status).await;
        }
        if step == TargetStep::Finish {
            break;
        }
        let phase = match step {
            TargetStep::Precheck | TargetStep::FetchImage => Phase::Preparing,
            TargetStep::Create => Phase::Creating,
            TargetStep::Receive | TargetStep::ApplyState => Phase::Receiving,
            TargetStep::Restore => Phase::Restoring,
            TargetStep::AwaitCommit => Phase::Restored,
            TargetStep::Keep => Phase::Commit,
            TargetStep::TellFailed | TargetStep::Remove => Phase::Abort,
            TargetStep::Refuse | TargetStep::Finish => entry.phase,
        };
        let mut written = Ok(());
        if phase != entry.phase || !journaled {
            journaled = true;
            entry.phase = phase;
            entry.updated_ms = now_ms();
            entry.container_id = driver.container_id.clone();
            entry.volumes = driver.volumes.clone();
            entry.staging = Some(driver.staging.clone());
            written = node.journal_write(&entry);
            if written.is_ok() {
                super::journal::test_pause(Role::Target, phase).await;
            }
        }
        let outcome = match written {
            Ok(()) => {
                driver
                    .perform_unless_stopping(step, &mut machine, gate)
                    .await
            }
            Err(e) => Outcome::Failed(e.into()),
        };
        if let Outcome::Failed(reason) = &outcome {
            warn!(job = %prepare.job_id, ?step, %reason, "step failed");
        }
        machine.on(outcome, now_ms());
    }
    node.journal_remove(&entry);
    let status = machine.status();
    info!(job = %prepare.job_id, state = ?status.state, error = ?status.error, "incoming migration ended");
}

struct Driver<'a, E, S> {
    node: &'a Node<E>,
    conn: &'a mut S,
    prepare: &'a Prepare,
    staging: PathBuf,
    /// Set once `Create` created the container.
    container_id: Option<String>,
    /// The image is missing here; these are its layer chains that are not.
    image_wanted: Option<HashSet<String>>,
    /// Volumes created for the job.
    volumes: Vec<String>,
    /// The images pre-copy staged, and the cap on the assembled content,
    /// until `ApplyState` assembles the final images.
    staged: Option<(Staged, u64)>,
}

impl<'a, E, S> Driver<'a, E, S>
where
    E: Engine,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Steps before `Restored` stop when the agent drains: those that only
    /// wait (for the source, for the stream) at once, the engine's at their
    /// end.
    async fn perform_unless_stopping(
        &mut self,
        step: TargetStep,
        machine: &mut TargetMachine,
        gate: &CommitGate,
    ) -> Outcome {
        use TargetStep::*;
        match step {
            Precheck | FetchImage | Create if gate.is_canceled() => {
                Outcome::Failed(MigrationError::TargetStopping)
            }
            Receive => match self.receive(machine, gate).await {
                Ok(()) if gate.is_canceled() => Outcome::Failed(MigrationError::TargetStopping),
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Failed(e),
            },
            ApplyState | Restore => match self.perform(step, machine).await {
                Outcome::Done if gate.is_canceled() => {
                    Outcome::Failed(MigrationError::TargetStopping)
                }
                other => other,
            },
            _ => self.perform(step, machine).await,
        }
    }

    async fn perform(&mut self, step: TargetStep, machine: &mut TargetMachine) -> Outcome {
        let result = match step {
            TargetStep::Precheck => {
                machine.old_addresses(networks::addresses(&self.prepare.spec.networks));
                self.precheck().await
            }
            TargetStep::FetchImage => self.fetch_image(machine).await,
            TargetStep::Create => self.create().await,
            TargetStep::Receive => self.receive(machine, &CommitGate::new()).await,
            TargetStep::ApplyState => self.apply_state(machine).await,
            TargetStep::Restore => self.restore(machine).await,
            TargetStep::AwaitCommit => self.await_commit().await,
            TargetStep::Keep => self.keep().await,
            TargetStep::Refuse => {
                let reason = machine.reason();
                self.tell(ToSource::Refused { reason }).await
            }
            TargetStep::TellFailed => {
                let reason = machine.reason();
                self.tell(ToSource::Failed { reason }).await
            }
            TargetStep::Remove => self.remove().await,
            TargetStep::Finish => Ok(()),
        };
        match result {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e),
        }
    }

    fn id(&self) -> Result<&str, MigrationError> {
        self.container_id
            .as_deref()
            .ok_or(MigrationError::Missing("no container created"))
    }

    /// Best effort: a source that is gone learns nothing anyway.
    async fn tell(&mut self, msg: ToSource) -> Result<(), MigrationError> {
        let _ = protocol::send(self.conn, &msg).await;
        Ok(())
    }

    fn plan(&self) -> Option<&'a StatePlan> {
        self.prepare.state.as_ref()
    }

    /// Anything missing here is a refusal while the source still runs.
    async fn precheck(&mut self) -> Result<(), MigrationError> {
        let (node, p) = (self.node, self.prepare);
        let spec = &p.spec;
        // Before any engine call: the sender may be compromised.
        check::allowed(p, &node.id, &node.policy)?;
        check::compatible(&Facts::of_prepare(p), &node.facts())?;
        check::name_free(&spec.name, &node.id, node.engine.inspect(&spec.name).await)?;
        let mut image_bytes = 0;
        match self.plan() {
            Some(plan) => {
                self.image_wanted =
                    node.engine
                        .missing_image(&plan.image)
                        .await
                        .map_err(|source| MigrationError::ImageCheck {
                            image: plan.image.reference.clone(),
                            source: Box::new(source),
                        })?;
                if self.image_wanted.is_some() {
                    image_bytes = plan.image.size;
                }
            }
            // A source that moves memory only: the image must be here.
            None => check::image_present(
                &spec.image,
                &node.id,
                node.engine.image_exists(&spec.image).await,
            )?,
        }
        // Staging, reserved against the other incoming jobs, plus the
        // engine's own copy of the images; an image that travels lands in
        // staging, then in the engine. The reservation lasts as long as the
        // job.
        let need = p.estimate_bytes.saturating_add(image_bytes);
        let free = crate::sysinfo::free_disk(&node.work_dir).unwrap_or(u64::MAX);
        node.jobs
            .reserve_staging(&p.job_id, need, free, &node.work_dir)?;
        let root = &node.engine_info.root_dir;
        let free = crate::sysinfo::free_disk(root).unwrap_or(u64::MAX);
        check::room(&node.id, "engine root", root, free, need)?;
        Ok(())
    }

    /// Asks for the layers missing here and loads them (if the image is
    /// missing), then points the container's image reference at its id.
    async fn fetch_image(&mut self, machine: &mut TargetMachine) -> Result<(), MigrationError> {
        let (node, p) = (self.node, self.prepare);
        let Some(plan) = self.plan() else {
            return Ok(());
        };
        let place_failed = |source| MigrationError::PlaceImage {
            image: plan.image.reference.clone(),
            source: Box::new(source),
        };
        if let Some(have) = self.image_wanted.take() {
            let mut have: Vec<String> = have.into_iter().collect();
            have.sort();
            protocol::send(self.conn, &ToSource::SendImage { have })
                .await
                .map_err(MigrationError::ImageRequest)?;
            let limits = UnpackLimits::for_checkpoint(
                plan.image.size,
                crate::sysinfo::free_disk(&node.work_dir).unwrap_or(u64::MAX),
            );
            let report = wire::receive_checkpoint(&mut *self.conn, &self.staging, &limits, |h| {
                check::stream_matches(h, &p.job_id, &p.source_node).map_err(|e| e.to_string())
            })
            .await
            .map_err(MigrationError::ReceiveImage)?;
            machine.image_received(report.bytes_wire);
            let tar = self.staging.join(super::source::IMAGE_TAR);
            let loaded = node.engine.load_image(&plan.image, &tar).await;
            // The checkpoint arrives in the same staging folder.
            self.clear_staging().await;
            loaded.map_err(place_failed)?;
            info!(job = %p.job_id, image = %plan.image.id, bytes_wire = report.bytes_wire, "image loaded");
        }
        node.engine
            .tag_image(&plan.image)
            .await
            .map_err(place_failed)
    }

    /// The volumes (under the source's names), then the container.
    async fn create(&mut self) -> Result<(), MigrationError> {
        let (node, p) = (self.node, self.prepare);
        let spec = &p.spec;
        if let Some(plan) = self.plan() {
            self.volumes = node
                .engine
                .create_volumes(&plan.volumes)
                .await
                .map_err(|source| MigrationError::CreateVolumes {
                    name: spec.name.clone(),
                    node: node.id.clone(),
                    source: Box::new(source),
                })?;
        }
        let source_addr = node.peers.get(&p.source_node).and_then(|s| s.data_addr);
        let place = Placement {
            source_ip: Placement::ip_of(source_addr.as_deref()),
            target_ip: node.advertise.map(|a| a.ip()),
            existing: Vec::new(),
            host_routes: crate::sysinfo::ipv4_routes(),
        };
        let (id, notes) = networks::create_placed(&node.engine, spec, place)
            .await
            .map_err(|source| MigrationError::Create {
                name: spec.name.clone(),
                node: node.id.clone(),
                source: Box::new(source),
            })?;
        for note in notes {
            warn!(job = %p.job_id, container = %spec.name, "{note}");
        }
        self.container_id = Some(id);
        Ok(())
    }

    /// Says `Prepared`; the source checkpoints now, saying `Progress` until
    /// `Sending`, and the stream follows. A drain (`gate`) stops the wait
    /// and the stream, and the source learns why.
    async fn receive(
        &mut self,
        machine: &mut TargetMachine,
        gate: &CommitGate,
    ) -> Result<(), MigrationError> {
        let container_id = self.id()?.to_owned();
        protocol::send(self.conn, &ToSource::Prepared { container_id })
            .await
            .map_err(MigrationError::PrepareReply)?;
        let (node, p) = (self.node, self.prepare);
        // The source announced the size; a bomb or a lie stops there.
        let limits = UnpackLimits::for_checkpoint(
            p.estimate_bytes,
            crate::sysinfo::free_disk(&node.work_dir).unwrap_or(u64::MAX),
        );
        // Pre-copy rounds (`<checkpoint>@pre<n>`) come first, if any; their
        // images stay in staging of their own, two folders taken in turn.
        let mut staged = Staged::default();
        let mut round = 0usize;
        let (mut raw, mut wire_bytes) = (0u64, 0u64);
        let pre = |n: usize, what: &str| {
            node.work_dir
                .join("staging")
                .join(format!("{}@pre{}{what}", p.job_id, n % 2))
        };
        loop {
            // Each stream (a pre-copy round, the final images) follows the
            // source's keepalives and its `Sending`.
            self.await_stream_unless_stopping(gate).await?;
            let incoming = wire::read_header(&mut *self.conn)
                .await
                .map_err(MigrationError::Receive)?;
            let h = incoming.header().clone();
            let pre_name = format!("{}@pre{}", p.checkpoint, round + 1);
            let refusal = match check::stream_matches(&h, &p.job_id, &p.source_node) {
                Err(e) => Some(MigrationError::Receive(StreamError::Refused {
                    job_id: h.job_id.clone(),
                    reason: e.to_string(),
                })),
                Ok(()) if h.checkpoint != pre_name && h.checkpoint != p.checkpoint => {
                    Some(MigrationError::UnexpectedStream {
                        got: h.checkpoint.clone(),
                        expected: p.checkpoint.clone(),
                    })
                }
                Ok(()) => None,
            };
            if let Some(e) = refusal {
                let _ = incoming.refuse(&e.to_string()).await;
                return Err(e);
            }
            if h.checkpoint == p.checkpoint {
                let accepted = tokio::select! {
                    r = incoming.accept(&self.staging, &limits) => r.map_err(MigrationError::Receive),
                    _ = gate.canceled() => Err(MigrationError::TargetStopping),
                };
                let report = match accepted {
                    Ok(report) => report,
                    Err(MigrationError::TargetStopping) => {
                        let reason = MigrationError::TargetStopping.to_string();
                        wire::refuse_now(&mut *self.conn, &reason).await;
                        return Err(MigrationError::TargetStopping);
                    }
                    Err(e) => return Err(e),
                };
                raw += report.bytes_raw;
                wire_bytes += report.bytes_wire;
                if round > 0 {
                    self.staged = Some((staged, limits.max_total_bytes));
                }
                machine.received(raw, wire_bytes);
                return Ok(());
            }
            round += 1;
            let recv = pre(round, "-recv");
            let into = pre(round, "");
            for dir in [&recv, &into] {
                remove_dir(dir).await;
            }
            let report = incoming
                .accept(&recv, &limits)
                .await
                .map_err(MigrationError::Receive)?;
            raw += report.bytes_raw;
            wire_bytes += report.bytes_wire;
            tokio::fs::create_dir_all(&into).await.map_err(|source| {
                MigrationError::PlaceImages {
                    dir: into.clone(),
                    source,
                }
            })?;
            let max = limits.max_total_bytes;
            let (from, to) = (recv.clone(), into.clone());
            let (st, written) =
                tokio::task::spawn_blocking(move || precopy::assemble(&from, &to, &staged, max))
                    .await
                    .map_err(MigrationError::PreCopyTask)??;
            remove_dir(&recv).await;
            // The previous round's images are no longer referred to.
            remove_dir(&pre(round + 1, "")).await;
            staged = precopy::staged_from(written);
            info!(job = %p.job_id, round, pages = st.bytes, new = st.literal_bytes(), blocks = staged.blocks(), index_bytes = staged.index_bytes(), "pre-copy round staged");
        }
    }

    /// After pre-copy: the final images from their deltas and the staged
    /// rounds. Here rather than in `Receive` so that a failure (a checksum
    /// mismatch) reaches the source as the reason of its rollback.
    async fn assemble(&mut self) -> Result<(), MigrationError> {
        let Some((staged, max)) = self.staged.take() else {
            return Ok(());
        };
        let dir = self.staging.clone();
        let assembled =
            tokio::task::spawn_blocking(move || precopy::assemble_final(&dir, &staged, max))
                .await
                .map_err(MigrationError::PreCopyTask);
        self.clear_precopy().await;
        let (st, in_place) = assembled??;
        info!(job = %self.prepare.job_id, pages = st.bytes, new = st.literal_bytes(), in_place, "final images assembled");
        Ok(())
    }

    /// The pre-copy folders of this job.
    async fn clear_precopy(&self) {
        let staging = self.node.work_dir.join("staging");
        for n in 0..2 {
            for what in ["", "-recv"] {
                let dir = staging.join(format!("{}@pre{n}{what}", self.prepare.job_id));
                remove_dir(&dir).await;
            }
        }
    }

    /// [`Self::await_stream`], stopped by a drain (`gate`): the source then
    /// learns why.
    async fn await_stream_unless_stopping(
        &mut self,
        gate: &CommitGate,
    ) -> Result<(), MigrationError> {
        let waited = tokio::select! {
            r = self.await_stream() => r,
            _ = gate.canceled() => Err(MigrationError::TargetStopping),
        };
        if let Err(MigrationError::TargetStopping) = &waited {
            let reason = MigrationError::TargetStopping.to_string();
            let _ = protocol::send(self.conn, &ToSource::Failed { reason }).await;
        }
        waited
    }

    /// Reads the source's keepalives until `Sending`; a source silent for
    /// [`Timeouts::source_silence`](super::Timeouts) is gone.
    async fn await_stream(&mut self) -> Result<(), MigrationError> {
        let silence = self.node.timeouts.source_silence;
        let mut phase = String::from("checkpoint");
        loop {
            let msg = tokio::time::timeout(silence, protocol::recv::<_, ToTarget>(self.conn))
                .await
                .map_err(|_| MigrationError::SourceSilent {
                    phase: phase.clone(),
                    silent_s: silence.as_secs(),
                })?;
            match msg {
                Ok(ToTarget::Progress { phase: p, bytes }) => {
                    tracing::debug!(job = %self.prepare.job_id, phase = %p, bytes, "source progress");
                    phase = p;
                }
                Ok(ToTarget::Sending) => return Ok(()),
                Ok(other) => {
                    return Err(MigrationError::UnexpectedBeforeStream {
                        answer: format!("{other:?}"),
                    })
                }
                Err(ProtocolError::Closed) => return Err(MigrationError::SourceClosed),
                Err(e) => return Err(MigrationError::AwaitStream(e)),
            }
        }
    }

    /// Assembles the pre-copied images, then writes the files into the
    /// created container's layer and fills its volumes, before anything
    /// starts; the state folder leaves staging.
    async fn apply_state(&mut self, machine: &mut TargetMachine) -> Result<(), MigrationError> {
        self.assemble().await?;
        let Some(plan) = self.plan() else {
            return Ok(());
        };
        let bytes = crate::sysinfo::tree_bytes(&self.staging.join(STATE_DIR));
        let report = self
            .node
            .engine
            .apply_state(self.id()?, plan, &self.staging)
            .await
            .map_err(|e| MigrationError::ApplyState(Box::new(e)))?;
        machine.state_applied(bytes);
        info!(
            job = %self.prepare.job_id,
            bytes,
            files = report.rootfs.files,
            volumes = report.volumes.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "files and volumes applied"
        );
        Ok(())
    }

    /// Places the verified images where the engine expects them and starts
    /// the container from them.
    async fn restore(&mut self, machine: &mut TargetMachine) -> Result<(), MigrationError> {
        let (node, checkpoint) = (self.node, &self.prepare.checkpoint);
        let id = self.id()?;
        let dest = node
            .engine
            .checkpoint_dir(id, checkpoint)
            .await
            .map_err(MigrationError::Restore)?;
        move_dir(&self.staging, &dest)
            .await
            .map_err(|source| MigrationError::PlaceImages {
                dir: dest.clone(),
                source,
            })?;
        node.engine
            .restore(id, checkpoint)
            .await
            .map_err(|source| MigrationError::RestoreStart {
                node: node.id.clone(),
                source: Box::new(source),
            })?;
        tokio::time::sleep(node.timeouts.settle).await;
        let c = node
            .engine
            .inspect(id)
            .await
            .map_err(MigrationError::Restore)?;
        if !c.running {
            return Err(MigrationError::ExitedRightAway {
                name: c.name,
                node: node.id.clone(),
            });
        }
        machine.new_addresses(networks::addresses(&c.spec.networks));
        Ok(())
    }

    /// Keep the container only if the source commits: otherwise the source
    /// restores its original and this copy must go.
    async fn await_commit(&mut self) -> Result<(), MigrationError> {
        protocol::send(self.conn, &ToSource::Restored)
            .await
            .map_err(MigrationError::RestoredUntold)?;
        let wait = self.node.timeouts.commit_wait;
        let lost = match tokio::time::timeout(wait, protocol::recv::<_, ToTarget>(self.conn)).await
        {
            Ok(Ok(ToTarget::Commit)) => return Ok(()),
            Ok(Ok(other)) => {
                return Err(MigrationError::UnexpectedCommitAnswer {
                    answer: format!("{other:?}"),
                })
            }
            Ok(Err(ProtocolError::Closed)) => MigrationError::SourceClosed,
            Ok(Err(e)) => MigrationError::AwaitCommit(e),
            Err(_) => MigrationError::CommitTimeout,
        };
        if self.node.journal.is_none() {
            return Err(lost);
        }
        // The source decides; the copy stays until its decision is known.
        let (node, p) = (self.node, self.prepare);
        warn!(job = %p.job_id, source = %p.source_node, reason = %lost, "lost the source after Restored; asking it for the decision");
        match learn_decision(node, &p.job_id, &p.source_node).await {
            Decision::Commit => Ok(()),
            _ => Err(MigrationError::SourceAborted {
                after: lost.to_string(),
            }),
        }
    }

    async fn keep(&mut self) -> Result<(), MigrationError> {
        self.tell(ToSource::Committed).await?;
        let id = self.id()?;
        if let Err(e) = self
            .node
            .engine
            .delete_checkpoint(id, &self.prepare.checkpoint)
            .await
        {
            warn!(container = %id, error = %e, "restored, but cannot delete the checkpoint images");
        }
        Ok(())
    }

    /// Whatever `Create` made: the container, then its volumes.
    async fn remove(&mut self) -> Result<(), MigrationError> {
        if let Some(id) = &self.container_id {
            if let Err(e) = self.node.engine.remove(id).await {
                warn!(container = %id, error = %e, "cannot remove the container created for a failed migration");
            }
        }
        if !self.volumes.is_empty() {
            if let Err(e) = self.node.engine.remove_volumes(&self.volumes).await {
                warn!(volumes = ?self.volumes, error = %e, "cannot remove the volumes created for a failed migration");
            }
        }
        Ok(())
    }

    async fn clear_staging(&self) {
        self.clear_precopy().await;
        if let Err(e) = tokio::fs::remove_dir_all(&self.staging).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(job = %self.prepare.job_id, error = %e, "cannot remove staging folder");
            }
        }
    }
}

/// Best effort; a folder that is not there is fine.
async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "cannot remove");
        }
    }
}

/// Rename when staging and the engine root share a filesystem, else copy.
async fn move_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    match tokio::fs::rename(from, to).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            let (from, to) = (from.to_path_buf(), to.to_path_buf());
            tokio::task::spawn_blocking(move || copy_tree(&from, &to))
                .await
                .map_err(std::io::Error::other)?
        }
        Err(e) => Err(e),
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}
