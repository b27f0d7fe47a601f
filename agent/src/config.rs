//! Agent configuration: flags and a TOML file (a flag wins), validated into
//! an [`AgentConfig`] before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::mqtt::contract::{validate_id, Topics, DEFAULT_TOPIC_ROOT};
use crate::mqtt::BrokerUrl;
use crate::runtime::RuncSettings;

pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// dockerd's default `--exec-root`; runc's state is below it.
pub const DEFAULT_DOCKER_EXEC_ROOT: &str = "/run/docker";
/// Debian's docker.io runs the `runc` package's binary, found on PATH.
pub const DEFAULT_RUNC: &str = "runc";
/// runc's own default: `criu` on PATH.
pub const DEFAULT_CRIU: &str = "criu";
pub use crate::runtime::docker::DEFAULT_CRIU_CONFIG;
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7070";
/// Staging in RAM is only chosen when this much memory is available.
pub const TMPFS_MIN_AVAILABLE: u64 = 1 << 30;
pub const TMPFS_WORK_DIR: &str = "/run/ferry";
pub const DISK_WORK_DIR: &str = "/var/lib/ferry";
/// The job ledger's home: persistent, so that a reboot (a fresh /run)
/// never forgets which jobs already ran. The unit's `StateDirectory=ferry`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";
/// Shorter than the unit's `TimeoutStopSec` (90 s) so a drain always ends
/// with a recorded job state before systemd kills the agent.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing {0} (give the flag or set it in the config file)")]
    Missing(&'static str),
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// The agent's settings as given: every field optional, both as a flag and
/// as a key of the TOML file (snake_case: `--node-id` is `node_id`).
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// This node's id: its MQTT client id and topic level; must match its certificate.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Broker URL: mqtt://host[:port] or mqtts://host[:port].
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Docker Engine unix socket.
    #[arg(long)]
    pub docker: Option<String>,
    /// Data port for incoming checkpoints (ADDR:PORT).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address peers dial for this node's data port (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Checkpoint staging folder (default: /run/ferry when RAM allows, else /var/lib/ferry).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Persistent state (the ledger of job ids seen); never on tmpfs (default: /var/lib/ferry).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Topic root.
    #[arg(long)]
    pub topic_root: Option<String>,
    /// Fleet CA certificate (PEM).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The fleet manager's public order key (PEM, `order.pub` from `ferry certs`): only jobs it signed are run. Without it any well-formed job is (development only).
    #[arg(long)]
    pub order_key: Option<PathBuf>,
    /// The fleet CA's revocation list (PEM, `ferry certs` writes crl.pem): the data port refuses the certificates it lists; reloaded on SIGHUP.
    #[arg(long)]
    pub tls_crl: Option<PathBuf>,
    /// Allow plain TCP for MQTT and the data port when no TLS files are given (development only).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// Seconds a SIGTERM drain may take before the agent gives up waiting.
    #[arg(long)]
    pub drain_timeout_secs: Option<u64>,
    /// Checkpoints go through `runc` (default: straight into the engine's checkpoint folder) or `engine` (Docker's own call).
    #[arg(long)]
    pub checkpoint_with: Option<String>,
    /// The Docker daemon's exec-root (dockerd --exec-root; default /run/docker).
    #[arg(long)]
    pub docker_exec_root: Option<PathBuf>,
    /// The runc the engine runs (a name on PATH or an absolute path; default runc).
    #[arg(long)]
    pub runc_path: Option<PathBuf>,
    /// The CRIU the engine's runc runs (a name on PATH or an absolute path; default criu).
    #[arg(long)]
    pub criu_path: Option<PathBuf>,
    /// The CRIU configuration file runc hands CRIU on this node (default /etc/criu/runc.conf).
    #[arg(long)]
    pub criu_config: Option<PathBuf>,
    /// Most memory, in bytes, this node offers incoming containers: its status's free_mem never says more (default: all the kernel reports available).
    #[arg(long)]
    pub offer_memory: Option<u64>,
    /// A host folder incoming containers may bind-mount (and all below it); repeatable. Default: none.
    #[arg(long = "allow-bind", value_name = "PATH")]
    #[serde(default)]
    pub allow_bind: Vec<PathBuf>,
    /// A capability incoming containers may add (NET_ADMIN, ...); repeatable. Default: none.
    #[arg(long = "allow-cap", value_name = "CAP")]
    #[serde(default)]
    pub allow_cap: Vec<String>,
}

