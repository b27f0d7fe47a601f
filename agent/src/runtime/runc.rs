//! Checkpoint of a Docker container through runc directly, into the
//! container's own checkpoint folder.
//!
//! Docker's checkpoint API has containerd dump into a temp dir, tar that
//! into its content store, and dockerd untar it again (FACTS.md: ~5x slower
//! than runc itself). Its leftover blob also makes an immediate restore on
//! the same daemon fail now and then with `content sha256:... already
//! exists`. `runc checkpoint` on Docker's own runc state (under
//! `<exec-root>/runtime-runc/moby`, id = the container's full id) writes the
//! same image files straight to `--image-path`; runc then kills the
//! container, and Docker shows it `Exited (137)` as after its own
//! checkpoint. The folder is `<DockerRootDir>/containers/<id>/checkpoints/
//! <name>`, where `start?checkpoint=<name>` finds it for a rollback.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::sockets::TcpDump;

/// Where Docker keeps runc's state below its exec-root.
const RUNC_STATE: &str = "runtime-runc/moby";
/// The CRIU configuration ferry writes for a `tcp-close` dump.
const CRIU_CONF: &str = "ferry-criu.conf";
/// Lines of CRIU's dump log quoted in an error.
const LOG_TAIL_LINES: usize = 6;
/// Longest a `runc state` probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the engine's runc: validated agent settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncSettings {
    /// The runc binary: a name looked up on PATH, or an absolute path.
    pub runc: PathBuf,
    /// The engine's exec-root (dockerd `--exec-root`, default /run/docker).
    pub exec_root: PathBuf,
    /// The CRIU the engine's runc runs (runc `--criu`): name or path.
    pub criu: PathBuf,
    /// Where runc's work dirs (CRIU's dump.log) go.
    pub work_root: PathBuf,
    /// The engine runs containers under systemd's cgroup driver.
    pub systemd_cgroup: bool,
}

/// Why runc cannot be used for a checkpoint: the engine's path is taken.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("runc state of container {id} not found at {path} (is docker_exec_root the engine's exec-root?)")]
    NoState { id: String, path: PathBuf },
    #[error("{runc} cannot be run: {source}")]
    NotRunnable {
        runc: String,
        source: std::io::Error,
    },
    #[error("`runc state {id}` failed: {message}")]
    State { id: String, message: String },
    #[error("runc says container {id} is {status}, not running")]
    NotRunning { id: String, status: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{runc} cannot be run: {source}")]
    Spawn {
        runc: String,
        source: std::io::Error,
    },
    #[error("runc checkpoint of {id} failed ({status}): {stderr}; end of {log}: {tail}")]
    Failed {
        id: String,
        status: String,
        stderr: String,
        log: PathBuf,
        tail: String,
    },
}

impl RuncSettings {
    fn state_root(&self) -> PathBuf {
        self.exec_root.join(RUNC_STATE)
    }

    /// runc's global arguments: its state root, the engine's CRIU, the
    /// cgroup driver.
    fn global_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--root".into(),
            self.state_root().into(),
            "--criu".into(),
            self.criu.clone().into(),
        ];
        if self.systemd_cgroup {
            args.push("--systemd-cgroup".into());
        }
        args
    }

    /// `runc ... checkpoint --image-path IMAGES --work-path WORK [--tcp-established] ID`.
    pub fn checkpoint_args(
        &self,
        id: &str,
        images: &Path,
        work: &Path,
        tcp: TcpDump,
    ) -> Vec<OsString> {
        let mut args = self.global_args();
        args.extend([
            "checkpoint".into(),
            "--image-path".into(),
            images.into(),
            "--work-path".into(),
            work.into(),
        ]);
        if tcp == TcpDump::Established {
            args.push("--tcp-established".into());
        }
        args.push(id.into());
        args
    }

    /// Where the work files of `checkpoint` go.
    pub fn work_dir(&self, checkpoint: &str) -> PathBuf {
        self.work_root.join("runc").join(checkpoint)
    }

    /// Whether runc can checkpoint container `id`: its state is where the
    /// settings say and runc reads it as running.
    pub async fn usable(&self, id: &str) -> Result<(), Unusable> {
        let state = self.state_root().join(id).join("state.json");
        if !state.is_file() {
            return Err(Unusable::NoState {
                id: id.into(),
                path: state,
            });
        }
        let mut cmd = Command::new(&self.runc);
        cmd.args(self.global_args()).arg("state").arg(id);
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(PROBE_TIMEOUT, cmd.output())
            .await
            .map_err(|_| Unusable::State {
                id: id.into(),
                message: format!("no answer within {PROBE_TIMEOUT:?}"),
            })?
            .map_err(|source| Unusable::NotRunnable {
                runc: self.runc.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(Unusable::State {
                id: id.into(),
                message: last_line(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        let status = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        if status != "running" {
            return Err(Unusable::NotRunning {
                id: id.into(),
                status,
            });
        }
        Ok(())
    }

    /// Dumps container `id` into `images` (created empty) and stops it.
    /// For [`TcpDump::Close`] CRIU reads `tcp-close` from a configuration
    /// file of ferry's (`CRIU_CONFIG_FILE`; runc passes its environment on
    /// to CRIU). The work dir is removed on success and kept on failure.
    pub async fn checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
        images: &Path,
        tcp: TcpDump,
    ) -> Result<(), RuncError> {
        self.dump(id, checkpoint, images, tcp, false).await
    }

    /// Dumps container `id` into `images` (created empty) and leaves it
    /// running (`runc checkpoint --leave-running`): a pre-copy round. The
    /// engine never sees it stop.
    pub async fn dump_running(
        &self,
        id: &str,
        name: &str,
        images: &Path,
        tcp: TcpDump,
    ) -> Result<(), RuncError> {
        self.dump(id, name, images, tcp, true).await
    }

    async fn dump(
        &self,
        id: &str,
        checkpoint: &str,
        images: &Path,
        tcp: TcpDump,
        leave_running: bool,
    ) -> Result<(), RuncError> {
        let work = self.work_dir(checkpoint);
        let prepare = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RuncError::Prepare { path, source }
        };
        for dir in [images, work.as_path()] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(prepare(dir))?;
            }
            std::fs::create_dir_all(dir).map_err(prepare(dir))?;
        }
        let mut args = self.checkpoint_args(id, images, &work, tcp);
        if leave_running {
            let at = args.iter().position(|a| a == "checkpoint").unwrap_or(0) + 1;
            args.insert(at, "--leave-running".into());
        }
        let mut cmd = Command::new(&self.runc);
        cmd.args(args);
        if tcp == TcpDump::Close {
            let conf = work.join(CRIU_CONF);
            std::fs::write(&conf, criu_conf(tcp)).map_err(prepare(&conf))?;
            cmd.env("CRIU_CONFIG_FILE", &conf);
        }
        let out = cmd.output().await.map_err(|source| RuncError::Spawn {
            runc: self.runc.display().to_string(),
            source,
        })?;
        if !out.status.success() {
            let log = work.join("dump.log");
            let tail = std::fs::read_to_string(&log)
                .map(|t| tail(&t, LOG_TAIL_LINES))
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            return Err(RuncError::Failed {
                id: id.into(),
                status: out.status.to_string(),
                stderr: last_line(&String::from_utf8_lossy(&out.stderr)),
                log,
                tail,
            });
        }
        let _ = std::fs::remove_dir_all(&work);
        Ok(())
    }
}

