//! The container engine, behind a small trait ([`Engine`]) so the migration
//! drivers can be unit-tested with a recording fake (`fake`, tests only)
//! while integration tests use the real Docker daemon ([`Docker`]).

pub mod admission;
pub mod deadline;
pub mod docker;
#[cfg(test)]
pub(crate) mod fake;
pub mod images;
pub mod mounts;
pub mod networks;
pub mod policy;
pub mod rootfs;
pub mod runc;
pub mod sockets;
pub mod state;
pub mod volumes;

use std::future::Future;
use std::path::{Path, PathBuf};

pub use deadline::{Deadlines, EngineDeadlines};
pub use docker::Docker;
pub use runc::RuncSettings;
pub use sockets::{TcpDump, TcpMode, TcpState};

/// What the engine says about itself; the precheck compares these between
/// source and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// Engine's architecture (`x86_64`, `aarch64`), which is what containers
    /// run as, not necessarily what the agent itself was built for.
    pub arch: String,
    pub kernel: String,
    pub version: String,
    /// Where the engine keeps container state; checkpoints live below it.
    pub root_dir: PathBuf,
    pub experimental: bool,
}

/// A container as the migration needs to see it.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    /// Name without Docker's leading `/`.
    pub name: String,
    pub image: String,
    pub running: bool,
    pub spec: ContainerSpec,
}

/// Everything needed to create the same container on another node: the
/// engine's own create body (command, env, labels, restart policy, mounts,
/// resource limits), kept as JSON so nothing is dropped in translation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub create_body: serde_json::Value,
    /// The networks it is attached to, its first network first (empty
    /// from a source that predates them: the body's `NetworkMode` alone).
    #[serde(default)]
    pub networks: Vec<networks::Attachment>,
}

/// How a checkpoint is to treat the container's established TCP
/// connections ([`sockets::plan`] decided it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointOptions {
    pub tcp: TcpDump,
}

/// Which path a checkpoint took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointVia {
    /// `runc checkpoint` straight into the engine's checkpoint folder.
    Runc,
    /// The engine's own checkpoint call, and why runc was not used.
    Engine { reason: String },
}

/// A finished checkpoint: the container is stopped, its images are in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointed {
    pub dir: PathBuf,
    pub via: CheckpointVia,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("cannot reach the container engine at {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("engine call {call} for {subject} failed: {message}")]
    Engine {
        call: &'static str,
        subject: String,
        message: String,
    },
    #[error(transparent)]
    Runc(#[from] runc::RuncError),
    #[error(
        "engine call {call} for {subject} did not return within {after:?}; the engine may be hung"
    )]
    Timeout {
        call: &'static str,
        subject: String,
        after: std::time::Duration,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Unsupported(String),
}

/// The engine operations a migration needs, the moves of a container's
/// files, volumes, image and restart policy ([`state::StateEngine`])
/// included. Implemented by [`Docker`] and, in unit tests, by the recording
/// `fake::FakeEngine`.
pub trait Engine: state::StateEngine + Send + Sync {
    fn info(&self) -> impl Future<Output = Result<EngineInfo, RuntimeError>> + Send;
    fn inspect(&self, name: &str) -> impl Future<Output = Result<Container, RuntimeError>> + Send;
    /// The running containers labelled `key=value`: (id, name), by name.
    fn list_running(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>, RuntimeError>> + Send;
    /// Memory the container uses now: the size its checkpoint will have.
    fn memory_usage(&self, id: &str) -> impl Future<Output = Result<u64, RuntimeError>> + Send;
    fn image_exists(&self, image: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// The engine's networks.
    fn networks(
        &self,
    ) -> impl Future<Output = Result<Vec<networks::NetworkDef>, RuntimeError>> + Send;
    /// Creates a network like `def`, with its IPAM pools or (`keep_pools`
    /// false) with a subnet of the engine's choice.
    fn create_network(
        &self,
        def: &networks::NetworkDef,
        keep_pools: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Connects a created container to one more network.
    fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &networks::Endpoint,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Creates (does not start) a container from a spec taken on another
    /// node; [`networks::create_placed`] first makes its networks.
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Checkpoints a running container into its checkpoint folder
    /// ([`Engine::checkpoint_dir`]) and stops it; the engine shows it
    /// stopped once this returns.
    fn checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
        options: CheckpointOptions,
    ) -> impl Future<Output = Result<Checkpointed, RuntimeError>> + Send;
    /// Dumps running container `id` into `images` (outside the engine's
    /// checkpoint folders) and leaves it running: a pre-copy round. Engines
    /// that cannot say [`RuntimeError::Unsupported`].
    fn dump_running(
        &self,
        id: &str,
        name: &str,
        images: &Path,
        options: CheckpointOptions,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = (id, name, images, options);
        std::future::ready(Err(RuntimeError::Unsupported(
            "this engine cannot dump a running container".into(),
        )))
    }
    /// The container's established TCP connections, and the TCP options
    /// restores on this node are given.
    fn tcp_state(&self, id: &str) -> impl Future<Output = Result<TcpState, RuntimeError>> + Send;
    /// Where the engine expects the images of `checkpoint` for container `id`.
    fn checkpoint_dir(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> impl Future<Output = Result<PathBuf, RuntimeError>> + Send;
    /// Starts a container from the checkpoint images in its checkpoint folder.
    fn restore(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn delete_checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}