impl AgentSettings {
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: AgentSettings) -> AgentSettings {
        AgentSettings {
            node_id: self.node_id.or(file.node_id),
            mqtt: self.mqtt.or(file.mqtt),
            docker: self.docker.or(file.docker),
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            work_dir: self.work_dir.or(file.work_dir),
            state_dir: self.state_dir.or(file.state_dir),
            topic_root: self.topic_root.or(file.topic_root),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            order_key: self.order_key.or(file.order_key),
            tls_crl: self.tls_crl.or(file.tls_crl),
            insecure: self.insecure || file.insecure,
            drain_timeout_secs: self.drain_timeout_secs.or(file.drain_timeout_secs),
            checkpoint_with: self.checkpoint_with.or(file.checkpoint_with),
            docker_exec_root: self.docker_exec_root.or(file.docker_exec_root),
            runc_path: self.runc_path.or(file.runc_path),
            criu_path: self.criu_path.or(file.criu_path),
            criu_config: self.criu_config.or(file.criu_config),
            offer_memory: self.offer_memory.or(file.offer_memory),
            allow_bind: if self.allow_bind.is_empty() {
                file.allow_bind
            } else {
                self.allow_bind
            },
            allow_cap: if self.allow_cap.is_empty() {
                file.allow_cap
            } else {
                self.allow_cap
            },
        }
    }

    /// Checks every field and fills defaults.
    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let node_id = self.node_id.ok_or(ConfigError::Missing("node_id"))?;
        validate_id("node id", &node_id).map_err(|e| invalid("node_id", e.to_string()))?;
        let mqtt_text = self.mqtt.ok_or(ConfigError::Missing("mqtt"))?;
        let mqtt = BrokerUrl::parse(&mqtt_text).map_err(|e| invalid("mqtt", e.to_string()))?;
        let listen: SocketAddr = self
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_LISTEN)
            .parse()
            .map_err(|e| invalid("listen", format!("expected ADDR:PORT: {e}")))?;
        let advertise = match self.advertise {
            Some(a) => Some(
                a.parse()
                    .map_err(|e| invalid("advertise", format!("expected ADDR:PORT: {e}")))?,
            ),
            None if listen.ip().is_unspecified() => {
                return Err(invalid(
                    "advertise",
                    format!(
                    "listen address {listen} is a wildcard; say which address peers should dial"
                ),
                ))
            }
            // The bound address, once bound (port 0 picks a free port).
            None => None,
        };
        let topic_root = self
            .topic_root
            .unwrap_or_else(|| DEFAULT_TOPIC_ROOT.to_string());
        let topics =
            Topics::new(topic_root.as_str()).map_err(|e| invalid("topic_root", e.to_string()))?;
        let tls = match (self.tls_ca, self.tls_cert, self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(crate::stream::tls::TlsFiles { ca, cert, key })
            }
            (None, None, None) => None,
            _ => {
                return Err(invalid(
                    "tls",
                    "give all of tls_ca, tls_cert and tls_key, or none of them",
                ))
            }
        };
        if tls.is_none() && !self.insecure {
            return Err(invalid(
                "tls",
                "no TLS files given: set tls_ca, tls_cert and tls_key (or pass --insecure for plain TCP, development only)",
            ));
        }
        if mqtt.is_tls() && tls.is_none() {
            return Err(invalid(
                "mqtt",
                "mqtts:// needs tls_ca, tls_cert and tls_key",
            ));
        }
        if !mqtt.is_tls() && !self.insecure {
            return Err(invalid(
                "mqtt",
                format!(
                    "{mqtt_text} is plain TCP: use mqtts:// (or pass --insecure, development only)"
                ),
            ));
        }
        let work_dir = self.work_dir.unwrap_or_else(default_work_dir);
        absolute("work_dir", &work_dir)?;
        let exec_root = self
            .docker_exec_root
            .unwrap_or_else(|| DEFAULT_DOCKER_EXEC_ROOT.into());
        absolute("docker_exec_root", &exec_root)?;
        let runc_path = self.runc_path.unwrap_or_else(|| DEFAULT_RUNC.into());
        program("runc_path", &runc_path)?;
        let criu_path = self.criu_path.unwrap_or_else(|| DEFAULT_CRIU.into());
        program("criu_path", &criu_path)?;
        let criu_config = self
            .criu_config
            .unwrap_or_else(|| DEFAULT_CRIU_CONFIG.into());
        absolute("criu_config", &criu_config)?;
        let runc = match self.checkpoint_with.as_deref().unwrap_or("runc") {
            "runc" => Some(RuncSettings {
                runc: runc_path,
                exec_root,
                criu: criu_path,
                work_root: work_dir.clone(),
                systemd_cgroup: false,
            }),
            "engine" => None,
            other => {
                return Err(invalid(
                    "checkpoint_with",
                    format!("{other:?} is not \"runc\" or \"engine\""),
                ))
            }
        };
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        absolute("state_dir", &state_dir)?;
        if let Some(key) = &self.order_key {
            absolute("order_key", key)?;
        }
        for path in &self.allow_bind {
            absolute("allow_bind", path)?;
            if path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(invalid(
                    "allow_bind",
                    format!("{} must not contain ..", path.display()),
                ));
            }
        }
        let mut allow_cap = Vec::new();
        for cap in &self.allow_cap {
            let name = crate::runtime::admission::cap_name(cap);
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                return Err(invalid(
                    "allow_cap",
                    format!("{cap:?} is not a capability name such as NET_ADMIN"),
                ));
            }
            allow_cap.push(name);
        }
        if self.tls_crl.is_some() && tls.is_none() {
            return Err(invalid(
                "tls_crl",
                "a CRL needs tls_ca, tls_cert and tls_key",
            ));
        }
        let policy = crate::runtime::admission::HostPolicy {
            allow_bind: self.allow_bind,
            allow_cap,
        };
        Ok(AgentConfig {
            offer_memory: self.offer_memory,
            order_key: self.order_key,
            policy,
            tls_crl: self.tls_crl,
            runc,
            criu_config,
            node_id,
            mqtt,
            docker: self
                .docker
                .unwrap_or_else(|| DEFAULT_DOCKER_SOCKET.to_string()),
            listen,
            advertise,
            work_dir,
            state_dir,
            topics,
            tls,
            insecure: self.insecure,
            drain_timeout: self
                .drain_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
        })
    }
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub mqtt: BrokerUrl,
    pub docker: String,
    pub listen: SocketAddr,
    /// `None`: advertise the address the data port is bound to.
    pub advertise: Option<SocketAddr>,
    /// Checkpoint staging: may be RAM.
    pub work_dir: PathBuf,
    /// The job ledger: must survive a reboot.
    pub state_dir: PathBuf,
    pub topics: Topics,
    pub tls: Option<crate::stream::tls::TlsFiles>,
    /// The manager's public order key; `None`: unsigned jobs are accepted.
    pub order_key: Option<PathBuf>,
    pub insecure: bool,
    pub drain_timeout: Duration,
    /// How checkpoints reach runc; `None`: through the engine's own call.
    pub runc: Option<RuncSettings>,
    /// The CRIU configuration file runc hands CRIU here.
    pub criu_config: PathBuf,
    /// Caps the memory the node status offers (placement reads it).
    pub offer_memory: Option<u64>,
    /// What incoming containers may use here.
    pub policy: crate::runtime::admission::HostPolicy,
    /// Certificates the data port refuses (a CRL of the fleet CA).
    pub tls_crl: Option<PathBuf>,
}

