//! Who runs what on this node: [`JobRegistry`] holds the jobs (one per job
//! id, one per container) and hands out a [`JobGuard`] that deregisters on
//! drop; cancel lookup and the job count go through it. It also admits
//! outgoing migrations one at a time, in order ([`Admission`]: one
//! checkpoint at a time per node), and reserves staging space per incoming
//! job. [`Peers`] holds the last retained status of every other node.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
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
    #[error("{node} has {free} bytes free in its work dir {dir}, {reserved} of them reserved by other incoming migrations, for a checkpoint of about {estimate} bytes")]
    NoStagingRoom {
        node: String,
        dir: String,
        free: u64,
        reserved: u64,
        estimate: u64,
    },
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
    /// Staging bytes reserved by an incoming job.
    reserved: u64,
}

/// Outgoing migrations, one at a time, in the order they were accepted:
/// concurrent checkpoints interfere with each other on small boards. Pure
/// bookkeeping; [`JobGuard`] waits on it.
#[derive(Debug, Default)]
pub struct Admission {
    running: Option<String>,
    waiting: VecDeque<String>,
}

impl Admission {
    /// Puts `job` in line; it runs at once if nothing else does.
    pub fn join(&mut self, job: &str) {
        if self.running.is_none() {
            self.running = Some(job.to_owned());
        } else {
            self.waiting.push_back(job.to_owned());
        }
    }

    /// `job` ended or gave up its place; the next in line runs.
    pub fn leave(&mut self, job: &str) {
        if self.running.as_deref() == Some(job) {
            self.running = self.waiting.pop_front();
        } else {
            self.waiting.retain(|j| j != job);
        }
    }

    /// 0: `job` runs; n: n-th in line (1 runs next); `None`: not in line.
    pub fn position(&self, job: &str) -> Option<usize> {
        if self.running.as_deref() == Some(job) {
            return Some(0);
        }
        self.waiting.iter().position(|j| j == job).map(|i| i + 1)
    }

    /// The jobs waiting, in order.
    pub fn waiting(&self) -> impl Iterator<Item = &str> {
        self.waiting.iter().map(String::as_str)
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    admission: Admission,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// The line moved.
    turns: Notify,
}

type Jobs = Arc<Shared>;

fn inner(jobs: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    lock(&jobs.inner)
}

/// The jobs on this node, either role.
pub struct JobRegistry {
    node: String,
    jobs: Jobs,
}

/// A registered job. Dropping it deregisters the job (and gives up its
/// place in line and its staging reservation).
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

    /// 0 when this job may run, else its place in line (1 runs next).
    /// A target job is never in line.
    pub fn position(&self) -> usize {
        inner(&self.jobs)
            .admission
            .position(&self.job_id)
            .unwrap_or(0)
    }

