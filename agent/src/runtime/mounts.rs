//! Which of a container's mounts can move, decided from `docker inspect`
//! alone: local volumes travel with their contents; a bind mount (or a local
//! volume over a host path) only when the job says its path exists on the
//! target; devices and privileged containers never.

use bollard::models::{ContainerInspectResponse, MountType, Volume};
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

/// Checks the inspected container and the volumes it mounts (as `docker
/// volume inspect` gives them); the first refusal wins.
pub fn check_mounts(
    c: &ContainerInspectResponse,
    volumes: &[Volume],
    bind_mounts: BindMounts,
) -> Result<(), MountRefusal> {
    let refuse = |field, reason| Err(MountRefusal { field, reason });
    let host = c.host_config.clone().unwrap_or_default();
    if host.privileged == Some(true) {
        return refuse(
            "HostConfig.Privileged",
            "a privileged container uses the source's devices and kernel settings; it cannot move"
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
    if let Some(from) = host.volumes_from.as_ref().and_then(|v| v.first()) {
        return refuse(
            "HostConfig.VolumesFrom",
            format!("mounts come from container {from}, which stays on the source"),
        );
    }
    let present = bind_mounts == BindMounts::Present;
    for bind in host.binds.iter().flatten() {
        let source = bind.split(':').next().unwrap_or("");
        if source.starts_with('/') && !present {
            return refuse(
                "HostConfig.Binds",
                format!("bind mount {bind} needs that path on the target; {PRESENT_HINT}"),
            );
        }
    }
    for m in host.mounts.iter().flatten() {
        let target = m.target.as_deref().unwrap_or("?");
        match m.typ {
            Some(MountType::BIND) if !present => {
                return refuse(
                    "HostConfig.Mounts",
                    format!(
                    "bind mount of {} at {target} needs that path on the target; {PRESENT_HINT}",
                    m.source.as_deref().unwrap_or("?")
                ),
                )
            }
            Some(MountType::BIND | MountType::VOLUME | MountType::TMPFS) | None => {}
            Some(other) => {
                return refuse(
                    "HostConfig.Mounts",
                    format!("{other:?} mount at {target} cannot move"),
                )
            }
        }
    }
    for m in c.mounts.iter().flatten() {
        if m.typ.as_deref() != Some("volume") {
            continue;
        }
        let name = m.name.as_deref().unwrap_or("?");
        let driver = m.driver.as_deref().unwrap_or("local");
        if driver != "local" {
            return refuse(
                "Mounts",
                format!("volume {name} uses driver {driver}; only local volumes move"),
            );
        }
        let Some(v) = volumes.iter().find(|v| v.name == name) else {
            return refuse("Mounts", format!("volume {name} could not be inspected"));
        };
        if let Some(device) = v.options.get("device") {
            if !present {
                return refuse(
                    "Mounts",
                    format!(
                        "volume {name} is a local volume over {device}, which must exist on the target; {PRESENT_HINT}"
                    ),
                );
            }
        }
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
