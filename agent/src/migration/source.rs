//! Drives a migration on the node that holds the container: performs each
//! step the [`SourceMachine`] asks for, feeds back the outcome and publishes
//! the job's status. Cancels reach it through the job's [`CommitGate`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::check::{self, CheckError};
use super::gate::CommitGate;
use super::machine::{Outcome, SourceMachine, Step};
use super::protocol::{self, Prepare, ToSource, ToTarget};
use super::{checkpoint_name, now_ms, Conn, JobGuard, MigrationError, Node, Unconfirmed};
use crate::mqtt::contract::{JobStatus, Role};
use crate::runtime::{networks, sockets, CheckpointOptions, Container, Engine, TcpDump, TcpMode};
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
}

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

/// Runs the job to its final state; `guard` keeps it registered meanwhile.
pub async fn run<E: Engine>(node: Arc<Node<E>>, job: MigrateJob, guard: JobGuard) -> JobStatus {
    let status = JobStatus::new(
        &job.job_id,
        &node.id,
        Role::Source,
        &job.container,
        &node.id,
        &job.target,
        now_ms(),
    );
    let mut machine = SourceMachine::new(status, now_ms());
    let mut driver = Driver {
        node: &node,
        job: &job,
        gate: guard.gate(),
        container: None,
        conn: None,
        estimate: 0,
    };
    loop {
        node.publish_job(machine.status()).await;
        let step = machine.step();
        if step == Step::Finish {
            break;
        }
        let outcome = driver.perform(step, &mut machine).await;
        if let Outcome::Failed(reason) = &outcome {
            warn!(job = %job.job_id, ?step, %reason, "step failed");
        }
        machine.on(outcome, now_ms());
    }
    let status = machine.status().clone();
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
}

impl<E: Engine> Driver<'_, E> {
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
            // Not interruptible: the engine finishes the call regardless.
            Step::Checkpoint => self.checkpoint(machine).await,
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
            Step::Finish => Ok(()),
        };
        // A cancel that arrived while a step before the commit ran is
        // honoured as soon as the step returns.
        let cancelable = matches!(
            step,
            Step::Precheck | Step::PrepareTarget | Step::Checkpoint | Step::Transfer
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

    fn target(&self) -> String {
        self.job.target.clone()
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
        let estimate = node.engine.memory_usage(&container.id).await.unwrap_or(0);
        let root = &node.engine_info.root_dir;
        let free = crate::sysinfo::free_disk(root).unwrap_or(u64::MAX);
        check::room(&node.id, "engine root", root, free, estimate)
            .map_err(MigrationError::Precheck)?;
        self.estimate = estimate;
        self.container = Some(container);
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
            estimate_bytes: self.estimate,
            arch: node.engine_info.arch.clone(),
            page_size: node.page_size,
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
        match reply {
            ToSource::Prepared { container_id } => {
                info!(job = %job.job_id, target = %job.target, %container_id, "target prepared");
                self.conn = Some(conn);
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

    async fn transfer(&mut self, machine: &mut SourceMachine) -> Result<(), MigrationError> {
        let (node, job) = (self.node, self.job);
        let dir = node
            .engine
            .checkpoint_dir(&self.container()?.id, &checkpoint_name(&job.job_id))
            .await
            .map_err(MigrationError::CheckpointDir)?;
        let header = TransferHeader {
            job_id: job.job_id.clone(),
            source_node: node.id.clone(),
            target_node: job.target.clone(),
            container: job.container.clone(),
            checkpoint: checkpoint_name(&job.job_id),
        };
        let options = SendOptions {
            zstd_level: job.zstd_level,
            rate_limit: job.rate_limit,
        };
        let (tx, mut rx) = watch::channel(Progress {
            bytes_raw: 0,
            bytes_wire: 0,
            rate_bps: 0,
        });
        let conn = self.conn()?;
        let send = wire::send_checkpoint(conn, &header, &dir, &options, move |p| {
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
        Ok(())
    }

    async fn await_restore(&mut self) -> Result<(), MigrationError> {
        let wait = self.node.timeouts.restore;
        let conn = self.conn()?;
        let reply = tokio::time::timeout(wait, protocol::recv::<_, ToSource>(conn))
            .await
            .map_err(|_| MigrationError::RestoreTimeout)?
            .map_err(MigrationError::AwaitRestore)?;
        match reply {
            ToSource::Restored => Ok(()),
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
        protocol::send(conn, &ToTarget::Commit)
            .await
            .map_err(|e| unconfirmed(Unconfirmed::Send(e)))?;
        match tokio::time::timeout(wait, protocol::recv::<_, ToSource>(conn)).await {
            Ok(Ok(ToSource::Committed)) => {}
            Ok(Ok(other)) => return Err(unconfirmed(Unconfirmed::Answer(format!("{other:?}")))),
            Ok(Err(e)) => return Err(unconfirmed(Unconfirmed::Recv(e))),
            Err(_) => return Err(unconfirmed(Unconfirmed::Timeout)),
        }
        self.conn = None;
        // Removing the stopped original also removes its checkpoint folder.
        self.node
            .engine
            .remove(&self.container()?.id)
            .await
            .map_err(MigrationError::RemoveOriginal)
    }

    async fn roll_back(&mut self) -> Result<(), MigrationError> {
        // First let the target drop its copy.
        self.conn = None;
        let node = self.node;
        let id = &self.container()?.id;
        let current = node
            .engine
            .inspect(id)
            .await
            .map_err(MigrationError::RollbackInspect)?;
        let name = checkpoint_name(&self.job.job_id);
        if !current.running {
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
