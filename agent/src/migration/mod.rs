//! Migration: the sans-I/O state machine ([`machine`]), the control
//! conversation between agents ([`protocol`]), and the drivers that act on
//! them: [`source`] runs a job on the node that holds the container,
//! [`target`] serves incoming migrations on the data port.

pub mod machine;
pub mod protocol;
pub mod source;
pub mod target;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::mqtt::contract::{JobStatus, NodeStatus, Role, Topics};
use crate::mqtt::MqttHandle;
use crate::runtime::{Engine, EngineInfo};

/// Everything a driver needs about the node it runs on.
pub struct Node<E> {
    pub id: String,
    pub engine: E,
    pub engine_info: EngineInfo,
    pub page_size: u64,
    /// CRIU's version, or why it does not work here.
    pub criu: Result<String, String>,
    pub work_dir: PathBuf,
    pub topics: Topics,
    pub mqtt: MqttHandle,
    /// Client side of the data port's mutual TLS; `None` only with `--insecure`.
    pub tls_client: Option<Arc<rustls::ClientConfig>>,
    /// Last retained status of every node, from `{root}/+/status`.
    pub peers: Mutex<HashMap<String, NodeStatus>>,
    /// Jobs running here (either role), for cancel and for the status count.
    pub jobs: Mutex<HashMap<String, JobHandle>>,
}

/// A running job as the agent's job loop sees it.
#[derive(Clone)]
pub struct JobHandle {
    pub container: String,
    /// Only the source can cancel: it decides when to roll back.
    pub role: Role,
    pub cancel: CancellationToken,
    /// Set once the target confirmed the restore; guarded together with the
    /// cancel decision so a cancel is either honoured or refused, never lost.
    pub committed: Arc<Mutex<bool>>,
}

impl JobHandle {
    pub fn new(container: &str, role: Role) -> Self {
        Self {
            container: container.to_string(),
            role,
            cancel: CancellationToken::new(),
            committed: Arc::new(Mutex::new(false)),
        }
    }

    /// Cancels unless past the point of no return; says which.
    pub fn try_cancel(&self) -> bool {
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if *committed {
            return false;
        }
        self.cancel.cancel();
        true
    }

    /// Marks the point of no return unless a cancel came first.
    pub fn try_commit(&self) -> bool {
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if self.cancel.is_cancelled() {
            return false;
        }
        *committed = true;
        true
    }
}

impl<E: Engine> Node<E> {
    pub async fn publish_job(&self, status: &JobStatus) {
        let topic = self.topics.job_status(&status.node, &status.job_id);
        if let Err(e) = self.mqtt.publish_json(&topic, status, true).await {
            tracing::warn!(%topic, error = %e, "cannot publish job status");
        }
    }

    pub fn peer(&self, node: &str) -> Option<NodeStatus> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    pub fn job_count(&self) -> usize {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The checkpoint's name in both engines: derived from the job, so a retry
/// never collides with a leftover of another job.
pub fn checkpoint_name(job_id: &str) -> String {
    format!("ferry-{job_id}")
}
