//! Local volumes, named and anonymous: which a container mounts, their
//! contents packed on the source, the same volumes created and filled on the
//! target, and the source's copies removed after the commit unless another
//! container uses them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{ContainerInspectResponse, Volume, VolumeCreateRequest};
use bollard::query_parameters::{ListContainersOptions, RemoveVolumeOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::docker::engine_err;
use super::mounts::BindMounts;
use super::rootfs::{self, ApplyLimits, ApplyStats, PackStats, TreeKind};
use super::state::StateError;
use super::Docker;

/// One volume a container mounts, as the target must create it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    /// Where the container mounts it.
    pub destination: String,
    /// Created by the engine for an image or `-v /path` volume: the create
    /// body does not name it, so [`name_anonymous_volumes`] must.
    pub anonymous: bool,
    pub driver: String,
    pub labels: HashMap<String, String>,
    pub options: HashMap<String, String>,
    /// Whether its contents travel: false for a local volume over a host
    /// path (`device` option), which the target provides itself.
    pub copy: bool,
}

/// The local volumes of an inspected container, from its `Mounts` and the
/// volumes' own inspect output. Call after [`super::mounts::check_mounts`].
pub fn volume_specs(c: &ContainerInspectResponse, volumes: &[Volume]) -> Vec<VolumeSpec> {
    let host = c.host_config.clone().unwrap_or_default();
    let named_in_binds = |name: &str, dest: &str| {
        host.binds.iter().flatten().any(|b| {
            let mut parts = b.split(':');
            parts.next() == Some(name) && parts.next() == Some(dest)
        })
    };
    let named_in_mounts = |name: &str| {
        host.mounts
            .iter()
            .flatten()
            .any(|m| m.source.as_deref() == Some(name))
    };
    c.mounts
        .iter()
        .flatten()
        .filter(|m| m.typ.as_deref() == Some("volume"))
        .filter_map(|m| {
            let name = m.name.clone()?;
            let destination = m.destination.clone()?;
            let v = volumes.iter().find(|v| v.name == name);
            let options = v.map(|v| v.options.clone()).unwrap_or_default();
            Some(VolumeSpec {
                anonymous: !named_in_binds(&name, &destination) && !named_in_mounts(&name),
                driver: m.driver.clone().unwrap_or_else(|| "local".into()),
                labels: v.map(|v| v.labels.clone()).unwrap_or_default(),
                copy: !options.contains_key("device"),
                options,
                name,
                destination,
            })
        })
        .collect()
}

/// Makes a create body mount each anonymous volume by its name, so the
/// target's engine uses the volume created for it instead of a new empty
/// one: a `--mount` without a source gets the name, any other gets a
/// `name:destination` bind entry (which takes the place of `Config.Volumes`).
pub fn name_anonymous_volumes(create_body: &mut Value, volumes: &[VolumeSpec]) {
    let Some(body) = create_body.as_object_mut() else {
        return;
    };
    let host = body
        .entry("HostConfig")
        .or_insert_with(|| Value::Object(Default::default()));
    let Some(host) = host.as_object_mut() else {
        return;
    };
    for v in volumes.iter().filter(|v| v.anonymous) {
        let unnamed_mount = host
            .get_mut("Mounts")
            .and_then(Value::as_array_mut)
            .and_then(|mounts| {
                mounts.iter_mut().find(|m| {
                    m.get("Target").and_then(Value::as_str) == Some(v.destination.as_str())
                        && m.get("Source")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                })
            });
        if let Some(m) = unnamed_mount {
            m["Source"] = Value::String(v.name.clone());
            continue;
        }
        let binds = host
            .entry("Binds")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !binds.is_array() {
            *binds = Value::Array(Vec::new());
        }
        if let Some(binds) = binds.as_array_mut() {
            binds.push(Value::String(format!("{}:{}", v.name, v.destination)));
        }
    }
}

/// Where a volume's tar lies in a state folder.
pub fn volume_tar(state_dir: &Path, name: &str) -> PathBuf {
    state_dir
        .join(super::state::VOLUMES_DIR)
        .join(format!("{name}.tar"))
}

/// Volume names are `[a-zA-Z0-9][a-zA-Z0-9_.-]+` in Docker; anything else
/// from a peer must not become a path.
fn check_name(name: &str) -> Result<(), StateError> {
    let ok = name.len() >= 2
        && name.len() <= 255
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StateError::Unsupported(format!(
            "volume name {name:?} is not a Docker volume name"
        )))
    }
}

