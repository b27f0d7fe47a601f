//! The container engine, behind a small trait ([`Engine`]) so the migration
//! drivers can be unit-tested with a recording fake (`fake`, tests only)
//! while integration tests use the real Docker daemon ([`Docker`]).

mod docker;
#[cfg(test)]
pub(crate) mod fake;
pub mod images;
pub mod mounts;
pub mod policy;
pub mod rootfs;
pub mod state;
pub mod volumes;

use std::future::Future;
use std::path::PathBuf;

pub use docker::Docker;

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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The engine operations a migration needs, the moves of a container's
/// files, volumes, image and restart policy ([`state::StateEngine`])
/// included. Implemented by [`Docker`] and, in unit tests, by the recording
/// `fake::FakeEngine`.
pub trait Engine: state::StateEngine + Send + Sync {
    fn info(&self) -> impl Future<Output = Result<EngineInfo, RuntimeError>> + Send;
    fn inspect(&self, name: &str) -> impl Future<Output = Result<Container, RuntimeError>> + Send;
    /// Memory the container uses now: the size its checkpoint will have.
    fn memory_usage(&self, id: &str) -> impl Future<Output = Result<u64, RuntimeError>> + Send;
    fn image_exists(&self, image: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// Creates (does not start) a container from a spec taken on another node.
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Checkpoints a running container and stops it; returns the image folder.
    fn checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> impl Future<Output = Result<PathBuf, RuntimeError>> + Send;
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
