//! Drives a migration on the node that holds the container: performs each
//! step the [`SourceMachine`] asks for and publishes the job's status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

use super::machine::{Outcome, SourceMachine, Step};
use super::protocol::{self, Prepare, ToSource, ToTarget};
use super::{checkpoint_name, now_ms, JobHandle, Node};
use crate::mqtt::contract::{JobStatus, Role};
use crate::runtime::{Container, Engine};
use crate::stream::wire::{self, Progress, SendOptions, TransferHeader};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The target prechecks and creates the container before answering.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Docker's restore path copies the images through containerd: allow for
/// large checkpoints on slow SD cards.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Status updates during a transfer, at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A migrate job as accepted from MQTT.
#[derive(Debug, Clone)]
pub struct MigrateJob {
    pub job_id: String,
    pub container: String,
    pub target: String,
    pub rate_limit: Option<u64>,
    pub zstd_level: i32,
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// What the steps share as the job goes on.
struct Run {
    container: Option<Container>,
    conn: Option<Box<dyn Conn>>,
    estimate: u64,
}

pub async fn run<E: Engine>(node: Arc<Node<E>>, job: MigrateJob, handle: JobHandle) -> JobStatus {
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
    let mut run = Run {
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
        let outcome = perform(&node, &job, &handle, &mut run, &mut machine, step).await;
        if let Outcome::Failed(reason) = &outcome {
            warn!(job = %job.job_id, ?step, %reason, "step failed");
        }
        machine.on(outcome, now_ms());
    }
    let status = machine.status().clone();
    info!(job = %job.job_id, state = ?status.state, error = ?status.error, "migration ended");
    status
}

async fn perform<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    handle: &JobHandle,
    run: &mut Run,
    machine: &mut SourceMachine,
    step: Step,
) -> Outcome {
    let cancel = &handle.cancel;
    let result = match step {
        Step::Precheck => precheck(node, job, run).await,
        Step::PrepareTarget => {
            tokio::select! {
                r = prepare_target(node, job, run) => r,
                _ = cancel.cancelled() => return Outcome::Canceled,
            }
        }
        Step::Checkpoint => {
            // Not interruptible: the engine finishes the call regardless.
            let r = checkpoint(node, job, run).await;
            if r.is_ok() && cancel.is_cancelled() {
                return Outcome::Canceled;
            }
            r
        }
        Step::Transfer => {
            tokio::select! {
                r = transfer(node, job, run, machine) => r,
                _ = cancel.cancelled() => return Outcome::Canceled,
            }
        }
        Step::AwaitRestore => {
            let r = tokio::select! {
                r = await_restore(run) => r,
                _ = cancel.cancelled() => return Outcome::Canceled,
            };
            if r.is_ok() && !handle.try_commit() {
                return Outcome::Canceled;
            }
            r
        }
        Step::Commit => commit(node, run).await,
        Step::Abort => {
            // Closing the connection tells the target to drop its copy.
            run.conn = None;
            Ok(())
        }
        Step::RollBack => roll_back(node, job, run).await,
        Step::Finish => Ok(()),
    };
    match result {
        Ok(()) if step == Step::Precheck && cancel.is_cancelled() => Outcome::Canceled,
        Ok(()) => Outcome::Done,
        Err(reason) => Outcome::Failed(reason),
    }
}

async fn precheck<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    run: &mut Run,
) -> Result<(), String> {
    let container = node
        .engine
        .inspect(&job.container)
        .await
        .map_err(|e| format!("precheck: {e}"))?;
    if !container.running {
        return Err(format!(
            "precheck: container {} is not running",
            job.container
        ));
    }
    if let Err(why) = &node.criu {
        return Err(format!(
            "precheck: CRIU does not work on {}: {why}",
            node.id
        ));
    }
    let peer = node.peer(&job.target).ok_or_else(|| {
        format!(
            "precheck: target node {} is unknown (no status seen)",
            job.target
        )
    })?;
    if !peer.online {
        return Err(format!("precheck: target node {} is offline", job.target));
    }
    if peer.data_addr.is_none() {
        return Err(format!(
            "precheck: target node {} advertises no data address",
            job.target
        ));
    }
    if peer.arch != node.engine_info.arch {
        return Err(format!(
            "precheck: engine arch differs: {} runs {}, target {} runs {}",
            node.id, node.engine_info.arch, job.target, peer.arch
        ));
    }
    if peer.page_size != node.page_size {
        return Err(format!(
            "precheck: kernel page size differs: {} has {}, target {} has {}",
            node.id, node.page_size, job.target, peer.page_size
        ));
    }
    if peer.criu.is_none() {
        return Err(format!(
            "precheck: CRIU does not work on target {}",
            job.target
        ));
    }
    let estimate = node.engine.memory_usage(&container.id).await.unwrap_or(0);
    let free = crate::sysinfo::free_disk(&node.engine_info.root_dir).unwrap_or(u64::MAX);
    if free < estimate {
        return Err(format!(
            "precheck: {} has {free} bytes free under {} for a checkpoint of about {estimate} bytes",
            node.id,
            node.engine_info.root_dir.display()
        ));
    }
    run.estimate = estimate;
    run.container = Some(container);
    Ok(())
}

async fn connect<E: Engine>(
    node: &Node<E>,
    target: &str,
    addr: SocketAddr,
) -> Result<Box<dyn Conn>, String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {target} at {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {target} at {addr}: {e}"))?;
    tcp.set_nodelay(true).ok();
    let Some(tls) = &node.tls_client else {
        return Ok(Box::new(tcp));
    };
    // The target must present a certificate for its node id.
    let name = rustls_pki_types::ServerName::try_from(target.to_string())
        .map_err(|e| format!("node id {target} is not usable as a TLS name: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {target} at {addr} failed: {e}"))?;
    Ok(Box::new(stream))
}