impl Docker {
    /// The inspected container and the volumes it mounts.
    pub(super) async fn inspect_with_volumes(
        &self,
        container: &str,
    ) -> Result<(ContainerInspectResponse, Vec<Volume>), StateError> {
        let c = self
            .api()
            .inspect_container(container, None)
            .await
            .map_err(engine_err("inspect", container))?;
        let mut volumes = Vec::new();
        for m in c.mounts.iter().flatten() {
            if m.typ.as_deref() != Some("volume") {
                continue;
            }
            if let Some(name) = &m.name {
                let v = self
                    .api()
                    .inspect_volume(name)
                    .await
                    .map_err(engine_err("inspect volume", name))?;
                volumes.push(v);
            }
        }
        Ok((c, volumes))
    }

    /// [`Self::inspect_with_volumes`], refused unless every mount of the
    /// container can travel (or, for bind mounts, is allowed to stay).
    pub(super) async fn inspect_movable(
        &self,
        container: &str,
        bind_mounts: BindMounts,
    ) -> Result<(ContainerInspectResponse, Vec<Volume>), StateError> {
        let (c, volumes) = self.inspect_with_volumes(container).await?;
        super::mounts::check_mounts(&c, &volumes, bind_mounts).map_err(|refusal| {
            StateError::Refused {
                container: container.to_string(),
                refusal,
            }
        })?;
        Ok((c, volumes))
    }

    /// A local volume's folder on this node.
    pub async fn volume_dir(&self, name: &str) -> Result<PathBuf, StateError> {
        self.mountpoint(name).await
    }

    async fn mountpoint(&self, name: &str) -> Result<PathBuf, StateError> {
        let v = self
            .api()
            .inspect_volume(name)
            .await
            .map_err(engine_err("inspect volume", name))?;
        if v.driver != "local" || v.mountpoint.is_empty() {
            return Err(StateError::Unsupported(format!(
                "volume {name} (driver {}) has no local folder",
                v.driver
            )));
        }
        Ok(PathBuf::from(v.mountpoint))
    }

    /// Source, after the checkpoint: packs one volume's folder to `out`.
    pub async fn pack_volume(&self, name: &str, out: &Path) -> Result<PackStats, StateError> {
        check_name(name)?;
        let dir = self.mountpoint(name).await?;
        let out = out.to_path_buf();
        blocking(move || rootfs::pack_tree_to_file(&dir, TreeKind::Volume, &out)).await
    }

    /// Target: creates the volumes as the source had them.
    pub async fn create_volumes_like(
        &self,
        volumes: &[VolumeSpec],
    ) -> Result<Vec<String>, StateError> {
        let mut created = Vec::new();
        let result = async {
            for v in volumes {
                check_name(&v.name)?;
                match self.api().inspect_volume(&v.name).await {
                    Ok(_) => return Err(StateError::VolumeExists(v.name.clone())),
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    }) => {}
                    Err(e) => return Err(engine_err("inspect volume", &v.name)(e).into()),
                }
                let request = VolumeCreateRequest {
                    name: Some(v.name.clone()),
                    driver: Some(v.driver.clone()),
                    driver_opts: Some(v.options.clone()),
                    labels: Some(v.labels.clone()),
                    ..Default::default()
                };
                self.api()
                    .create_volume(request)
                    .await
                    .map_err(engine_err("create volume", &v.name))?;
                created.push(v.name.clone());
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(created),
            Err(e) => {
                let _ = self.remove_volume_names(&created).await;
                Err(e)
            }
        }
    }

    /// Target, before the restore: empties the volume (the engine may have
    /// copied the image's files into it) and applies its tar.
    pub async fn fill_volume(&self, name: &str, tar: &Path) -> Result<ApplyStats, StateError> {
        check_name(name)?;
        let dir = self.mountpoint(name).await?;
        let tar = tar.to_path_buf();
        blocking(move || {
            empty_dir(&dir)?;
            let file = std::fs::File::open(&tar).map_err(|e| StateError::io(&tar, "opening", e))?;
            let limits = ApplyLimits {
                max_total_bytes: file.metadata().map(|m| m.len()).unwrap_or(0),
                ..ApplyLimits::default()
            };
            rootfs::apply_tree(
                std::io::BufReader::with_capacity(1 << 20, file),
                &dir,
                TreeKind::Volume,
                &limits,
            )
        })
        .await
    }

    pub async fn remove_volume_names(&self, names: &[String]) -> Result<(), StateError> {
        for name in names {
            match self
                .api()
                .remove_volume(name, None::<RemoveVolumeOptions>)
                .await
            {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(engine_err("remove volume", name)(e).into()),
            }
        }
        Ok(())
    }

    /// Source, after the commit: removes each volume no container uses.
    pub async fn remove_volumes_unused(
        &self,
        volumes: &[VolumeSpec],
    ) -> Result<Vec<String>, StateError> {
        let mut removed = Vec::new();
        for v in volumes {
            let options = ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("volume".into(), vec![v.name.clone()])])),
                ..Default::default()
            };
            let users = self
                .api()
                .list_containers(Some(options))
                .await
                .map_err(engine_err("list containers", &v.name))?;
            if users.is_empty() {
                self.remove_volume_names(std::slice::from_ref(&v.name))
                    .await?;
                removed.push(v.name.clone());
            }
        }
        Ok(removed)
    }
}

