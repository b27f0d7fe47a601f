//! Which of a container's mounts can move, decided from `docker inspect`
//! alone: local volumes travel with their contents; a bind mount (or a local
//! volume over a host path) only when the job says its path exists on the
//! target; devices and privileged containers never.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use bollard::models::{ContainerInspectResponse, HostConfig, MountType, Volume};
use serde::{Deserialize, Serialize};

/// The job option `bind_mounts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindMounts {
    /// Refuse a container with bind mounts (the default).
    #[default]
    Refuse,
    /// The bind-mounted paths exist on the target: mount them there as they
    /// are, without copying anything.
    Present,
}

/// Why a container cannot move: the `docker inspect` field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct MountRefusal {
    pub field: &'static str,
    pub reason: String,
}

const PRESENT_HINT: &str =
    "set the job option bind_mounts: \"present\" if that path exists on the target";

/// Where the host paths a container names (bind mounts, local volumes over
/// a host path) may point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPaths<'a> {
    /// Nowhere: the source's default.
    Refuse,
    /// Anywhere: the job says they exist on the target (source side).
    Present,
    /// Only these folders and what lies below them: the target's allow-list
    /// (`--allow-bind`).
    Below(&'a [PathBuf]),
}

impl From<BindMounts> for HostPaths<'static> {
    fn from(b: BindMounts) -> Self {
        match b {
            BindMounts::Refuse => HostPaths::Refuse,
            BindMounts::Present => HostPaths::Present,
        }
    }
}

impl HostPaths<'_> {
    /// `None` when `path` may be used; else why not.
    fn refusal(&self, path: &str) -> Option<String> {
        match self {
            HostPaths::Present => None,
            HostPaths::Refuse => Some(format!("needs that path on the target; {PRESENT_HINT}")),
            HostPaths::Below(allowed) if path_below(Path::new(path), allowed) => None,
            HostPaths::Below(allowed) => Some(format!(
                "{path} is not below a path this node allows ({}; see --allow-bind)",
                if allowed.is_empty() {
                    "it allows none".to_string()
                } else {
                    allowed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )),
        }
    }
}

/// `path` is absolute, has no `..`, and lies in or below one of `allowed`,
/// both as written and once the symlinks of its longest existing ancestor
/// are resolved (the engine follows them, and creates what is missing).
pub fn path_below(path: &Path, allowed: &[PathBuf]) -> bool {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return false;
    }
    if !allowed.iter().any(|a| path.starts_with(a)) {
        return false;
    }
    let real = resolved(path);
    allowed.iter().any(|a| real.starts_with(resolved(a)))
}

/// `path` with the symlinks of its longest existing ancestor resolved; the
/// rest as written.
fn resolved(path: &Path) -> PathBuf {
    for ancestor in path.ancestors() {
        if let Ok(real) = std::fs::canonicalize(ancestor) {
            let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
            return real.join(rest);
        }
    }
    path.to_path_buf()
}

