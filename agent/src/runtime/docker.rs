//! Docker Engine through bollard, over the daemon's unix socket.

use std::path::{Path, PathBuf};

use bollard::container::CreateCheckpointOptions;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions, StatsOptions};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Container, ContainerSpec, Engine, EngineInfo, RuntimeError};

/// Engine API version used for the one call bollard cannot make; 1.41 is what
/// Debian 12's Docker 20.10 speaks, and newer daemons still accept it.
const RAW_API_VERSION: &str = "v1.41";
const TIMEOUT_SECS: u64 = 600;

pub struct Docker {
    api: bollard::Docker,
    socket: PathBuf,
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
        Ok(Self {
            api,
            socket: PathBuf::from(path),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bollard client, for the state-transfer calls in sibling modules.
    pub(super) fn api(&self) -> &bollard::Docker {
        &self.api
    }

    /// `POST /containers/{id}/start?checkpoint=NAME`: bollard's start options
    /// have no checkpoint field, so this request is written by hand.
    async fn start_with_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        let err = |message: String| RuntimeError::Engine {
            call: "start from checkpoint",
            subject: id.to_string(),
            message,
        };
        let mut sock = tokio::net::UnixStream::connect(&self.socket).await?;
        let request = format!(
            "POST /{RAW_API_VERSION}/containers/{id}/start?checkpoint={checkpoint} HTTP/1.1\r\n\
             Host: docker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        sock.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // The answer is a status line and at most a short JSON error.
        sock.take(64 * 1024).read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| err(format!("unreadable engine response: {:.200}", text)))?;
        match status {
            204 | 304 => Ok(()),
            _ => {
                let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
                Err(err(format!("status {status}: {}", engine_message(body))))
            }
        }
    }
}

/// The `message` of an engine error body, which may be chunk-encoded.
fn engine_message(body: &str) -> String {
    body.find('{')
        .and_then(|start| {
            let end = body.rfind('}')?;
            serde_json::from_str::<serde_json::Value>(&body[start..=end]).ok()
        })
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
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
        Ok(EngineInfo {
            arch: info.architecture.unwrap_or_default(),
            kernel: info.kernel_version.unwrap_or_default(),
            version: info.server_version.unwrap_or_default(),
            root_dir: PathBuf::from(
                info.docker_root_dir
                    .unwrap_or_else(|| "/var/lib/docker".into()),
            ),
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
            },
        })
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

    async fn checkpoint(&self, id: &str, checkpoint: &str) -> Result<PathBuf, RuntimeError> {
        let options = CreateCheckpointOptions {
            checkpoint_id: checkpoint.to_string(),
            checkpoint_dir: None,
            exit: true,
        };
        self.api
            .create_checkpoint(id, options)
            .await
            .map_err(engine_err("checkpoint", id))?;
        self.checkpoint_dir(id, checkpoint).await
    }

    async fn checkpoint_dir(&self, id: &str, checkpoint: &str) -> Result<PathBuf, RuntimeError> {
        let root = self.info().await?.root_dir;
        Ok(root
            .join("containers")
            .join(id)
            .join("checkpoints")
            .join(checkpoint))
    }

    async fn restore(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        self.start_with_checkpoint(id, checkpoint).await
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
    use super::engine_message;

    #[test]
    fn engine_message_reads_json_and_chunked_bodies() {
        assert_eq!(
            engine_message(r#"{"message":"no such container"}"#),
            "no such container"
        );
        assert_eq!(
            engine_message(
                "2a\r\n{\"message\":\"custom checkpointdir is not supported\"}\r\n0\r\n"
            ),
            "custom checkpointdir is not supported"
        );
        assert_eq!(engine_message("plain text"), "plain text");
    }
}