/// The CRIU configuration file ferry hands the dump.
fn criu_conf(tcp: TcpDump) -> &'static str {
    match tcp {
        TcpDump::Close => "# written by ferry for one checkpoint\ntcp-close\n",
        TcpDump::Plain | TcpDump::Established => "",
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

/// The last `n` lines that say `Error`, or the last `n` lines if none do.
fn tail(log: &str, n: usize) -> String {
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
    let lines: Vec<&str> = if errors.is_empty() {
        log.lines().collect()
    } else {
        errors
    };
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(systemd: bool) -> RuncSettings {
        RuncSettings {
            runc: "runc".into(),
            exec_root: "/run/docker".into(),
            criu: "/tmp/fb/node1/bin/criu".into(),
            work_root: "/run/ferry".into(),
            systemd_cgroup: systemd,
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn checkpoint_args_name_docker_state_the_criu_and_the_folders() {
        let s = settings(false);
        let args = s.checkpoint_args(
            "c0ffee",
            Path::new("/var/lib/docker/containers/c0ffee/checkpoints/ferry-j1"),
            &s.work_dir("ferry-j1"),
            TcpDump::Plain,
        );
        assert_eq!(
            strings(args),
            [
                "--root",
                "/run/docker/runtime-runc/moby",
                "--criu",
                "/tmp/fb/node1/bin/criu",
                "checkpoint",
                "--image-path",
                "/var/lib/docker/containers/c0ffee/checkpoints/ferry-j1",
                "--work-path",
                "/run/ferry/runc/ferry-j1",
                "c0ffee",
            ]
        );
    }

    #[test]
    fn tcp_established_is_a_flag_and_systemd_a_global_one() {
        let s = settings(true);
        let args =
            strings(s.checkpoint_args("c", Path::new("/i"), Path::new("/w"), TcpDump::Established));
        assert_eq!(args[4], "--systemd-cgroup");
        assert_eq!(&args[args.len() - 2..], ["--tcp-established", "c"]);
        // tcp-close has no runc flag: it goes through CRIU's config file.
        let args =
            strings(s.checkpoint_args("c", Path::new("/i"), Path::new("/w"), TcpDump::Close));
        assert!(!args.iter().any(|a| a.starts_with("--tcp")), "{args:?}");
        assert_eq!(criu_conf(TcpDump::Close).lines().last(), Some("tcp-close"));
        assert_eq!(criu_conf(TcpDump::Plain), "");
    }

    #[tokio::test]
    async fn missing_state_is_unusable_with_the_path() {
        let err = settings(false)
            .usable("nope")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/run/docker/runtime-runc/moby/nope/state.json"),
            "{err}"
        );
    }

    #[test]
    fn log_tail_prefers_error_lines() {
        let log = "a\nError (x): one\nb\nError (y): two\nc\n";
        assert_eq!(tail(log, 6), "Error (x): one | Error (y): two");
        assert_eq!(tail("a\nb\nc\n", 2), "b | c");
        assert_eq!(last_line("x\n\n"), "x");
    }
}