/// The host side of a container: no privileged mode, no devices, no mounts
/// from other containers, and host paths only as `paths` allows. The one
/// check behind the source's [`check_mounts`] and the target's
/// [`super::admission`].
pub fn check_host_config(host: &HostConfig, paths: HostPaths) -> Result<(), MountRefusal> {
    let refuse = |field, reason| Err(MountRefusal { field, reason });
    if host.privileged == Some(true) {
        return refuse(
            "HostConfig.Privileged",
            "a privileged container uses its node's devices and kernel settings; it cannot move"
                .into(),
        );
    }
    if let Some(d) = host.devices.as_ref().and_then(|d| d.first()) {
        return refuse(
            "HostConfig.Devices",
            format!(
                "device {} (as {}) belongs to the source; containers with devices cannot move",
                d.path_on_host.as_deref().unwrap_or("?"),
                d.path_in_container.as_deref().unwrap_or("?")
            ),
        );
    }
    if let Some(r) = host.device_requests.as_ref().and_then(|d| d.first()) {
        return refuse(
            "HostConfig.DeviceRequests",
            format!(
                "device request for driver {:?} belongs to the source; containers with devices cannot move",
                r.driver.as_deref().unwrap_or("")
            ),
        );
    }
    if let Some(rule) = host.device_cgroup_rules.as_ref().and_then(|d| d.first()) {
        return refuse(
            "HostConfig.DeviceCgroupRules",
            format!("device rule {rule:?} gives access to its node's devices; containers with devices cannot move"),
        );
    }
    if let Some(from) = host.volumes_from.as_ref().and_then(|v| v.first()) {
        return refuse(
            "HostConfig.VolumesFrom",
            format!("mounts come from container {from}, which stays on the source"),
        );
    }
    for bind in host.binds.iter().flatten() {
        let source = bind.split(':').next().unwrap_or("");
        if !source.starts_with('/') {
            continue;
        }
        if let Some(why) = paths.refusal(source) {
            return refuse("HostConfig.Binds", format!("bind mount {bind}: {why}"));
        }
    }
    for m in host.mounts.iter().flatten() {
        let target = m.target.as_deref().unwrap_or("?");
        let source = m.source.as_deref().unwrap_or("?");
        match m.typ {
            Some(MountType::BIND) => {
                if let Some(why) = paths.refusal(source) {
                    return refuse(
                        "HostConfig.Mounts",
                        format!("bind mount of {source} at {target}: {why}"),
                    );
                }
            }
            Some(MountType::VOLUME) => {
                let config = m
                    .volume_options
                    .as_ref()
                    .and_then(|o| o.driver_config.as_ref());
                if let Some(c) = config {
                    let driver = c.name.as_deref().unwrap_or("local");
                    let options = c.options.clone().unwrap_or_default();
                    check_volume(source, driver, &options, paths).map_err(|e| MountRefusal {
                        field: "HostConfig.Mounts",
                        reason: e.reason,
                    })?;
                }
            }
            Some(MountType::TMPFS) | None => {}
            Some(other) => {
                return refuse(
                    "HostConfig.Mounts",
                    format!("{other:?} mount at {target} cannot move"),
                )
            }
        }
    }
    Ok(())
}

/// A volume the container needs: only the local driver, and a local volume
/// over a host path (its `device` option) only where `paths` allows.
pub fn check_volume(
    name: &str,
    driver: &str,
    options: &HashMap<String, String>,
    paths: HostPaths,
) -> Result<(), MountRefusal> {
    if driver != "local" && !driver.is_empty() {
        return Err(MountRefusal {
            field: "Mounts",
            reason: format!("volume {name} uses driver {driver}; only local volumes move"),
        });
    }
    if let Some(device) = options.get("device") {
        if let Some(why) = paths.refusal(device) {
            return Err(MountRefusal {
                field: "Mounts",
                reason: format!("volume {name} is a local volume over {device}: {why}"),
            });
        }
    }
    Ok(())
}

