//! Every engine call with a deadline: [`Deadlines`] wraps an [`Engine`] and
//! fails a call that does not return in time with
//! [`RuntimeError::Timeout`], which names the call and the wait, so a hung
//! engine fails the job with its reason instead of holding it for ever.
//!
//! Checkpoint and restore wait in proportion to the state they move (the
//! container's memory, the checkpoint folder's size): a large checkpoint is
//! slow, not hung. Dropping the engine's future does not stop the daemon's
//! own work; the deadlines are long so that they only catch a hang.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::RestartPolicy;

use super::images::{ImageExport, ImageRef};
use super::mounts::BindMounts;
use super::networks::{Endpoint, NetworkDef};
use super::state::{ApplyReport, PackReport, StateEngine, StateError, StatePlan, STATE_DIR};
use super::volumes::VolumeSpec;
use super::{
    CheckpointOptions, Checkpointed, Container, ContainerSpec, Engine, EngineInfo, RuntimeError,
    TcpState,
};

/// How long each engine call may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineDeadlines {
    /// Every call that moves no checkpoint state (inspect, create, remove...).
    pub call: Duration,
    /// Checkpoint or restore of an empty container.
    pub base: Duration,
    /// Added per GiB of state: Docker's own paths move about 30 MiB/s on a
    /// laptop (see the README's figures), an SD card much less.
    pub per_gib: Duration,
}

impl Default for EngineDeadlines {
    fn default() -> Self {
        EngineDeadlines {
            call: Duration::from_secs(120),
            base: Duration::from_secs(300),
            per_gib: Duration::from_secs(300),
        }
    }
}

impl EngineDeadlines {
    /// The wait for a checkpoint or restore of `bytes` of state.
    pub fn for_state(&self, bytes: u64) -> Duration {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        self.base + self.per_gib.mul_f64(gib)
    }
}

/// An engine whose every call has a deadline.
pub struct Deadlines<E> {
    inner: E,
    limits: EngineDeadlines,
}

impl<E> Deadlines<E> {
    pub fn new(inner: E, limits: EngineDeadlines) -> Self {
        Deadlines { inner, limits }
    }

    pub fn inner(&self) -> &E {
        &self.inner
    }
}

/// Runs `f` with a deadline; a missed one is [`RuntimeError::Timeout`],
/// for engine calls and for the state-moving calls (whose [`StateError`]
/// wraps it) alike.
async fn within<T, Er: From<RuntimeError>>(
    call: &'static str,
    subject: &str,
    after: Duration,
    f: impl Future<Output = Result<T, Er>>,
) -> Result<T, Er> {
    tokio::time::timeout(after, f).await.unwrap_or_else(|_| {
        Err(RuntimeError::Timeout {
            call,
            subject: subject.to_owned(),
            after,
        }
        .into())
    })
}

/// Bytes under `dir`, counted off the async threads (0 if unreadable).
async fn dir_size_async(dir: PathBuf) -> u64 {
    tokio::task::spawn_blocking(move || crate::sysinfo::tree_bytes(&dir))
        .await
        .unwrap_or(0)
}

