//! Serves one incoming migration on the data port: precheck, create the
//! container, receive and verify the checkpoint, restore, and keep the
//! container only once the source commits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::protocol::{self, Prepare, ProtocolError, ToSource, ToTarget};
use super::{now_ms, JobHandle, Node};
use crate::mqtt::contract::{validate_id, JobState, JobStatus, Phase, Role};
use crate::runtime::Engine;
use crate::stream::archive::UnpackLimits;
use crate::stream::wire;

/// How long a restored container must stay up before it counts as running.
const SETTLE: Duration = Duration::from_millis(500);
/// The source answers `Restored` with `Commit` at once.
const COMMIT_WAIT: Duration = Duration::from_secs(60);
/// A peer that connects must say what it wants promptly.
const PREPARE_WAIT: Duration = Duration::from_secs(30);

/// The target's side of one job, published under this node's own topics.
struct TargetJob {
    status: JobStatus,
    phase_started_ms: u64,
}

impl TargetJob {
    fn enter(&mut self, phase: Phase) {
        self.close();
        self.status.phase = Some(phase);
    }

    fn close(&mut self) {
        let now = now_ms();
        if let Some(p) = self.status.phase {
            *self.status.timings_ms.entry(p).or_insert(0) +=
                now.saturating_sub(self.phase_started_ms);
        }
        self.phase_started_ms = now;
        self.status.updated_ms = now;
    }

    fn end(&mut self, state: JobState, error: Option<String>) {
        self.close();
        self.status.state = state;
        self.status.error = error;
    }
}

/// Handles one data connection. `peer` is the node id proven by the peer's
/// certificate (`None` only on an insecure plain-TCP port).
pub async fn serve<E, S>(node: Arc<Node<E>>, mut conn: S, peer: Option<Vec<String>>)
where
    E: Engine,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let first = tokio::time::timeout(PREPARE_WAIT, protocol::recv::<_, ToTarget>(&mut conn)).await;
    let prepare = match first {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let reason = format!("bad prepare: {e}");
            warn!(?peer, %reason, "data connection refused");
            let _ = protocol::send(&mut conn, &ToSource::Refused { reason }).await;
            return;
        }
        Err(_) => {
            warn!(?peer, "data connection sent nothing; closed");
            return;
        }
    };
    let ToTarget::Prepare(prepare) = prepare else {
        let _ = protocol::send(
            &mut conn,
            &ToSource::Refused {
                reason: "expected prepare as the first message".into(),
            },
        )
        .await;
        return;
    };

    let Prepare {
        job_id,
        source_node,
        target_node,
        checkpoint,
        spec,
        estimate_bytes,
        arch,
        page_size,
    } = *prepare;

    // Identity and naming checks come before anything is published.
    let identity = (|| {
        for (kind, v) in [
            ("job id", &job_id),
            ("source node", &source_node),
            ("container name", &spec.name),
        ] {
            validate_id(kind, v).map_err(|e| e.to_string())?;
        }
        if target_node != node.id {
            return Err(format!(
                "job is for node {target_node}, this is {}",
                node.id
            ));
        }
        if let Some(names) = &peer {
            if !names.iter().any(|n| n == &source_node) {
                return Err(format!(
                    "peer certificate names {names:?}, not the job's source node {source_node}"
                ));
            }
        }
        if checkpoint != super::checkpoint_name(&job_id) {
            return Err(format!(
                "checkpoint name {checkpoint:?} does not belong to job {job_id}"
            ));
        }
        Ok(())
    })();
    if let Err(reason) = identity {
        warn!(?peer, %reason, "data connection refused");
        let _ = protocol::send(&mut conn, &ToSource::Refused { reason }).await;
        return;
    }

    let handle = JobHandle::new(&spec.name, Role::Target);
    let duplicate = {
        let mut jobs = node.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let duplicate = jobs.contains_key(&job_id);
        if !duplicate {
            jobs.insert(job_id.clone(), handle);
        }
        duplicate
    };
    if duplicate {
        let reason = format!("job {job_id} is already running on {}", node.id);
        let _ = protocol::send(&mut conn, &ToSource::Refused { reason }).await;
        return;
    }
    let mut job = TargetJob {
        status: JobStatus::new(
            &job_id,
            &node.id,
            Role::Target,
            &spec.name,
            &source_node,
            &node.id,
            now_ms(),
        ),
        phase_started_ms: now_ms(),
    };
    job.status.state = JobState::InProgress;
    job.status.phase = Some(Phase::Precheck);
    node.publish_job(&job.status).await;

    let staging = node.work_dir.join("staging").join(&job_id);
    let result = receive_and_restore(
        &node,
        &mut conn,
        &mut job,
        &staging,
        &spec,
        &checkpoint,
        estimate_bytes,
        &arch,
        page_size,
    )
    .await;
    if let Err(e) = tokio::fs::remove_dir_all(&staging).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(job = %job_id, error = %e, "cannot remove staging folder");
        }
    }
    match result {
        Ok(()) => job.end(JobState::Succeeded, None),
        Err(reason) => job.end(JobState::Failed, Some(reason)),
    }
    info!(job = %job_id, state = ?job.status.state, error = ?job.status.error, "incoming migration ended");
    node.publish_job(&job.status).await;
    node.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&job_id);
}

