//! A container's state beyond its memory: what it wrote to its own
//! filesystem ([`super::rootfs`]), its volumes ([`super::volumes`]), its
//! image ([`super::images`]), its restart policy ([`super::policy`]), and
//! the mounts that cannot move ([`super::mounts`]).
//!
//! [`StateEngine`] lists these capabilities so the migration drivers can
//! call them through the engine trait. Files and volumes travel inside the
//! checkpoint folder, in [`STATE_DIR`]: the stream already sends that
//! folder, and [`StateEngine::apply_state`] takes the folder out again
//! before the restore, so neither CRIU nor the engine's own copy of the
//! images ever sees it.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::RestartPolicy;
use serde::{Deserialize, Serialize};

use super::images::{ImageExport, ImageRef};
use super::mounts::{BindMounts, MountRefusal};
use super::rootfs::{ApplyStats, PackStats};
use super::volumes::VolumeSpec;
use super::RuntimeError;

/// Folder inside the checkpoint folder that carries files and volumes.
pub const STATE_DIR: &str = "ferry-state";
/// The container's filesystem changes, in [`STATE_DIR`].
pub const ROOTFS_TAR: &str = "rootfs.tar";
/// One `<volume name>.tar` per copied volume, in [`STATE_DIR`].
pub const VOLUMES_DIR: &str = "volumes";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot move container {container}: {refusal}")]
    Refused {
        container: String,
        #[source]
        refusal: MountRefusal,
    },
    #[error("cannot pack {path}: {reason}")]
    Pack { path: PathBuf, reason: String },
    #[error("state archive entry {entry:?}: {reason}")]
    Entry { entry: String, reason: String },
    #[error("state archive: {0}")]
    Archive(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("volume {0} already exists on this node; it is never overwritten")]
    VolumeExists(String),
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl StateError {
    pub(crate) fn io(path: &Path, verb: &str, source: io::Error) -> StateError {
        StateError::Io {
            context: format!("{verb} {}", path.display()),
            source,
        }
    }
}

/// What the source learns at precheck and the target needs before it
/// creates the container (it travels in the prepare message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatePlan {
    pub image: ImageRef,
    pub volumes: Vec<VolumeSpec>,
    /// The policy the container had before [`StateEngine::pause_restart_policy`];
    /// the target's create body carries it too.
    pub restart_policy: RestartPolicy,
}

/// What [`StateEngine::pack_state`] wrote, and how long it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackReport {
    pub rootfs: PackStats,
    /// Per copied volume: its name and what its tar holds.
    pub volumes: Vec<(String, PackStats)>,
    pub elapsed: Duration,
}

impl PackReport {
    /// Tar bytes added to the checkpoint folder.
    pub fn bytes(&self) -> u64 {
        self.rootfs.tar_bytes + self.volumes.iter().map(|(_, s)| s.tar_bytes).sum::<u64>()
    }
}

/// What [`StateEngine::apply_state`] created, and how long it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyReport {
    pub rootfs: ApplyStats,
    pub volumes: Vec<(String, ApplyStats)>,
    pub elapsed: Duration,
}

/// The engine capabilities that move a container's non-memory state. Each
/// method says on which side and at which step it runs.
pub trait StateEngine: Send + Sync {
    /// Source, precheck: refuses binds (unless `bind_mounts` is
    /// [`BindMounts::Present`]), devices and privileged containers with the
    /// field named; otherwise says which volumes, image and restart policy
    /// travel.
    fn survey(
        &self,
        container: &str,
        bind_mounts: BindMounts,
    ) -> impl Future<Output = Result<StatePlan, StateError>> + Send;

    /// Source, precheck: about the bytes [`StateEngine::pack_state`] will
    /// add to the checkpoint folder (the container's layer and copied
    /// volumes as they are now); add it to the announced estimate so the
    /// target's unpack limits leave room.
    fn estimate_state_bytes(
        &self,
        id: &str,
        plan: &StatePlan,
    ) -> impl Future<Output = Result<u64, StateError>> + Send;

