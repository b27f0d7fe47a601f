//! [`Docker`]: the [`Engine`] trait over the Docker Engine API, through
//! bollard on the daemon's unix socket, with the API version negotiated down
//! to what the daemon speaks (Debian 12's Docker 20.10 speaks 1.41).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::container::CreateCheckpointOptions;
use bollard::models::ContainerCreateBody;
use bollard::models::SystemInfoCgroupDriverEnum;
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptions,
    StartContainerOptions, StatsOptions,
};
use bollard::BollardRequest;
use futures_util::StreamExt;
use tracing::{info, warn};

use super::runc::RuncSettings;
use super::sockets::{parse_proc_net_tcp, CriuTcpOptions, TcpState};
use super::{
    CheckpointOptions, CheckpointVia, Checkpointed, Container, ContainerSpec, Engine, EngineInfo,
    RuntimeError,
};

/// Longest wait for one engine call; a checkpoint or restore of a large
/// container through Docker's content store takes tens of seconds.
const TIMEOUT_SECS: u64 = 600;
/// runc's default CRIU configuration file, handed to CRIU on every
/// checkpoint and restore of a container without an `org.criu.config`
/// annotation (Docker 20.10 cannot set one).
pub const DEFAULT_CRIU_CONFIG: &str = "/etc/criu/runc.conf";
/// How long the engine may take to see a container stopped by runc.
const STOP_SEEN_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_POLL: Duration = Duration::from_millis(25);
/// How long a restore keeps retrying Docker's transient content-store
/// clash (see [`is_transient_restore_error`]); seen to clear in 1-3 s.
const RESTORE_RETRY_FOR: Duration = Duration::from_secs(20);
/// Pause between two such retries.
const RESTORE_RETRY_PAUSE: Duration = Duration::from_millis(500);

pub struct Docker {
    api: bollard::Docker,
    /// The engine's data root, read once at connect: checkpoint folders
    /// are derived from it on the frozen path without asking the engine
    /// again (it changes only with a daemon restart and new config).
    root_dir: PathBuf,
    /// The engine's cgroup driver is systemd (runc must be told so).
    systemd_cgroup: bool,
    /// `None`: checkpoints go through the engine's own call.
    runc: Option<RuncSettings>,
    criu_config: PathBuf,
}

impl Docker {
    /// Connects to the engine at `socket` (a path or `unix://` URL) and
    /// negotiates the API version down to what the daemon speaks.
    pub async fn connect(socket: &str) -> Result<Self, RuntimeError> {
        let path = socket.strip_prefix("unix://").unwrap_or(socket);
        let connect_err = |source| RuntimeError::Connect {
            socket: path.to_string(),
            source,
        };
        let api =
            bollard::Docker::connect_with_unix(path, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(connect_err)?
                .negotiate_version()
                .await
                .map_err(connect_err)?;
        let info = api.info().await.map_err(engine_err("info", "engine"))?;
        Ok(Self {
            api,
            root_dir: data_root(&info),
            systemd_cgroup: info.cgroup_driver == Some(SystemInfoCgroupDriverEnum::SYSTEMD),
            runc: None,
            criu_config: DEFAULT_CRIU_CONFIG.into(),
        })
    }

    /// Checkpoints through runc directly with `runc` (`None`: through the
    /// engine); `criu_config` is the CRIU configuration file the engine's
    /// runc hands CRIU (what restores on this node are told).
    pub fn with_checkpoint(mut self, runc: Option<RuncSettings>, criu_config: PathBuf) -> Self {
        self.runc = runc;
        self.criu_config = criu_config;
        self
    }

    /// Docker's own checkpoint call (through containerd's content store).
    async fn engine_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        let options = CreateCheckpointOptions {
            checkpoint_id: checkpoint.to_string(),
            checkpoint_dir: None,
            exit: true,
        };
        self.api
            .create_checkpoint(id, options)
            .await
            .map_err(engine_err("checkpoint", id))
    }

    /// Waits until the engine shows `id` stopped: runc killed it, and
    /// dockerd hears of that through containerd a moment later.
    async fn wait_stopped(&self, id: &str) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + STOP_SEEN_TIMEOUT;
        loop {
            let c = self
                .api
                .inspect_container(id, None)
                .await
                .map_err(engine_err("inspect", id))?;
            if !c.state.and_then(|s| s.running).unwrap_or(false) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Engine {
                    call: "checkpoint",
                    subject: id.to_string(),
                    message: format!(
                        "runc checkpointed and stopped it, but the engine still shows it running after {STOP_SEEN_TIMEOUT:?}"
                    ),
                });
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    /// The bollard client, for the state-transfer calls in sibling modules.
    pub(super) fn api(&self) -> &bollard::Docker {
        &self.api
    }