async fn prepare_target<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    run: &mut Run,
) -> Result<(), String> {
    let addr: SocketAddr = node
        .peer(&job.target)
        .and_then(|p| p.data_addr)
        .ok_or_else(|| format!("target {} advertises no data address", job.target))?
        .parse()
        .map_err(|e| format!("target {} advertises a bad data address: {e}", job.target))?;
    let container = run.container.as_ref().ok_or("no container inspected")?;
    let mut conn = connect(node, &job.target, addr).await?;
    let prepare = ToTarget::Prepare(Box::new(Prepare {
        job_id: job.job_id.clone(),
        source_node: node.id.clone(),
        target_node: job.target.clone(),
        checkpoint: checkpoint_name(&job.job_id),
        spec: container.spec.clone(),
        estimate_bytes: run.estimate,
        arch: node.engine_info.arch.clone(),
        page_size: node.page_size,
    }));
    protocol::send(&mut conn, &prepare)
        .await
        .map_err(|e| format!("prepare on {}: {e}", job.target))?;
    let reply = tokio::time::timeout(PREPARE_TIMEOUT, protocol::recv::<_, ToSource>(&mut conn))
        .await
        .map_err(|_| format!("target {} did not answer the prepare in time", job.target))?
        .map_err(|e| format!("prepare on {}: {e}", job.target))?;
    match reply {
        ToSource::Prepared { container_id } => {
            info!(job = %job.job_id, target = %job.target, %container_id, "target prepared");
            run.conn = Some(conn);
            Ok(())
        }
        ToSource::Refused { reason } => Err(format!("target {} refused: {reason}", job.target)),
        other => Err(format!(
            "target {} answered {other:?} to prepare",
            job.target
        )),
    }
}

async fn checkpoint<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    run: &mut Run,
) -> Result<(), String> {
    let container = run.container.as_ref().ok_or("no container inspected")?;
    node.engine
        .checkpoint(&container.id, &checkpoint_name(&job.job_id))
        .await
        .map(|_| ())
        .map_err(|e| format!("checkpoint: {e}"))
}

async fn transfer<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    run: &mut Run,
    machine: &mut SourceMachine,
) -> Result<(), String> {
    let container = run.container.as_ref().ok_or("no container inspected")?;
    let dir: PathBuf = node
        .engine
        .checkpoint_dir(&container.id, &checkpoint_name(&job.job_id))
        .await
        .map_err(|e| format!("transfer: {e}"))?;
    let conn = run.conn.as_mut().ok_or("no connection to the target")?;
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
    let send = wire::send_checkpoint(conn, &header, &dir, &options, move |p| {
        let _ = tx.send(p);
    });
    tokio::pin!(send);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
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
    .map_err(|e| format!("transfer to {}: {e}", job.target))?;
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

async fn await_restore(run: &mut Run) -> Result<(), String> {
    let conn = run.conn.as_mut().ok_or("no connection to the target")?;
    let reply = tokio::time::timeout(RESTORE_TIMEOUT, protocol::recv::<_, ToSource>(conn))
        .await
        .map_err(|_| "restore: target did not answer in time".to_string())?
        .map_err(|e| format!("restore: {e}"))?;
    match reply {
        ToSource::Restored => Ok(()),
        ToSource::Failed { reason } => Err(format!("restore on target failed: {reason}")),
        other => Err(format!("restore: unexpected answer {other:?}")),
    }
}

async fn commit<E: Engine>(node: &Node<E>, run: &mut Run) -> Result<(), String> {
    let conn = run.conn.as_mut().ok_or("no connection to the target")?;
    let unconfirmed = |e: String| {
        format!("target did not confirm the commit ({e}); the stopped original is kept with its checkpoint")
    };
    protocol::send(conn, &ToTarget::Commit)
        .await
        .map_err(|e| unconfirmed(e.to_string()))?;
    match tokio::time::timeout(COMMIT_TIMEOUT, protocol::recv::<_, ToSource>(conn)).await {
        Ok(Ok(ToSource::Committed)) => {}
        Ok(Ok(other)) => return Err(unconfirmed(format!("answer {other:?}"))),
        Ok(Err(e)) => return Err(unconfirmed(e.to_string())),
        Err(_) => return Err(unconfirmed("timeout".into())),
    }
    run.conn = None;
    let container = run.container.as_ref().ok_or("no container inspected")?;
    // Removing the stopped original also removes its checkpoint folder.
    node.engine.remove(&container.id).await.map_err(|e| {
        format!(
            "cleanup: the workload runs on the target, but the original could not be removed: {e}"
        )
    })
}

async fn roll_back<E: Engine>(
    node: &Node<E>,
    job: &MigrateJob,
    run: &mut Run,
) -> Result<(), String> {
    // First let the target drop its copy.
    run.conn = None;
    let container = run.container.as_ref().ok_or("no container inspected")?;
    let current = node
        .engine
        .inspect(&container.id)
        .await
        .map_err(|e| format!("rollback: {e}"))?;
    let name = checkpoint_name(&job.job_id);
    if !current.running {
        node.engine
            .restore(&container.id, &name)
            .await
            .map_err(|e| {
                format!(
                    "rollback: restoring the original on {} failed: {e}",
                    node.id
                )
            })?;
    }
    if let Err(e) = node.engine.delete_checkpoint(&container.id, &name).await {
        warn!(job = %job.job_id, error = %e, "rolled back, but the checkpoint could not be deleted");
    }
    Ok(())
}