/// Removes everything inside `dir`, never following a symlink.
fn empty_dir(dir: &Path) -> Result<(), StateError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StateError::io(dir, "listing", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StateError::io(dir, "listing", e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| StateError::io(&path, "reading", e))?;
        let r = if kind.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.map_err(|e| StateError::io(&path, "removing", e))?;
    }
    Ok(())
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Io {
            context: "a blocking state task".into(),
            source: std::io::Error::other(e),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> (ContainerInspectResponse, Vec<Volume>) {
        let c: ContainerInspectResponse =
            serde_json::from_str(include_str!("fixtures/volumes.json")).unwrap();
        let named: Volume =
            serde_json::from_str(include_str!("fixtures/named-volume.json")).unwrap();
        let mut anon = named.clone();
        anon.name = "dd323a178f6bb259f93eb035b42b9795aacdfaf18b6b65971eea57bc5c5318c3".into();
        (c, vec![named, anon])
    }

    #[test]
    fn specs_tell_named_from_anonymous() {
        let (c, volumes) = fixture();
        let specs = volume_specs(&c, &volumes);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "probe-named");
        assert_eq!(specs[0].destination, "/named");
        assert!(!specs[0].anonymous && specs[0].copy);
        assert_eq!(specs[1].destination, "/anon");
        assert!(specs[1].anonymous && specs[1].copy);
        assert_eq!(specs[1].driver, "local");
    }

    #[test]
    fn a_volume_over_a_host_path_is_not_copied() {
        let c: ContainerInspectResponse =
            serde_json::from_str(include_str!("fixtures/devvol.json")).unwrap();
        let v: Volume = serde_json::from_str(include_str!("fixtures/devvol-volume.json")).unwrap();
        let specs = volume_specs(&c, &[v]);
        assert_eq!(specs.len(), 1);
        assert!(!specs[0].copy && !specs[0].anonymous);
        assert_eq!(specs[0].options["device"], "/tmp/fb-engine/bindsrc");
        assert_eq!(specs[0].labels["app"], "x");
    }

    #[test]
    fn anonymous_volumes_get_named_in_the_create_body() {
        let (c, volumes) = fixture();
        let specs = volume_specs(&c, &volumes);
        let mut body = json!({
            "Image": "ferry-probe:1",
            "Volumes": {"/anon": {}},
            "HostConfig": {"Binds": ["probe-named:/named"]}
        });
        name_anonymous_volumes(&mut body, &specs);
        assert_eq!(
            body["HostConfig"]["Binds"],
            json!([
                "probe-named:/named",
                "dd323a178f6bb259f93eb035b42b9795aacdfaf18b6b65971eea57bc5c5318c3:/anon"
            ])
        );

        // `--mount type=volume,target=/anon` (no source) and no Binds.
        let mut body = json!({
            "HostConfig": {"Binds": null, "Mounts": [{"Type": "volume", "Target": "/anon"}]}
        });
        name_anonymous_volumes(&mut body, &specs);
        assert_eq!(
            body["HostConfig"]["Mounts"][0]["Source"],
            "dd323a178f6bb259f93eb035b42b9795aacdfaf18b6b65971eea57bc5c5318c3"
        );
        assert_eq!(body["HostConfig"]["Binds"], Value::Null);
    }

    #[test]
    fn volume_names_from_a_peer_cannot_become_paths() {
        assert!(check_name("probe-named").is_ok());
        for bad in ["../x", "a/b", ".hidden", "", "x", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
