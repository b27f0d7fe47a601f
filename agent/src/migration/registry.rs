//! Who runs what on this node: [`JobRegistry`] holds the running jobs (one
//! per job id, one per container) and hands out a [`JobGuard`] that
//! deregisters on drop; cancel lookup and the job count go through it.
//! [`Peers`] holds the last retained status of every other node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::gate::{AlreadyCommitted, CommitGate};
use crate::mqtt::contract::{NodeStatus, Role};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("job {job_id} is already running on {node}")]
    JobRunning { job_id: String, node: String },
    #[error("container {container} is already being migrated")]
    ContainerBusy { container: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("job {job_id} is not running on {node}")]
    NotRunning { job_id: String, node: String },
    #[error("job {job_id} is the target side on {node}: cancel it on its source node")]
    TargetSide { job_id: String, node: String },
    #[error("job {job_id} is past the point of no return: the target confirmed the restore")]
    Committed { job_id: String },
}

struct Entry {
    /// The engine's id of the container on the source; on the target, the
    /// name it will be created under (it has no id yet).
    container: String,
    role: Role,
    gate: Arc<CommitGate>,
}

type Jobs = Arc<Mutex<HashMap<String, Entry>>>;

/// The jobs running on this node, either role.
pub struct JobRegistry {
    node: String,
    jobs: Jobs,
}

/// A registered job. Dropping it deregisters the job.
pub struct JobGuard {
    jobs: Jobs,
    job_id: String,
    gate: Arc<CommitGate>,
}

impl JobGuard {
    /// This job's cancel/commit arbiter.
    pub fn gate(&self) -> &CommitGate {
        &self.gate
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        lock(&self.jobs).remove(&self.job_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobRegistry {
    pub fn new(node: impl Into<String>) -> Self {
        JobRegistry {
            node: node.into(),
            jobs: Arc::default(),
        }
    }

    /// Registers `job_id` for `container` unless that job, or another job
    /// for the same container, already runs here. Pass the engine's full id
    /// on the source, so a name and an id cannot start two jobs.
    pub fn try_register(
        &self,
        job_id: &str,
        container: &str,
        role: Role,
    ) -> Result<JobGuard, RegisterError> {
        let mut jobs = lock(&self.jobs);
        if jobs.contains_key(job_id) {
            return Err(RegisterError::JobRunning {
                job_id: job_id.to_owned(),
                node: self.node.clone(),
            });
        }
        if jobs.values().any(|e| e.container == container) {
            return Err(RegisterError::ContainerBusy {
                container: container.to_owned(),
            });
        }
        let gate = Arc::new(CommitGate::new());
        jobs.insert(
            job_id.to_owned(),
            Entry {
                container: container.to_owned(),
                role,
                gate: gate.clone(),
            },
        );
        Ok(JobGuard {
            jobs: self.jobs.clone(),
            job_id: job_id.to_owned(),
            gate,
        })
    }

    /// A fleet manager's cancel: only the source decides to roll back.
    pub fn cancel(&self, job_id: &str) -> Result<(), CancelError> {
        let gate = match lock(&self.jobs).get(job_id) {
            None => {
                return Err(CancelError::NotRunning {
                    job_id: job_id.to_owned(),
                    node: self.node.clone(),
                })
            }
            Some(e) if e.role == Role::Target => {
                return Err(CancelError::TargetSide {
                    job_id: job_id.to_owned(),
                    node: self.node.clone(),
                })
            }
            Some(e) => e.gate.clone(),
        };
        gate.try_cancel()
            .map_err(|AlreadyCommitted| CancelError::Committed {
                job_id: job_id.to_owned(),
            })
    }

    /// The drain deadline: every source job not yet committed rolls back.
    /// A target follows its source.
    pub fn cancel_all(&self) {
        for entry in lock(&self.jobs).values() {
            if entry.role == Role::Source {
                let _ = entry.gate.try_cancel();
            }
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.jobs).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The last retained status of every node, from `{root}/+/status`.
#[derive(Default)]
pub struct Peers {
    statuses: Mutex<HashMap<String, NodeStatus>>,
    changed: Notify,
}

impl Peers {
    pub fn update(&self, node: impl Into<String>, status: NodeStatus) {
        lock(&self.statuses).insert(node.into(), status);
        self.changed.notify_waiters();
    }

    pub fn get(&self, node: &str) -> Option<NodeStatus> {
        lock(&self.statuses).get(node).cloned()
    }

    /// Waits up to `wait` for a first status of `node`.
    pub async fn wait_for(&self, node: &str, wait: Duration) -> Option<NodeStatus> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(s) = self.get(node) {
                return Some(s);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_per_id_and_per_container_until_the_guard_drops() {
        let r = JobRegistry::new("a");
        let g = r.try_register("j1", "abc123", Role::Source).unwrap();
        assert_eq!(
            r.try_register("j1", "other", Role::Source)
                .err()
                .unwrap()
                .to_string(),
            "job j1 is already running on a"
        );
        assert_eq!(
            r.try_register("j2", "abc123", Role::Source)
                .err()
                .unwrap()
                .to_string(),
            "container abc123 is already being migrated"
        );
        assert_eq!(r.len(), 1);
        drop(g);
        assert!(r.is_empty());
        assert!(r.try_register("j2", "abc123", Role::Source).is_ok());
    }

    #[test]
    fn cancel_goes_to_the_source_job_and_respects_the_commit() {
        let r = JobRegistry::new("a");
        assert_eq!(
            r.cancel("j1").unwrap_err().to_string(),
            "job j1 is not running on a"
        );
        let t = r.try_register("t1", "web", Role::Target).unwrap();
        assert_eq!(
            r.cancel("t1").unwrap_err().to_string(),
            "job t1 is the target side on a: cancel it on its source node"
        );
        let s = r.try_register("j1", "abc", Role::Source).unwrap();
        assert!(s.gate().try_commit());
        assert_eq!(
            r.cancel("j1").unwrap_err().to_string(),
            "job j1 is past the point of no return: the target confirmed the restore"
        );
        let s2 = r.try_register("j2", "def", Role::Source).unwrap();
        r.cancel_all();
        assert!(s2.gate().is_canceled());
        assert!(!t.gate().is_canceled(), "a target follows its source");
        assert!(!s.gate().is_canceled(), "committed stays committed");
    }

    #[tokio::test]
    async fn a_peer_status_that_arrives_while_waiting_is_seen() {
        let peers = Arc::new(Peers::default());
        assert!(peers
            .wait_for("b", Duration::from_millis(20))
            .await
            .is_none());
        let waiter = tokio::spawn({
            let peers = peers.clone();
            async move { peers.wait_for("b", Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        let status: NodeStatus = serde_json::from_str(r#"{"online":false}"#).unwrap();
        peers.update("b", status.clone());
        assert_eq!(waiter.await.unwrap(), Some(status));
    }
}