    /// `POST /containers/{id}/start?checkpoint=NAME`. bollard 0.21's start
    /// options have no checkpoint field, so this one call goes through a
    /// copy of the client whose request modifier adds the query parameter;
    /// bollard still does the HTTP (chunked bodies included), the timeout
    /// and the error decoding, exactly as for its other calls.
    async fn start_with_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        if checkpoint.is_empty() || !checkpoint.bytes().all(is_unreserved) {
            return Err(RuntimeError::Engine {
                call: "start from checkpoint",
                subject: id.to_string(),
                message: format!(
                    "checkpoint name {checkpoint:?} is not a plain name (A-Z a-z 0-9 - . _ ~)"
                ),
            });
        }
        let checkpoint = checkpoint.to_string();
        let api = self
            .api
            .clone()
            .with_request_modifier(move |req| with_checkpoint(req, &checkpoint));
        api.start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(engine_err("start from checkpoint", id))
    }
}

impl Docker {
    /// Starts from the checkpoint, retrying only the transient error that
    /// [`is_transient_restore_error`] names, until `retry_for` has passed.
    async fn restore_retrying(
        &self,
        id: &str,
        checkpoint: &str,
        retry_for: Duration,
        pause: Duration,
    ) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + retry_for;
        loop {
            match self.start_with_checkpoint(id, checkpoint).await {
                Err(RuntimeError::Engine { ref message, .. })
                    if is_transient_restore_error(message) && Instant::now() + pause < deadline =>
                {
                    tracing::info!(container = %id, %message, "restore: content store clash, retrying");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }
}

/// Docker 20.10 sometimes refuses to restore a checkpoint on the daemon
/// that has just created one: `failed to upload checkpoint to containerd:
/// commit failed: content sha256:... already exists`. The same restore
/// works a few seconds later, so this one error is worth a retry; anything
/// else (a CRIU failure, a missing checkpoint) is not.
pub(super) fn is_transient_restore_error(message: &str) -> bool {
    message.contains("failed to upload checkpoint to containerd")
        && message.contains("already exists")
}

/// RFC 3986 unreserved bytes: safe in a query value without encoding.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `req` with `checkpoint=NAME` added to its query; `checkpoint` is made of
/// unreserved bytes, so the URI stays valid. Were it ever not, the URI would
/// become one that reaches no daemon: the start fails instead of starting
/// the container afresh without its state.
fn with_checkpoint(mut req: BollardRequest, checkpoint: &str) -> BollardRequest {
    let sep = if req.uri().query().is_some() {
        '&'
    } else {
        '?'
    };
    let uri = format!("{}{sep}checkpoint={checkpoint}", req.uri());
    *req.uri_mut() = uri.parse().unwrap_or_default();
    req
}

/// `<root>/containers/<id>/checkpoints/<name>`: where the engine keeps a
/// container's checkpoint and `start?checkpoint=<name>` looks for it.
fn checkpoint_path(root: &Path, id: &str, checkpoint: &str) -> PathBuf {
    root.join("containers")
        .join(id)
        .join("checkpoints")
        .join(checkpoint)
}

/// Where the engine keeps its state (`DockerRootDir`).
fn data_root(info: &bollard::models::SystemInfo) -> PathBuf {
    PathBuf::from(info.docker_root_dir.as_deref().unwrap_or("/var/lib/docker"))
}

pub(super) fn engine_err(
    call: &'static str,
    subject: &str,
) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    let subject = subject.to_string();
    move |e| match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => RuntimeError::NotFound(subject),
        bollard::errors::Error::DockerResponseServerError { message, .. } => RuntimeError::Engine {
            call,
            subject,
            message,
        },
        other => RuntimeError::Engine {
            call,
            subject,
            message: other.to_string(),
        },
    }
}