/// Checks the inspected container and the volumes it mounts (as `docker
/// volume inspect` gives them); the first refusal wins.
pub fn check_mounts(
    c: &ContainerInspectResponse,
    volumes: &[Volume],
    bind_mounts: BindMounts,
) -> Result<(), MountRefusal> {
    let paths = HostPaths::from(bind_mounts);
    check_host_config(&c.host_config.clone().unwrap_or_default(), paths)?;
    for m in c.mounts.iter().flatten() {
        if m.typ.as_deref() != Some("volume") {
            continue;
        }
        let name = m.name.as_deref().unwrap_or("?");
        let driver = m.driver.as_deref().unwrap_or("local");
        check_volume(name, driver, &HashMap::new(), paths)?;
        let Some(v) = volumes.iter().find(|v| v.name == name) else {
            return Err(MountRefusal {
                field: "Mounts",
                reason: format!("volume {name} could not be inspected"),
            });
        };
        check_volume(name, driver, &v.options, paths)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker inspect` output captured on the bed (Engine 20.10.24).
    fn fixture(name: &str) -> ContainerInspectResponse {
        let text = match name {
            "plain" => include_str!("fixtures/plain.json"),
            "volumes" => include_str!("fixtures/volumes.json"),
            "bind" => include_str!("fixtures/bind.json"),
            "bind-mount" => include_str!("fixtures/bind-mount.json"),
            "device" => include_str!("fixtures/device.json"),
            "privileged" => include_str!("fixtures/privileged.json"),
            "tmpfs" => include_str!("fixtures/tmpfs.json"),
            "devvol" => include_str!("fixtures/devvol.json"),
            "volumes-from" => include_str!("fixtures/volumes-from.json"),
            other => panic!("no fixture {other}"),
        };
        serde_json::from_str(text).expect("fixture parses as an inspect response")
    }

    fn volume(name: &str) -> Volume {
        let text = match name {
            "named" => include_str!("fixtures/named-volume.json"),
            "devvol" => include_str!("fixtures/devvol-volume.json"),
            other => panic!("no fixture {other}"),
        };
        serde_json::from_str(text).expect("fixture parses as a volume")
    }

    /// The volumes a fixture mounts, as volume inspect would give them.
    fn volumes_of(c: &ContainerInspectResponse) -> Vec<Volume> {
        c.mounts
            .iter()
            .flatten()
            .filter(|m| m.typ.as_deref() == Some("volume"))
            .map(|m| {
                let name = m.name.clone().unwrap_or_default();
                let mut v = if name == "devvol" {
                    volume("devvol")
                } else {
                    volume("named")
                };
                v.name = name;
                v
            })
            .collect()
    }

    fn check(name: &str, bind_mounts: BindMounts) -> Result<(), MountRefusal> {
        let c = fixture(name);
        check_mounts(&c, &volumes_of(&c), bind_mounts)
    }

    #[test]
    fn plain_volumes_and_tmpfs_move() {
        for name in ["plain", "volumes", "tmpfs"] {
            assert_eq!(check(name, BindMounts::Refuse), Ok(()), "{name}");
        }
    }

    #[test]
    fn binds_are_refused_naming_the_field_unless_present() {
        let e = check("bind", BindMounts::Refuse).unwrap_err();
        assert_eq!(e.field, "HostConfig.Binds");
        assert!(e.reason.contains("/tmp/fb-engine/bindsrc:/b"), "{e}");
        assert!(e.reason.contains("bind_mounts: \"present\""), "{e}");
        let e = check("bind-mount", BindMounts::Refuse).unwrap_err();
        assert_eq!(e.field, "HostConfig.Mounts");
        assert!(e.reason.contains("/tmp/fb-engine/bindsrc"), "{e}");
        let e = check("devvol", BindMounts::Refuse).unwrap_err();
        assert_eq!(e.field, "Mounts");
        assert!(
            e.reason.contains("devvol") && e.reason.contains("bindsrc"),
            "{e}"
        );
        for name in ["bind", "bind-mount", "devvol"] {
            assert_eq!(check(name, BindMounts::Present), Ok(()), "{name}");
        }
    }

    #[test]
    fn devices_and_privileged_stay_refused() {
        for present in [BindMounts::Refuse, BindMounts::Present] {
            let e = check("device", present).unwrap_err();
            assert_eq!(e.field, "HostConfig.Devices");
            assert!(e.reason.contains("/dev/null"), "{e}");
            let e = check("privileged", present).unwrap_err();
            assert_eq!(e.field, "HostConfig.Privileged");
            let e = check("volumes-from", present).unwrap_err();
            assert_eq!(e.field, "HostConfig.VolumesFrom");
            assert!(e.reason.contains("fx-base"), "{e}");
        }
    }

    #[test]
    fn other_volume_drivers_are_refused() {
        let mut c = fixture("volumes");
        if let Some(m) = c.mounts.as_mut().and_then(|m| m.first_mut()) {
            m.driver = Some("nfs-plugin".into());
        }
        let e = check_mounts(&c, &volumes_of(&c), BindMounts::Present).unwrap_err();
        assert_eq!(e.field, "Mounts");
        assert!(e.reason.contains("probe-named") && e.reason.contains("nfs-plugin"));
    }

    #[test]
    fn job_option_spelling() {
        let p: BindMounts = serde_json::from_str("\"present\"").unwrap();
        assert_eq!(p, BindMounts::Present);
        assert_eq!(BindMounts::default(), BindMounts::Refuse);
        assert!(serde_json::from_str::<BindMounts>("\"yes\"").is_err());
    }
}