fn absolute(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{} must be an absolute path", path.display()),
        ))
    }
}

/// A program is a bare name (looked up on PATH) or an absolute path.
fn program(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let text = path.as_os_str();
    if text.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if path.components().count() > 1 && !path.is_absolute() {
        return Err(invalid(
            field,
            format!(
                "{} must be a name on PATH or an absolute path",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// RAM staging (tmpfs under /run) when the machine has the memory for it:
/// checkpoints then never touch the SD card.
fn default_work_dir() -> PathBuf {
    let available = crate::sysinfo::mem_available().unwrap_or(0);
    if available >= TMPFS_MIN_AVAILABLE && crate::sysinfo::is_tmpfs(Path::new("/run")) {
        PathBuf::from(TMPFS_WORK_DIR)
    } else {
        PathBuf::from(DISK_WORK_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> AgentSettings {
        AgentSettings {
            node_id: Some("node1".into()),
            mqtt: Some("mqtt://127.0.0.1:1883".into()),
            listen: Some("127.0.0.11:7070".into()),
            work_dir: Some("/tmp/ferry".into()),
            insecure: true,
            ..Default::default()
        }
    }

    #[test]
    fn flags_win_over_file() {
        let file = AgentSettings {
            node_id: Some("from-file".into()),
            docker: Some("/file.sock".into()),
            ..minimal()
        };
        let flags = AgentSettings {
            node_id: Some("from-flag".into()),
            ..Default::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.node_id.as_deref(), Some("from-flag"));
        assert_eq!(merged.docker.as_deref(), Some("/file.sock"));
    }

    #[test]
    fn defaults_fill_in() {
        let c = minimal().validate().unwrap();
        assert_eq!(c.topics.root(), DEFAULT_TOPIC_ROOT);
        assert_eq!(c.docker, DEFAULT_DOCKER_SOCKET);
        assert_eq!(c.advertise, None);
        assert_eq!(c.criu_config, Path::new(DEFAULT_CRIU_CONFIG));
        let runc = c.runc.expect("runc is the default checkpoint path");
        assert_eq!(runc.runc, Path::new("runc"));
        assert_eq!(runc.criu, Path::new("criu"));
        assert_eq!(runc.exec_root, Path::new("/run/docker"));
        assert_eq!(runc.work_root, Path::new("/tmp/ferry"));
    }

    #[test]
    fn checkpoint_settings_are_taken_and_checked() {
        let c = AgentSettings {
            checkpoint_with: Some("engine".into()),
            ..minimal()
        }
        .validate()
        .unwrap();
        assert!(c.runc.is_none());
        let c = AgentSettings {
            docker_exec_root: Some("/tmp/fb/node1/exec".into()),
            runc_path: Some("/usr/sbin/runc".into()),
            criu_path: Some("/tmp/fb/node1/bin/criu".into()),
            criu_config: Some("/tmp/fb/node1/criu.conf".into()),
            ..minimal()
        }
        .validate()
        .unwrap();
        let runc = c.runc.unwrap();
        assert_eq!(runc.exec_root, Path::new("/tmp/fb/node1/exec"));
        assert_eq!(runc.runc, Path::new("/usr/sbin/runc"));
        assert_eq!(runc.criu, Path::new("/tmp/fb/node1/bin/criu"));
        assert_eq!(c.criu_config, Path::new("/tmp/fb/node1/criu.conf"));
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn the_target_policy_is_strict_unless_configured() {
        let c = minimal().validate().unwrap();
        assert_eq!(c.policy, Default::default());
        let file: AgentSettings =
            toml::from_str("allow_bind = [\"/srv/ferry\"]\nallow_cap = [\"cap_net_admin\"]")
                .unwrap();
        let c = AgentSettings::default()
            .over(file)
            .over(minimal())
            .validate()
            .unwrap();
        assert_eq!(c.policy.allow_bind, vec![PathBuf::from("/srv/ferry")]);
        assert_eq!(c.policy.allow_cap, vec!["NET_ADMIN".to_string()]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(AgentSettings, &str)> = vec![
            (
                AgentSettings {
                    node_id: None,
                    ..minimal()
                },
                "node_id",
            ),
            (
                AgentSettings {
                    node_id: Some("a/b".into()),
                    ..minimal()
                },
                "node_id",
            ),
            (
                AgentSettings {
                    mqtt: Some("http://x".into()),
                    ..minimal()
                },
                "mqtt",
            ),
            (
                AgentSettings {
                    listen: Some("nowhere".into()),
                    ..minimal()
                },
                "listen",
            ),
            (
                AgentSettings {
                    listen: Some("0.0.0.0:7070".into()),
                    ..minimal()
                },
                "advertise",
            ),
            (
                AgentSettings {
                    topic_root: Some("a/#".into()),
                    ..minimal()
                },
                "topic_root",
            ),
            (
                AgentSettings {
                    tls_ca: Some("/ca.pem".into()),
                    ..minimal()
                },
                "tls",
            ),
            (
                AgentSettings {
                    insecure: false,
                    ..minimal()
                },
                "tls",
            ),
            (
                AgentSettings {
                    work_dir: Some("rel".into()),
                    ..minimal()
                },
                "work_dir",
            ),
            (
                AgentSettings {
                    checkpoint_with: Some("criu".into()),
                    ..minimal()
                },
                "checkpoint_with",
            ),
            (
                AgentSettings {
                    docker_exec_root: Some("run/docker".into()),
                    ..minimal()
                },
                "docker_exec_root",
            ),
            (
                AgentSettings {
                    allow_bind: vec!["/srv/../etc".into()],
                    ..minimal()
                },
                "allow_bind",
            ),
            (
                AgentSettings {
                    allow_bind: vec!["srv".into()],
                    ..minimal()
                },
                "allow_bind",
            ),
            (
                AgentSettings {
                    allow_cap: vec!["net admin".into()],
                    ..minimal()
                },
                "allow_cap",
            ),
            (
                AgentSettings {
                    tls_crl: Some("/etc/ferry/crl.pem".into()),
                    ..minimal()
                },
                "tls_crl",
            ),
            (
                AgentSettings {
                    runc_path: Some("bin/runc".into()),
                    ..minimal()
                },
                "runc_path",
            ),
            (
                AgentSettings {
                    criu_path: Some("".into()),
                    ..minimal()
                },
                "criu_path",
            ),
            (
                AgentSettings {
                    criu_config: Some("criu.conf".into()),
                    ..minimal()
                },
                "criu_config",
            ),
            (
                AgentSettings {
                    state_dir: Some("rel".into()),
                    ..minimal()
                },
                "state_dir",
            ),
            (
                AgentSettings {
                    order_key: Some("order.pub".into()),
                    ..minimal()
                },
                "order_key",
            ),
        ];
        for (settings, field) in cases {
            let err = settings.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
    }

    #[test]
    fn toml_rejects_unknown_keys_and_loads_the_example() {
        let dir = std::env::temp_dir().join(format!("ferry-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "node_id = \"n\"\nnode_idd = \"typo\"\n").unwrap();
        let err = AgentSettings::from_toml_file(&bad).unwrap_err().to_string();
        assert!(err.contains("node_idd"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/agent.toml");
        let settings = AgentSettings::from_toml_file(&example).unwrap();
        let config = settings.validate().unwrap();
        assert_eq!(config.topics.root(), DEFAULT_TOPIC_ROOT);
        assert!(config.mqtt.is_tls());
    }
}