    /// Source, right before the checkpoint: sets the restart policy to `no`
    /// so the engine cannot start the checkpointed original again; returns
    /// the policy it had.
    fn pause_restart_policy(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<RestartPolicy, StateError>> + Send;

    /// Source, on rollback (after the original runs again): puts `policy`
    /// back.
    fn set_restart_policy(
        &self,
        id: &str,
        policy: &RestartPolicy,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Source, after the checkpoint (the container is stopped): writes its
    /// filesystem changes and its copied volumes into
    /// `checkpoint_dir/`[`STATE_DIR`].
    fn pack_state(
        &self,
        id: &str,
        plan: &StatePlan,
        checkpoint_dir: &Path,
    ) -> impl Future<Output = Result<PackReport, StateError>> + Send;

    /// Target, before creating: `None` when it has the image id (its tag
    /// may still need moving: [`StateEngine::tag_image`]); otherwise the
    /// chain ids of the image's layers it already has.
    fn missing_image(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<Option<HashSet<String>>, StateError>> + Send;

    /// Source, before the checkpoint: writes `image` to `out` in `docker
    /// save` format, without the layers whose chain id is in `have`.
    fn export_image(
        &self,
        image: &ImageRef,
        have: &HashSet<String>,
        out: &Path,
    ) -> impl Future<Output = Result<ImageExport, StateError>> + Send;

    /// Target: loads an [`StateEngine::export_image`] tar and checks that
    /// the image id arrived.
    fn load_image(
        &self,
        image: &ImageRef,
        tar: &Path,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Target, before creating: points the image's reference (its tag) at
    /// its id, so the container is created from the same image under the
    /// same name.
    fn tag_image(&self, image: &ImageRef) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Target, before creating: creates the volumes with their names,
    /// drivers, options and labels. Refuses a name that exists already.
    /// Returns the names created, for [`StateEngine::remove_volumes`].
    fn create_volumes(
        &self,
        volumes: &[VolumeSpec],
    ) -> impl Future<Output = Result<Vec<String>, StateError>> + Send;

    /// Target, after receiving and before the restore: applies the
    /// filesystem changes to the created container's layer and fills its
    /// volumes, then removes [`STATE_DIR`] from `staging`.
    fn apply_state(
        &self,
        id: &str,
        plan: &StatePlan,
        staging: &Path,
    ) -> impl Future<Output = Result<ApplyReport, StateError>> + Send;

    /// Target, when the migration fails after [`StateEngine::create_volumes`]
    /// (after the container is removed).
    fn remove_volumes(
        &self,
        names: &[String],
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Source, after the commit removed the original: removes the volumes
    /// that moved, except those another container still uses. Returns the
    /// names removed.
    fn remove_unused_volumes(
        &self,
        volumes: &[VolumeSpec],
    ) -> impl Future<Output = Result<Vec<String>, StateError>> + Send;
}

/// Source, on rollback before restoring the original from its own
/// checkpoint folder: drops [`STATE_DIR`] so the engine does not copy it
/// along with the images.
pub fn discard_state(checkpoint_dir: &Path) -> Result<(), StateError> {
    let dir = checkpoint_dir.join(STATE_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StateError::io(&dir, "removing", e)),
    }
}

impl StateEngine for super::Docker {
    async fn survey(
        &self,
        container: &str,
        bind_mounts: BindMounts,
    ) -> Result<StatePlan, StateError> {
        let (c, volumes) = self.inspect_movable(container, bind_mounts).await?;
        let image_id = c.image.clone().unwrap_or_default();
        let reference = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.image.clone())
            .unwrap_or_default();
        Ok(StatePlan {
            image: self.image_ref(&image_id, &reference).await?,
            volumes: super::volumes::volume_specs(&c, &volumes),
            restart_policy: c
                .host_config
                .and_then(|h| h.restart_policy)
                .unwrap_or_else(super::policy::no_restart),
        })
    }

    async fn estimate_state_bytes(&self, id: &str, plan: &StatePlan) -> Result<u64, StateError> {
        super::Docker::estimate_state_bytes(self, id, &plan.volumes).await
    }

    async fn pause_restart_policy(&self, id: &str) -> Result<RestartPolicy, StateError> {
        self.pause_restarts(id).await
    }

    async fn set_restart_policy(&self, id: &str, policy: &RestartPolicy) -> Result<(), StateError> {
        self.update_restart_policy(id, policy).await
    }

    async fn pack_state(
        &self,
        id: &str,
        plan: &StatePlan,
        checkpoint_dir: &Path,
    ) -> Result<PackReport, StateError> {
        let started = std::time::Instant::now();
        let dir = checkpoint_dir.join(STATE_DIR);
        discard_state(checkpoint_dir)?;
        let rootfs = self.pack_rootfs(id, &dir.join(ROOTFS_TAR)).await?;
        let mut volumes = Vec::new();
        for v in plan.volumes.iter().filter(|v| v.copy) {
            let stats = self
                .pack_volume(&v.name, &super::volumes::volume_tar(&dir, &v.name))
                .await?;
            volumes.push((v.name.clone(), stats));
        }
        Ok(PackReport {
            rootfs,
            volumes,
            elapsed: started.elapsed(),
        })
    }

    async fn missing_image(&self, image: &ImageRef) -> Result<Option<HashSet<String>>, StateError> {
        self.image_chains_present(image).await
    }

    async fn export_image(
        &self,
        image: &ImageRef,
        have: &HashSet<String>,
        out: &Path,
    ) -> Result<ImageExport, StateError> {
        self.export_image_delta(image, have, out).await
    }

    async fn load_image(&self, image: &ImageRef, tar: &Path) -> Result<(), StateError> {
        self.load_image_tar(image, tar).await
    }

    async fn tag_image(&self, image: &ImageRef) -> Result<(), StateError> {
        self.tag_image_like(image).await
    }

    async fn create_volumes(&self, volumes: &[VolumeSpec]) -> Result<Vec<String>, StateError> {
        self.create_volumes_like(volumes).await
    }

    async fn apply_state(
        &self,
        id: &str,
        plan: &StatePlan,
        staging: &Path,
    ) -> Result<ApplyReport, StateError> {
        let started = std::time::Instant::now();
        let dir = staging.join(STATE_DIR);
        let rootfs = self.apply_rootfs(id, &dir.join(ROOTFS_TAR)).await?;
        let mut volumes = Vec::new();
        for v in plan.volumes.iter().filter(|v| v.copy) {
            let stats = self
                .fill_volume(&v.name, &super::volumes::volume_tar(&dir, &v.name))
                .await?;
            volumes.push((v.name.clone(), stats));
        }
        discard_state(staging)?;
        Ok(ApplyReport {
            rootfs,
            volumes,
            elapsed: started.elapsed(),
        })
    }

    async fn remove_volumes(&self, names: &[String]) -> Result<(), StateError> {
        self.remove_volume_names(names).await
    }

    async fn remove_unused_volumes(
        &self,
        volumes: &[VolumeSpec],
    ) -> Result<Vec<String>, StateError> {
        self.remove_volumes_unused(volumes).await
    }
}