#[allow(clippy::too_many_arguments)]
async fn receive_and_restore<E, S>(
    node: &Node<E>,
    conn: &mut S,
    job: &mut TargetJob,
    staging: &Path,
    spec: &crate::runtime::ContainerSpec,
    checkpoint: &str,
    estimate_bytes: u64,
    arch: &str,
    page_size: u64,
) -> Result<(), String>
where
    E: Engine,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Precheck and create: anything missing here is a refusal while the
    // source still runs.
    let prepared = match precheck(node, spec, estimate_bytes, arch, page_size).await {
        Ok(()) => node
            .engine
            .create(spec)
            .await
            .map_err(|e| format!("cannot create container {} on {}: {e}", spec.name, node.id)),
        Err(reason) => Err(reason),
    };
    let id = match prepared {
        Ok(id) => id,
        Err(reason) => {
            let refusal = ToSource::Refused {
                reason: reason.clone(),
            };
            let _ = protocol::send(conn, &refusal).await;
            return Err(reason);
        }
    };
    let result = async {
        protocol::send(conn, &ToSource::Prepared { container_id: id.clone() })
            .await
            .map_err(|e| format!("prepare reply: {e}"))?;
        node.publish_job(&job.status).await;

        // The source checkpoints now; the stream follows on this connection.
        job.enter(Phase::Transfer);
        node.publish_job(&job.status).await;
        let expected_job = job.status.job_id.clone();
        let expected_source = job.status.source.clone();
        // The source announced the size; a bomb or a lie stops there.
        let limits = UnpackLimits::for_checkpoint(
            estimate_bytes,
            crate::sysinfo::free_disk(&node.work_dir).unwrap_or(u64::MAX),
        );
        let report = wire::receive_checkpoint(&mut *conn, staging, &limits, |h| {
            if h.job_id != expected_job || h.source_node != expected_source {
                return Err(format!(
                    "stream for job {} from {} does not match the prepared job {expected_job} from {expected_source}",
                    h.job_id, h.source_node
                ));
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("receive: {e}"))?;
        job.status.bytes_raw = report.bytes_raw;
        job.status.bytes_wire = report.bytes_wire;

        job.enter(Phase::Restore);
        node.publish_job(&job.status).await;
        let restored = restore(node, &id, checkpoint, staging).await;
        if let Err(reason) = &restored {
            let _ = protocol::send(conn, &ToSource::Failed { reason: reason.clone() }).await;
            return Err(reason.clone());
        }
        protocol::send(conn, &ToSource::Restored)
            .await
            .map_err(|e| format!("restored, but cannot tell the source: {e}"))?;

        // Keep the container only if the source commits: otherwise the
        // source restores its original and this copy must go.
        job.enter(Phase::Cleanup);
        match tokio::time::timeout(COMMIT_WAIT, protocol::recv::<_, ToTarget>(conn)).await {
            Ok(Ok(ToTarget::Commit)) => {}
            Ok(Ok(other)) => return Err(format!("expected commit, got {other:?}")),
            Ok(Err(ProtocolError::Closed)) => return Err("source closed the connection before committing".into()),
            Ok(Err(e)) => return Err(format!("waiting for commit: {e}")),
            Err(_) => return Err("source did not commit in time".into()),
        }
        let _ = protocol::send(conn, &ToSource::Committed).await;
        if let Err(e) = node.engine.delete_checkpoint(&id, checkpoint).await {
            warn!(container = %id, error = %e, "restored, but cannot delete the checkpoint images");
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        if let Err(e) = node.engine.remove(&id).await {
            warn!(container = %id, error = %e, "cannot remove the container created for a failed migration");
        }
    }
    result
}

async fn precheck<E: Engine>(
    node: &Node<E>,
    spec: &crate::runtime::ContainerSpec,
    estimate_bytes: u64,
    arch: &str,
    page_size: u64,
) -> Result<(), String> {
    if let Err(why) = &node.criu {
        return Err(format!("CRIU does not work on {}: {why}", node.id));
    }
    if arch != node.engine_info.arch {
        return Err(format!(
            "engine arch differs: source runs {arch}, {} runs {}",
            node.id, node.engine_info.arch
        ));
    }
    if page_size != node.page_size {
        return Err(format!(
            "kernel page size differs: source has {page_size}, {} has {}",
            node.id, node.page_size
        ));
    }
    match node.engine.image_exists(&spec.image).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "image {} is not present on {}",
                spec.image, node.id
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot check image {} on {}: {e}",
                spec.image, node.id
            ))
        }
    }
    match node.engine.inspect(&spec.name).await {
        Ok(_) => {
            return Err(format!(
                "a container named {} already exists on {}",
                spec.name, node.id
            ))
        }
        Err(crate::runtime::RuntimeError::NotFound(_)) => {}
        Err(e) => {
            return Err(format!(
                "cannot check for container {} on {}: {e}",
                spec.name, node.id
            ))
        }
    }
    // Staging plus the engine's own copy of the images.
    for (what, dir) in [
        ("work dir", node.work_dir.clone()),
        ("engine root", node.engine_info.root_dir.clone()),
    ] {
        let free = crate::sysinfo::free_disk(&dir).unwrap_or(u64::MAX);
        if free < estimate_bytes {
            return Err(format!(
                "{} has {free} bytes free in its {what} {} for a checkpoint of about {estimate_bytes} bytes",
                node.id,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Places the verified images where the engine expects them and starts the
/// container from them.
async fn restore<E: Engine>(
    node: &Node<E>,
    id: &str,
    checkpoint: &str,
    staging: &Path,
) -> Result<(), String> {
    let dest: PathBuf = node
        .engine
        .checkpoint_dir(id, checkpoint)
        .await
        .map_err(|e| format!("restore: {e}"))?;
    move_dir(staging, &dest)
        .await
        .map_err(|e| format!("restore: cannot place images in {}: {e}", dest.display()))?;
    node.engine
        .restore(id, checkpoint)
        .await
        .map_err(|e| format!("restore on {}: {e}", node.id))?;
    tokio::time::sleep(SETTLE).await;
    let c = node
        .engine
        .inspect(id)
        .await
        .map_err(|e| format!("restore: {e}"))?;
    if !c.running {
        return Err(format!(
            "restored container {} exited right away on {}",
            c.name, node.id
        ));
    }
    Ok(())
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