impl Engine for Docker {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        let info = self
            .api
            .info()
            .await
            .map_err(engine_err("info", "engine"))?;
        let root_dir = data_root(&info);
        Ok(EngineInfo {
            arch: info.architecture.unwrap_or_default(),
            kernel: info.kernel_version.unwrap_or_default(),
            version: info.server_version.unwrap_or_default(),
            root_dir,
            experimental: info.experimental_build.unwrap_or(false),
        })
    }

    async fn inspect(&self, name: &str) -> Result<Container, RuntimeError> {
        let c = self
            .api
            .inspect_container(name, None)
            .await
            .map_err(engine_err("inspect", name))?;
        let id = c.id.clone().unwrap_or_default();
        let cname = c
            .name
            .clone()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let networks = super::networks::attachments(&c, &self.attached_networks(&c).await?);
        let config = c.config.unwrap_or_default();
        let image = config.image.clone().unwrap_or_default();
        // The create body is the inspected config plus its host config: same
        // command, env, labels, restart policy, mounts and limits.
        let mut body = serde_json::to_value(&config).map_err(|e| RuntimeError::Engine {
            call: "inspect",
            subject: name.to_string(),
            message: e.to_string(),
        })?;
        if let (Some(obj), Some(host)) = (body.as_object_mut(), c.host_config) {
            obj.insert(
                "HostConfig".into(),
                serde_json::to_value(host).unwrap_or(serde_json::Value::Null),
            );
        }
        Ok(Container {
            id,
            name: cname.clone(),
            image: image.clone(),
            running,
            spec: ContainerSpec {
                name: cname,
                image,
                create_body: body,
                networks,
            },
        })
    }

    async fn networks(&self) -> Result<Vec<super::networks::NetworkDef>, RuntimeError> {
        self.list_networks().await
    }

    async fn create_network(
        &self,
        def: &super::networks::NetworkDef,
        keep_pools: bool,
    ) -> Result<(), RuntimeError> {
        self.create_network_like(def, keep_pools).await
    }

    async fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &super::networks::Endpoint,
    ) -> Result<(), RuntimeError> {
        self.connect_network(id, network, endpoint).await
    }

    async fn list_running(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        let label = format!("{key}={value}");
        let filters = std::collections::HashMap::from([
            ("label", vec![label.clone()]),
            ("status", vec!["running".to_owned()]),
        ]);
        let options = ListContainersOptionsBuilder::new()
            .filters(&filters)
            .build();
        let list = self
            .api
            .list_containers(Some(options))
            .await
            .map_err(engine_err("list containers", &label))?;
        let mut out: Vec<(String, String)> = list
            .into_iter()
            .filter_map(|c| {
                let name = c.names?.first()?.trim_start_matches('/').to_owned();
                Some((c.id?, name))
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    async fn memory_usage(&self, id: &str) -> Result<u64, RuntimeError> {
        let options = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let stats = self.api.stats(id, Some(options)).next().await;
        match stats {
            Some(Ok(s)) => Ok(s.memory_stats.and_then(|m| m.usage).unwrap_or(0)),
            Some(Err(e)) => Err(engine_err("stats", id)(e)),
            None => Ok(0),
        }
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.api.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(engine_err("inspect image", image)(e)),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let body: ContainerCreateBody =
            serde_json::from_value(spec.create_body.clone()).map_err(|e| RuntimeError::Engine {
                call: "create",
                subject: spec.name.clone(),
                message: format!("container spec does not fit the engine's create body: {e}"),
            })?;
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            platform: String::new(),
        };
        let created = self
            .api
            .create_container(Some(options), body)
            .await
            .map_err(engine_err("create", &spec.name))?;
        Ok(created.id)
    }

    async fn checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
        options: CheckpointOptions,
    ) -> Result<Checkpointed, RuntimeError> {
        let dir = checkpoint_path(&self.root_dir, id, checkpoint);
        let reason = match &self.runc {
            None => {
                "the agent is set to checkpoint through the engine (checkpoint_with = \"engine\")"
                    .to_string()
            }
            Some(settings) => {
                let mut runc = settings.clone();
                runc.systemd_cgroup = self.systemd_cgroup;
                match runc.usable(id).await {
                    Ok(()) => {
                        runc.checkpoint(id, checkpoint, &dir, options.tcp).await?;
                        self.wait_stopped(id).await?;
                        info!(container = %id, dir = %dir.display(), "checkpointed through runc");
                        return Ok(Checkpointed {
                            dir,
                            via: CheckpointVia::Runc,
                        });
                    }
                    Err(why) => why.to_string(),
                }
            }
        };
        warn!(container = %id, %reason, "checkpoint through the engine's own call");
        self.engine_checkpoint(id, checkpoint).await?;
        Ok(Checkpointed {
            dir,
            via: CheckpointVia::Engine { reason },
        })
    }

    async fn dump_running(
        &self,
        id: &str,
        name: &str,
        images: &Path,
        options: CheckpointOptions,
    ) -> Result<(), RuntimeError> {
        let Some(settings) = &self.runc else {
            return Err(RuntimeError::Unsupported(
                "the agent checkpoints through the engine (checkpoint_with = \"engine\"), which cannot leave a container running".into(),
            ));
        };
        let mut runc = settings.clone();
        runc.systemd_cgroup = self.systemd_cgroup;
        runc.usable(id)
            .await
            .map_err(|why| RuntimeError::Unsupported(why.to_string()))?;
        runc.dump_running(id, name, images, options.tcp).await?;
        Ok(())
    }

    async fn tcp_state(&self, id: &str) -> Result<TcpState, RuntimeError> {
        let c = self
            .api
            .inspect_container(id, None)
            .await
            .map_err(engine_err("inspect", id))?;
        let pid = c.state.and_then(|s| s.pid).unwrap_or(0);
        if pid <= 0 {
            return Err(RuntimeError::Engine {
                call: "tcp connections",
                subject: id.to_string(),
                message: "the container has no process".into(),
            });
        }
        let mut established = Vec::new();
        // An agent in another PID namespace (e.g. a container of its own)
        // cannot see the process: its connections go unchecked. A
        // connection CRIU cannot dump then fails the checkpoint, which
        // leaves the container running and the job rolled back.
        let visible = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !visible {
            warn!(
                container = %id,
                pid,
                "the container's process is not visible from this agent's PID namespace; its TCP connections are not checked"
            );
        }
        for table in ["tcp", "tcp6"].into_iter().filter(|_| visible) {
            let path = format!("/proc/{pid}/net/{table}");
            match std::fs::read_to_string(&path) {
                Ok(text) => established.extend(parse_proc_net_tcp(&text)),
                // No IPv6 in the kernel: no tcp6 table.
                Err(e) if table == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RuntimeError::Engine {
                        call: "tcp connections",
                        subject: id.to_string(),
                        message: format!("cannot read {path}: {e}"),
                    })
                }
            }
        }
        let restore = match std::fs::read_to_string(&self.criu_config) {
            Ok(text) => CriuTcpOptions::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CriuTcpOptions::default(),
            Err(e) => {
                return Err(RuntimeError::Engine {
                    call: "tcp connections",
                    subject: id.to_string(),
                    message: format!("cannot read {}: {e}", self.criu_config.display()),
                })
            }
        };
        Ok(TcpState {
            established,
            restore,
            restore_config: self.criu_config.display().to_string(),
        })
    }

    async fn checkpoint_dir(&self, id: &str, checkpoint: &str) -> Result<PathBuf, RuntimeError> {
        Ok(checkpoint_path(&self.root_dir, id, checkpoint))
    }

    async fn restore(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        self.restore_retrying(id, checkpoint, RESTORE_RETRY_FOR, RESTORE_RETRY_PAUSE)
            .await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.api.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine_err("remove", id)(e)),
        }
    }

    async fn delete_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        self.api
            .delete_checkpoint(id, checkpoint, None)
            .await
            .map_err(engine_err("delete checkpoint", id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::TempDir;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A stand-in engine socket that answers each request with the next of
    /// `responses` and hands back the request lines it saw.
    async fn scripted_engine(
        dir: &TempDir,
        responses: Vec<String>,
    ) -> (Docker, tokio::task::JoinHandle<Vec<String>>) {
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = tokio::spawn(async move {
            let mut lines = Vec::new();
            for response in responses {
                let (conn, _) = listener.accept().await.unwrap();
                let mut conn = BufReader::new(conn);
                let mut line = String::new();
                conn.read_line(&mut line).await.unwrap();
                lines.push(line.trim_end().to_string());
                // The rest of the head; these requests have no body.
                loop {
                    let mut header = String::new();
                    conn.read_line(&mut header).await.unwrap();
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                }
                conn.get_mut().write_all(response.as_bytes()).await.unwrap();
                conn.get_mut().shutdown().await.unwrap();
            }
            lines
        });
        let path = socket.to_str().unwrap();
        let api = bollard::Docker::connect_with_unix(
            path,
            5,
            &bollard::ClientVersion {
                major_version: 1,
                minor_version: 41,
            },
        )
        .unwrap();
        (
            Docker {
                api,
                root_dir: "/var/lib/docker".into(),
                systemd_cgroup: false,
                runc: None,
                criu_config: DEFAULT_CRIU_CONFIG.into(),
            },
            seen,
        )
    }

    #[tokio::test]
    async fn restore_asks_for_the_checkpoint_and_reads_chunked_errors() {
        let dir = TempDir::new("docker-restore");
        // How dockerd answers a refused start: a chunked JSON error.
        let error = r#"{"message":"custom checkpointdir is not supported"}"#;
        let refused = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             {:x}\r\n{error}\r\n0\r\n\r\n",
            error.len()
        );
        let (docker, seen) = scripted_engine(
            &dir,
            vec![
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string(),
                refused,
            ],
        )
        .await;
        docker.restore("c1", "ferry-j1").await.unwrap();
        let err = docker.restore("c1", "ferry-j2").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "engine call start from checkpoint for c1 failed: custom checkpointdir is not supported"
        );
        assert_eq!(
            seen.await.unwrap(),
            [
                "POST /containers/c1/start?checkpoint=ferry-j1 HTTP/1.1",
                "POST /containers/c1/start?checkpoint=ferry-j2 HTTP/1.1",
            ]
        );
    }

    #[tokio::test]
    async fn restore_refuses_a_name_that_would_need_encoding() {
        let dir = TempDir::new("docker-restore-name");
        let (docker, seen) = scripted_engine(&dir, vec![]).await;
        for bad in ["", "a&checkpoint-dir=/tmp", "a b", "a/../b"] {
            let err = docker.restore("c1", bad).await.unwrap_err().to_string();
            assert!(err.contains("not a plain name"), "{bad:?}: {err}");
        }
        assert!(seen.await.unwrap().is_empty(), "nothing reached the engine");
    }

    fn chunked_500(message: &str) -> String {
        let error = serde_json::json!({ "message": message }).to_string();
        format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             {:x}\r\n{error}\r\n0\r\n\r\n",
            error.len()
        )
    }

    const CLASH: &str = "failed to upload checkpoint to containerd: commit failed: \
                         content sha256:5f0c already exists: already exists";

    #[test]
    fn only_the_content_store_clash_is_transient() {
        assert!(is_transient_restore_error(CLASH));
        for other in [
            "custom checkpointdir is not supported",
            "failed to upload checkpoint to containerd: no space left on device",
            "criu failed: type RESTORE errno 0",
            "content sha256:5f0c already exists",
        ] {
            assert!(!is_transient_restore_error(other), "{other}");
        }
    }

    #[tokio::test]
    async fn restore_retries_the_clash_and_nothing_else() {
        let dir = TempDir::new("docker-restore-retry");
        let ok = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string();
        let (docker, seen) = scripted_engine(
            &dir,
            vec![
                chunked_500(CLASH),
                chunked_500(CLASH),
                ok,
                chunked_500("criu failed: type RESTORE errno 0"),
            ],
        )
        .await;
        let pause = Duration::from_millis(10);
        let retry_for = Duration::from_secs(5);
        docker
            .restore_retrying("c1", "cp", retry_for, pause)
            .await
            .unwrap();
        let err = docker
            .restore_retrying("c1", "cp", retry_for, pause)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("criu failed"), "{err}");
        assert_eq!(seen.await.unwrap().len(), 4, "3 tries, then 1");

        // Past the deadline the clash itself is the error.
        let dir = TempDir::new("docker-restore-deadline");
        let (docker, seen) = scripted_engine(&dir, vec![chunked_500(CLASH)]).await;
        let err = docker
            .restore_retrying("c1", "cp", Duration::ZERO, pause)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(seen.await.unwrap().len(), 1);
    }

    #[test]
    fn the_checkpoint_joins_an_existing_query() {
        let mut req = BollardRequest::new(bollard::body_full(Default::default()));
        *req.uri_mut() = "http://docker/v1.41/containers/c/start?detachKeys=ctrl-x"
            .parse()
            .unwrap();
        let req = with_checkpoint(req, "cp");
        assert_eq!(
            req.uri().to_string(),
            "http://docker/v1.41/containers/c/start?detachKeys=ctrl-x&checkpoint=cp"
        );
    }
}