impl<E: Engine> Engine for Deadlines<E> {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        within("info", "engine", self.limits.call, self.inner.info()).await
    }

    async fn inspect(&self, name: &str) -> Result<Container, RuntimeError> {
        within("inspect", name, self.limits.call, self.inner.inspect(name)).await
    }

    async fn list_running(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        let f = self.inner.list_running(key, value);
        within("list_running", key, self.limits.call, f).await
    }

    async fn memory_usage(&self, id: &str) -> Result<u64, RuntimeError> {
        let f = self.inner.memory_usage(id);
        within("memory_usage", id, self.limits.call, f).await
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        let f = self.inner.image_exists(image);
        within("image_exists", image, self.limits.call, f).await
    }

    async fn networks(&self) -> Result<Vec<NetworkDef>, RuntimeError> {
        within(
            "networks",
            "engine",
            self.limits.call,
            self.inner.networks(),
        )
        .await
    }

    async fn create_network(&self, def: &NetworkDef, keep_pools: bool) -> Result<(), RuntimeError> {
        let f = self.inner.create_network(def, keep_pools);
        within("create_network", &def.name, self.limits.call, f).await
    }

    async fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &Endpoint,
    ) -> Result<(), RuntimeError> {
        let f = self.inner.connect(id, network, endpoint);
        within("connect", id, self.limits.call, f).await
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        within(
            "create",
            &spec.name,
            self.limits.call,
            self.inner.create(spec),
        )
        .await
    }

    async fn checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
        options: CheckpointOptions,
    ) -> Result<Checkpointed, RuntimeError> {
        let memory = self.memory_usage(id).await.unwrap_or(0);
        let after = self.limits.for_state(memory);
        let f = self.inner.checkpoint(id, checkpoint, options);
        within("checkpoint", id, after, f).await
    }

    async fn dump_running(
        &self,
        id: &str,
        name: &str,
        images: &std::path::Path,
        options: CheckpointOptions,
    ) -> Result<(), RuntimeError> {
        let memory = self.memory_usage(id).await.unwrap_or(0);
        let after = self.limits.for_state(memory);
        let f = self.inner.dump_running(id, name, images, options);
        within("dump_running", id, after, f).await
    }

    async fn tcp_state(&self, id: &str) -> Result<TcpState, RuntimeError> {
        within("tcp_state", id, self.limits.call, self.inner.tcp_state(id)).await
    }

    async fn checkpoint_dir(&self, id: &str, checkpoint: &str) -> Result<PathBuf, RuntimeError> {
        let f = self.inner.checkpoint_dir(id, checkpoint);
        within("checkpoint_dir", id, self.limits.call, f).await
    }

    async fn restore(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        let size = match self.checkpoint_dir(id, checkpoint).await {
            Ok(dir) => dir_size_async(dir).await,
            Err(_) => 0,
        };
        let after = self.limits.for_state(size);
        within("restore", id, after, self.inner.restore(id, checkpoint)).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        within("remove", id, self.limits.call, self.inner.remove(id)).await
    }

    async fn delete_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        let f = self.inner.delete_checkpoint(id, checkpoint);
        within("delete_checkpoint", id, self.limits.call, f).await
    }
}

/// The moves of files, volumes, image and restart policy wait like the
/// other calls, except those that copy state: packing and applying files
/// and volumes, exporting and loading an image wait in proportion to the
/// bytes they move.
impl<E: Engine> StateEngine for Deadlines<E> {
    async fn survey(
        &self,
        container: &str,
        bind_mounts: BindMounts,
    ) -> Result<StatePlan, StateError> {
        let f = self.inner.survey(container, bind_mounts);
        within("survey", container, self.limits.call, f).await
    }

    async fn estimate_state_bytes(&self, id: &str, plan: &StatePlan) -> Result<u64, StateError> {
        let f = self.inner.estimate_state_bytes(id, plan);
        within("estimate_state_bytes", id, self.limits.call, f).await
    }

    async fn pause_restart_policy(&self, id: &str) -> Result<RestartPolicy, StateError> {
        let f = self.inner.pause_restart_policy(id);
        within("pause_restart_policy", id, self.limits.call, f).await
    }

    async fn set_restart_policy(&self, id: &str, policy: &RestartPolicy) -> Result<(), StateError> {
        let f = self.inner.set_restart_policy(id, policy);
        within("set_restart_policy", id, self.limits.call, f).await
    }

    async fn pack_state(
        &self,
        id: &str,
        plan: &StatePlan,
        checkpoint_dir: &Path,
    ) -> Result<PackReport, StateError> {
        let bytes = self.estimate_state_bytes(id, plan).await.unwrap_or(0);
        let after = self.limits.for_state(bytes);
        let f = self.inner.pack_state(id, plan, checkpoint_dir);
        within("pack_state", id, after, f).await
    }

    async fn missing_image(&self, image: &ImageRef) -> Result<Option<HashSet<String>>, StateError> {
        let f = self.inner.missing_image(image);
        within("missing_image", &image.reference, self.limits.call, f).await
    }

    async fn export_image(
        &self,
        image: &ImageRef,
        have: &HashSet<String>,
        out: &Path,
    ) -> Result<ImageExport, StateError> {
        let after = self.limits.for_state(image.size);
        let f = self.inner.export_image(image, have, out);
        within("export_image", &image.reference, after, f).await
    }

    async fn load_image(&self, image: &ImageRef, tar: &Path) -> Result<(), StateError> {
        let bytes = tokio::fs::metadata(tar).await.map_or(0, |m| m.len());
        let after = self.limits.for_state(bytes);
        let f = self.inner.load_image(image, tar);
        within("load_image", &image.reference, after, f).await
    }

