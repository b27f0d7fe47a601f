//! What a target lets a container arriving from a peer use. The create body
//! in a `Prepare` comes from another node, which may be compromised: the
//! target judges it by its own configuration, never by the sender's word.
//! By default: no privileged mode, no devices, no host namespaces, no host
//! paths (bind mounts, local volumes over a host path) outside the
//! allow-list, no capabilities beyond the allowed ones, no security options
//! that lift confinement.

use std::path::PathBuf;

use bollard::models::{ContainerCreateBody, HostConfig};

use super::mounts::{self, HostPaths, MountRefusal};
use super::volumes::VolumeSpec;
use super::ContainerSpec;

/// The target's own rules (`--allow-bind`, `--allow-cap`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// Host folders that bind mounts and local volumes may use (and all
    /// below them); absolute, without `..`.
    pub allow_bind: Vec<PathBuf>,
    /// Capabilities a container may add, upper case without `CAP_`.
    pub allow_cap: Vec<String>,
}

/// `CAP_NET_ADMIN`, `net_admin` and `NET_ADMIN` are one capability to the
/// engine.
pub fn cap_name(cap: &str) -> String {
    let upper = cap.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

/// The namespace modes of a host config, by field: `host` (or another
/// container's, `container:ID`) would share one of the node's own.
fn namespaces(h: &HostConfig) -> [(&'static str, Option<&String>); 5] {
    [
        ("HostConfig.NetworkMode", h.network_mode.as_ref()),
        ("HostConfig.PidMode", h.pid_mode.as_ref()),
        ("HostConfig.IpcMode", h.ipc_mode.as_ref()),
        ("HostConfig.UTSMode", h.uts_mode.as_ref()),
        ("HostConfig.UsernsMode", h.userns_mode.as_ref()),
    ]
}

impl HostPolicy {
    /// Whether a container created from `spec`, with the volumes `volumes`
    /// (the job's state plan), may run on this node; the first refusal
    /// names the create body's field.
    pub fn admit(&self, spec: &ContainerSpec, volumes: &[VolumeSpec]) -> Result<(), MountRefusal> {
        let refuse = |field, reason| Err(MountRefusal { field, reason });
        // Judged exactly as the engine will get it: the typed body that
        // `Engine::create` sends (a field the type does not know, or spelt
        // another way, never reaches the engine).
        let body: ContainerCreateBody = match serde_json::from_value(spec.create_body.clone()) {
            Ok(b) => b,
            Err(e) => return refuse("create_body", format!("not a container create body: {e}")),
        };
        let host = body.host_config.unwrap_or_default();
        let paths = HostPaths::Below(&self.allow_bind);
        mounts::check_host_config(&host, paths)?;
        for (field, mode) in namespaces(&host) {
            let mode = mode.map(String::as_str).unwrap_or("");
            if mode == "host" || mode.starts_with("container:") {
                return refuse(
                    field,
                    format!("{mode:?} shares a namespace of this node; not allowed here"),
                );
            }
        }
        for cap in host.cap_add.iter().flatten() {
            let name = cap_name(cap);
            if !self.allow_cap.contains(&name) {
                return refuse(
                    "HostConfig.CapAdd",
                    format!(
                        "capability {cap} is not allowed here (allowed: {:?}; see --allow-cap)",
                        self.allow_cap
                    ),
                );
            }
        }
        for opt in host.security_opt.iter().flatten() {
            if !opt.starts_with("no-new-privileges") {
                return refuse(
                    "HostConfig.SecurityOpt",
                    format!("{opt:?} changes the container's confinement; not allowed here"),
                );
            }
        }
        for v in volumes {
            mounts::check_volume(&v.name, &v.driver, &v.options, paths).map_err(|e| {
                MountRefusal {
                    field: "state.volumes",
                    reason: e.reason,
                }
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::TempDir;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    fn spec(host: Value) -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            image: "counter".into(),
            create_body: json!({"Image": "counter", "HostConfig": host}),
            networks: Vec::new(),
        }
    }

    fn field(policy: &HostPolicy, host: Value) -> Result<(), &'static str> {
        policy.admit(&spec(host), &[]).map_err(|e| e.field)
    }

    /// What `docker inspect` shows for a plain `docker run` on the bed.
    fn plain() -> Value {
        json!({
            "NetworkMode": "none", "PidMode": "", "IpcMode": "private", "UTSMode": "",
            "UsernsMode": "", "CgroupnsMode": "host", "CapAdd": null, "SecurityOpt": null,
            "Devices": [], "Binds": ["vol1:/data"], "Privileged": false,
            "Mounts": [{"Type": "tmpfs", "Target": "/t"}]
        })
    }

    #[test]
    fn a_plain_container_is_admitted() {
        assert_eq!(field(&HostPolicy::default(), plain()), Ok(()));
        assert_eq!(field(&HostPolicy::default(), json!({})), Ok(()));
        let no_host = ContainerSpec {
            create_body: json!({"Image": "counter"}),
            ..spec(json!({}))
        };
        assert!(HostPolicy::default().admit(&no_host, &[]).is_ok());
    }

    #[test]
    fn each_escape_is_refused_naming_its_field() {
        let p = HostPolicy::default();
        let cases = [
            (json!({"Privileged": true}), "HostConfig.Privileged"),
            (
                json!({"Devices": [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda", "CgroupPermissions": "rwm"}]}),
                "HostConfig.Devices",
            ),
            (
                json!({"DeviceCgroupRules": ["b 8:* rwm"]}),
                "HostConfig.DeviceCgroupRules",
            ),
            (json!({"Binds": ["/:/host"]}), "HostConfig.Binds"),
            (json!({"Binds": ["/etc:/e:ro"]}), "HostConfig.Binds"),
            (
                json!({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}),
                "HostConfig.Mounts",
            ),
            (
                json!({"Mounts": [{"Type": "volume", "Source": "v", "Target": "/v",
                    "VolumeOptions": {"DriverConfig": {"Name": "local",
                    "Options": {"type": "none", "o": "bind", "device": "/"}}}}]}),
                "HostConfig.Mounts",
            ),
            (json!({"NetworkMode": "host"}), "HostConfig.NetworkMode"),
            (
                json!({"NetworkMode": "container:x"}),
                "HostConfig.NetworkMode",
            ),
            (json!({"PidMode": "host"}), "HostConfig.PidMode"),
            (json!({"IpcMode": "host"}), "HostConfig.IpcMode"),
            (json!({"UTSMode": "host"}), "HostConfig.UTSMode"),
            (json!({"UsernsMode": "host"}), "HostConfig.UsernsMode"),
            (json!({"CapAdd": ["SYS_ADMIN"]}), "HostConfig.CapAdd"),
            (json!({"CapAdd": ["ALL"]}), "HostConfig.CapAdd"),
            (
                json!({"SecurityOpt": ["seccomp=unconfined"]}),
                "HostConfig.SecurityOpt",
            ),
            (
                json!({"SecurityOpt": ["apparmor=unconfined"]}),
                "HostConfig.SecurityOpt",
            ),
            (json!({"Privileged": "yes"}), "create_body"),
        ];
        for (host, want) in cases {
            assert_eq!(field(&p, host.clone()), Err(want), "{host}");
        }
        assert_eq!(
            field(&p, json!({"SecurityOpt": ["no-new-privileges:true"]})),
            Ok(())
        );
        let e = p
            .admit(&spec(json!({"Binds": ["/:/host"]})), &[])
            .unwrap_err();
        assert!(
            e.reason.contains("/:/host") && e.reason.contains("--allow-bind"),
            "{e}"
        );
    }

    #[test]
    fn allowed_capabilities_and_paths_pass() {
        let dir = TempDir::new("admission");
        let data = dir.join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let p = HostPolicy {
            allow_bind: vec![data.clone()],
            allow_cap: vec!["NET_ADMIN".into()],
        };
        let d = data.display();
        for host in [
            json!({"CapAdd": ["NET_ADMIN", "cap_net_admin"]}),
            json!({"Binds": [format!("{d}:/d"), format!("{d}/sub:/s:ro"), format!("{d}/new:/n")]}),
            json!({"Mounts": [{"Type": "bind", "Source": format!("{d}/sub"), "Target": "/s"}]}),
        ] {
            assert_eq!(field(&p, host.clone()), Ok(()), "{host}");
        }
        // A sibling whose name starts alike, a way up, a relative path and
        // a symlink out of the allowed folder are all outside it.
        std::os::unix::fs::symlink("/", data.join("root")).unwrap();
        for bad in [
            format!("{d}2"),
            format!("{d}/../x"),
            format!("{d}/root"),
            format!("{d}/root/etc"),
        ] {
            let host = json!({"Binds": [format!("{bad}:/x")]});
            assert_eq!(field(&p, host), Err("HostConfig.Binds"), "{bad}");
        }
        assert_eq!(
            field(&p, json!({"CapAdd": ["SYS_ADMIN"]})),
            Err("HostConfig.CapAdd")
        );
    }

    #[test]
    fn state_plan_volumes_over_host_paths_need_the_allow_list() {
        let volume = |device: Option<&str>, driver: &str| VolumeSpec {
            name: "v".into(),
            destination: "/v".into(),
            anonymous: false,
            driver: driver.into(),
            labels: HashMap::new(),
            options: device
                .map(|d| HashMap::from([("device".to_string(), d.to_string())]))
                .unwrap_or_default(),
            copy: device.is_none(),
        };
        let p = HostPolicy::default();
        let s = spec(plain());
        assert!(p.admit(&s, &[volume(None, "local")]).is_ok());
        for v in [volume(Some("/"), "local"), volume(None, "nfs-plugin")] {
            assert_eq!(p.admit(&s, &[v]).unwrap_err().field, "state.volumes");
        }
        let p = HostPolicy {
            allow_bind: vec!["/srv/ferry".into()],
            ..HostPolicy::default()
        };
        assert!(p
            .admit(&s, &[volume(Some("/srv/ferry/v"), "local")])
            .is_ok());
    }

    #[test]
    fn capability_spellings() {
        assert_eq!(cap_name("cap_net_admin"), "NET_ADMIN");
        assert_eq!(cap_name("NET_ADMIN"), "NET_ADMIN");
        assert_eq!(cap_name(" sys_time "), "SYS_TIME");
    }
}