    /// Waits until the job's place in line differs from `last`; returns it.
    pub async fn position_change(&self, last: usize) -> usize {
        loop {
            let moved = self.jobs.turns.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let now = self.position();
            if now != last {
                return now;
            }
            moved.await;
        }
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        let mut i = inner(&self.jobs);
        i.entries.remove(&self.job_id);
        i.admission.leave(&self.job_id);
        drop(i);
        self.jobs.turns.notify_waiters();
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
        let mut i = inner(&self.jobs);
        let jobs = &mut i.entries;
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
                reserved: 0,
            },
        );
        if role == Role::Source {
            i.admission.join(job_id);
        }
        Ok(JobGuard {
            jobs: self.jobs.clone(),
            job_id: job_id.to_owned(),
            gate,
        })
    }

    /// A fleet manager's cancel: only the source decides to roll back.
    pub fn cancel(&self, job_id: &str) -> Result<(), CancelError> {
        let gate = match inner(&self.jobs).entries.get(job_id) {
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
        for entry in inner(&self.jobs).entries.values() {
            if entry.role == Role::Source {
                let _ = entry.gate.try_cancel();
            }
        }
    }

    /// The start of a drain: incoming jobs stop now (each before `Restored`
    /// fails, tells its source and removes what it created; one past it
    /// waits for the commit).
    pub fn cancel_incoming(&self) {
        for entry in inner(&self.jobs).entries.values() {
            if entry.role == Role::Target {
                let _ = entry.gate.try_cancel();
            }
        }
    }

    /// The start of a drain: jobs still in line never start.
    pub fn cancel_queued(&self) {
        let i = inner(&self.jobs);
        for job in i.admission.waiting() {
            if let Some(e) = i.entries.get(job) {
                let _ = e.gate.try_cancel();
            }
        }
    }

    /// Reserves `estimate` bytes of staging in `dir` for the incoming job
    /// `job_id` (registered), against the other incoming jobs' reservations:
    /// `free` is what the filesystem has now. Released with the job.
    pub fn reserve_staging(
        &self,
        job_id: &str,
        estimate: u64,
        free: u64,
        dir: &Path,
    ) -> Result<(), RegisterError> {
        let mut i = inner(&self.jobs);
        let reserved: u64 = i
            .entries
            .iter()
            .filter(|(id, _)| id.as_str() != job_id)
            .map(|(_, e)| e.reserved)
            .sum();
        if reserved.saturating_add(estimate) > free {
            return Err(RegisterError::NoStagingRoom {
                node: self.node.clone(),
                dir: dir.display().to_string(),
                free,
                reserved,
                estimate,
            });
        }
        if let Some(e) = i.entries.get_mut(job_id) {
            e.reserved = estimate;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        inner(&self.jobs).entries.len()
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

    /// Every node with a status seen, by name.
    pub fn all(&self) -> Vec<(String, NodeStatus)> {
        let mut all: Vec<_> = lock(&self.statuses)
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
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

    #[test]
    fn admission_runs_one_at_a_time_in_order() {
        let mut a = Admission::default();
        a.join("j1");
        a.join("j2");
        a.join("j3");
        let at = |a: &Admission| ["j1", "j2", "j3"].map(|j| a.position(j));
        assert_eq!(at(&a), [Some(0), Some(1), Some(2)]);
        // A waiting job that gives up moves the ones behind it forward.
        a.leave("j2");
        assert_eq!(at(&a), [Some(0), None, Some(1)]);
        a.leave("j1");
        assert_eq!(at(&a), [None, None, Some(0)]);
        a.leave("j3");
        a.join("j4");
        assert_eq!(a.position("j4"), Some(0));
    }

    #[tokio::test]
    async fn a_queued_job_learns_its_turn_and_targets_never_queue() {
        let r = JobRegistry::new("a");
        let first = r.try_register("j1", "c1", Role::Source).unwrap();
        let second = r.try_register("j2", "c2", Role::Source).unwrap();
        let third = r.try_register("j3", "c3", Role::Source).unwrap();
        let incoming = r.try_register("t1", "web", Role::Target).unwrap();
        assert_eq!(
            [&first, &second, &third, &incoming].map(|g| g.position()),
            [0, 1, 2, 0]
        );
        let waiter = tokio::spawn(async move {
            let mut seen = vec![third.position()];
            while *seen.last().unwrap() > 0 {
                let last = *seen.last().unwrap();
                seen.push(third.position_change(last).await);
            }
            seen
        });
        tokio::task::yield_now().await;
        drop(first);
        tokio::task::yield_now().await;
        assert_eq!(second.position(), 0);
        drop(second);
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.first(), Some(&2));
        assert_eq!(seen.last(), Some(&0));
    }

    #[test]
    fn draining_cancels_the_queued_jobs_only() {
        let r = JobRegistry::new("a");
        let running = r.try_register("j1", "c1", Role::Source).unwrap();
        let queued = r.try_register("j2", "c2", Role::Source).unwrap();
        r.cancel_queued();
        assert!(queued.gate().is_canceled());
        assert!(!running.gate().is_canceled());
    }

    #[test]
    fn staging_reservations_add_up_and_are_released_with_the_job() {
        let r = JobRegistry::new("b");
        let dir = Path::new("/run/ferry");
        let t1 = r.try_register("t1", "web", Role::Target).unwrap();
        let t2 = r.try_register("t2", "db", Role::Target).unwrap();
        r.reserve_staging("t1", 600, 1000, dir).unwrap();
        let err = r.reserve_staging("t2", 500, 1000, dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            "b has 1000 bytes free in its work dir /run/ferry, 600 of them reserved by other incoming migrations, for a checkpoint of about 500 bytes"
        );
        r.reserve_staging("t2", 400, 1000, dir).unwrap();
        drop(t1);
        // t1's 600 are free again; t2 keeps its own 400.
        let t3 = r.try_register("t3", "cache", Role::Target).unwrap();
        r.reserve_staging("t3", 600, 1000, dir).unwrap();
        drop((t2, t3));
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