    async fn tag_image(&self, image: &ImageRef) -> Result<(), StateError> {
        let f = self.inner.tag_image(image);
        within("tag_image", &image.reference, self.limits.call, f).await
    }

    async fn create_volumes(&self, volumes: &[VolumeSpec]) -> Result<Vec<String>, StateError> {
        let f = self.inner.create_volumes(volumes);
        within("create_volumes", "volumes", self.limits.call, f).await
    }

    async fn apply_state(
        &self,
        id: &str,
        plan: &StatePlan,
        staging: &Path,
    ) -> Result<ApplyReport, StateError> {
        let bytes = dir_size_async(staging.join(STATE_DIR)).await;
        let after = self.limits.for_state(bytes);
        let f = self.inner.apply_state(id, plan, staging);
        within("apply_state", id, after, f).await
    }

    async fn remove_volumes(&self, names: &[String]) -> Result<(), StateError> {
        let f = self.inner.remove_volumes(names);
        within("remove_volumes", "volumes", self.limits.call, f).await
    }

    async fn remove_unused_volumes(
        &self,
        volumes: &[VolumeSpec],
    ) -> Result<Vec<String>, StateError> {
        let f = self.inner.remove_unused_volumes(volumes);
        within("remove_unused_volumes", "volumes", self.limits.call, f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeEngine;
    use crate::stream::testutil::TempDir;

    fn limits() -> EngineDeadlines {
        EngineDeadlines {
            call: Duration::from_secs(10),
            base: Duration::from_secs(60),
            per_gib: Duration::from_secs(120),
        }
    }

    #[test]
    fn state_calls_wait_in_proportion_to_the_state() {
        let l = limits();
        assert_eq!(l.for_state(0), Duration::from_secs(60));
        assert_eq!(l.for_state(1 << 30), Duration::from_secs(180));
        assert_eq!(l.for_state(512 << 20), Duration::from_secs(120));
    }

    #[tokio::test]
    async fn a_hung_call_fails_with_its_name_and_wait() {
        let dir = TempDir::new("deadline");
        let fake = FakeEngine::new(&dir.join("engine"), &["img"]);
        let id = fake.run("web", "img");
        let short = EngineDeadlines {
            call: Duration::from_millis(100),
            base: Duration::from_millis(300),
            per_gib: Duration::from_secs(1024),
        };
        let engine = Deadlines::new(fake, short.clone());
        // Answers in time: passes through.
        assert!(engine.inspect("web").await.unwrap().running);

        engine.inner().hang("restore");
        engine.inner().hang("inspect");
        let plain = CheckpointOptions {
            tcp: crate::runtime::TcpDump::Plain,
        };
        engine.checkpoint(&id, "cp", plain).await.unwrap();
        // The fake's checkpoint folder holds about 600 KiB: at 1024 s per
        // GiB that adds about 0.6 s to the base wait.
        let started = tokio::time::Instant::now();
        let err = engine.restore(&id, "cp").await.unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(850) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "engine call restore for {id} did not return within 8"
            )) && text.ends_with("the engine may be hung"),
            "{text}"
        );
        let err = engine.inspect("web").await.unwrap_err();
        assert!(
            matches!(err, RuntimeError::Timeout { call: "inspect", after, .. } if after == Duration::from_millis(100)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_hung_state_call_fails_with_its_name_and_wait() {
        let dir = TempDir::new("deadline-state");
        let fake = FakeEngine::new(&dir.join("engine"), &["img"]);
        let id = fake.run("web", "img");
        let engine = Deadlines::new(
            fake,
            EngineDeadlines {
                call: Duration::from_millis(100),
                ..limits()
            },
        );
        // Answers in time: passes through.
        let plan = engine.survey("web", BindMounts::Refuse).await.unwrap();
        assert_eq!(plan.image.reference, "img");

        engine.inner().hang("pause_restart_policy");
        let err = engine.pause_restart_policy(&id).await.unwrap_err();
        assert!(
            matches!(&err, StateError::Runtime(RuntimeError::Timeout { call: "pause_restart_policy", after, .. }) if *after == Duration::from_millis(100)),
            "{err}"
        );
        assert!(err.to_string().ends_with("the engine may be hung"), "{err}");
    }
}
