//! Real `ferry agent` processes on the bed's nodes, a dev fleet PKI for
//! them, and the broker seen through Debian's mosquitto clients (so jobs
//! reach the agents exactly as a third-party fleet manager would send them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{
    parse_counter, run_with_timeout, unique_name, wait_for, Bed, Container, Node, COUNTER_IMAGE,
};

/// After a rollback: the source's counter runs again and its output has no
/// gap or repeat from 0 on, well past the frozen time the job's status
/// reports (it prints 10 values a second). Returns the values.
pub fn counter_went_on_at_source(source: &Container, status: &serde_json::Value) -> Vec<u64> {
    let frozen_ms: u64 = status["timings_ms"]
        .as_object()
        .map(|o| o.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0);
    let needed = 5 + 10 * (frozen_ms / 1000 + 2) as usize;
    let values = wait_for(
        "counter on the source after rollback",
        Duration::from_secs(30),
        || {
            let v = parse_counter(&source.logs())?;
            if let Some((i, w)) = v.windows(2).enumerate().find(|(_, w)| w[1] != w[0] + 1) {
                return Ok(Err(format!(
                    "gap or repeat at line {i}: {} then {}",
                    w[0], w[1]
                )));
            }
            if source.is_running() && v.len() > needed {
                Ok(Ok(v))
            } else {
                Err(format!("{} values, want > {needed}", v.len()))
            }
        },
    )
    .unwrap_or_else(|e: String| panic!("{e}"));
    assert_eq!(
        values[0], 0,
        "the source counter did not start at 0: {values:?}"
    );
    values
}

/// Waits until an agent process is online by its retained status, failing
/// at once (with its log) if it exits.
pub fn wait_agent_online(
    what: &str,
    child: &mut Child,
    log: &Path,
    mut status: impl FnMut() -> Option<serde_json::Value>,
) {
    wait_for(what, ONLINE_TIMEOUT, || {
        if let Ok(Some(exit)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Ok(Err(format!("agent exited with {exit}: {log}")));
        }
        match status() {
            Some(v) if v["online"] == true => Ok(Ok(())),
            other => Err(format!("status {other:?}")),
        }
    })
    .unwrap_or_else(|e: String| panic!("{e}"));
}

/// Starts `counter` on `node` under a fresh name and waits until it has
/// printed a few values.
pub fn start_counter(node: &Node) -> Container {
    let source = node.run(&unique_name("counter"), COUNTER_IMAGE, &[]);
    wait_for("counter printing", Duration::from_secs(20), || {
        let v = parse_counter(&source.logs())?;
        (v.len() >= 5)
            .then_some(())
            .ok_or(format!("{} values", v.len()))
    });
    source
}

/// How long an agent may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM drain before the harness kills an agent.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The `ferry` binary under test: `FERRY_BIN` (set by `tests/run`), else the
/// workspace's debug or release build.
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("ferry");
        if p.exists() {
            return p;
        }
    }
    panic!("no ferry binary: run `cargo build -p ferry-agent` or set FERRY_BIN");
}

/// A fleet on the bed: certificates for every node and the manager, and a
/// topic root of its own so retained messages of other tests never mix in.
pub struct Fleet {
    pub bed: Bed,
    pub root: String,
    pub dir: PathBuf,
    pub certs: PathBuf,
    broker_host: String,
    broker_port: String,
}

impl Fleet {
    pub fn new(bed: Bed) -> Fleet {
        let name = unique_name("fleet");
        let dir = bed.state.join(&name);
        std::fs::create_dir_all(&dir).expect("create fleet dir");
        let certs = dir.join("certs");
        let nodes: Vec<&str> = bed.nodes.iter().map(|n| n.name.as_str()).collect();
        let out = run_with_timeout(
            Command::new(ferry_bin())
                .args(["certs", "--out"])
                .arg(&certs)
                .args(["--nodes", &nodes.join(",")]),
            Duration::from_secs(30),
        )
        .expect("run ferry certs");
        assert!(out.status.success(), "ferry certs failed: {}", out.stderr);
        let hostport = bed
            .mqtt
            .strip_prefix("mqtt://")
            .expect("the bed's broker is mqtt://");
        let (host, port) = hostport.rsplit_once(':').expect("broker host:port");
        Fleet {
            root: format!("{name}/v1"),
            dir,
            certs,
            broker_host: host.to_string(),
            broker_port: port.to_string(),
            bed,
        }
    }

    pub fn node(&self, n: usize) -> &Node {
        self.bed.node(n)
    }

    /// Starts `ferry agent` for node `n` and waits until its retained status
    /// says it is online.
    pub fn start_agent(&self, n: usize) -> Agent {
        self.start_agent_with(n, &[])
    }

    pub fn start_agent_with(&self, n: usize, extra: &[&str]) -> Agent {
        self.start_agent_bin(n, &ferry_bin(), &[], extra)
    }

    /// Starts an agent from `bin`, run through `wrapper` (e.g. qemu-aarch64).
    pub fn start_agent_bin(&self, n: usize, bin: &Path, wrapper: &[&str], extra: &[&str]) -> Agent {
        let node = self.node(n).clone();
        let work = self.dir.join(format!("{}-work", node.name));
        let log = self.dir.join(format!("{}-agent.log", node.name));
        let cert = |ext: &str| self.certs.join(format!("{}.{ext}", node.name));
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("agent")
            .args(["--node-id", &node.name, "--mqtt", &self.bed.mqtt])
            .args(["--docker", &node.docker_host])
            .args(["--listen", &format!("{}:0", node.addr)])
            .arg("--work-dir")
            .arg(&work)
            .args(["--topic-root", &self.root])
            .arg("--tls-ca")
            .arg(self.certs.join("ca.pem"))
            .arg("--tls-cert")
            .arg(cert("pem"))
            .arg("--tls-key")
            .arg(cert("key"))
            // The bed's broker is the plain dev listener; the data port
            // still uses mutual TLS with the files above.
            .arg("--insecure")
            .args(extra)
            .env("FERRY_LOG", "info,ferry_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut agent = Agent {
            node: node.name.clone(),
            child,
            log,
        };
        let topic = format!("{}/{}/status", self.root, node.name);
        wait_agent_online(
            &format!("agent {} online", node.name),
            &mut agent.child,
            &agent.log,
            || self.retained(&topic),
        );
        agent
    }

    fn mosquitto(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(["-h", &self.broker_host, "-p", &self.broker_port]);
        c
    }

    /// The retained message on `topic`, if any, as JSON.
    pub fn retained(&self, topic: &str) -> Option<serde_json::Value> {
        retained_with(self.mosquitto("mosquitto_sub"), topic)
    }

    /// Publishes with QoS 1, as a fleet manager would.
    pub fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let mut cmd = self.mosquitto("mosquitto_pub");
        cmd.args(["-q", "1", "-t", topic, "-m", payload]);
        if retain {
            cmd.arg("-r");
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub {topic}: {}",
            out.stderr
        );
    }

    /// Starts recording every message under `filter` (before publishing a job,
    /// so the non-retained accepted/rejected reply is not missed).
    pub fn record(&self, filter: &str) -> Recorder {
        let mut child = self
            .mosquitto("mosquitto_sub")
            .args(["-v", "-q", "1", "-t", filter])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub");
        let lines = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let stdout = child.stdout.take().expect("mosquitto_sub stdout");
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((topic, payload)) = line.split_once(' ') {
                    sink.lock()
                        .unwrap()
                        .push((topic.to_string(), payload.to_string()));
                }
            }
        });
        let rec = Recorder { child, lines };
        // mosquitto_sub has subscribed once a retained probe comes back; a
        // short settle is the only signal it gives, so check with a probe.
        let probe = format!(
            "{}/probe/{}",
            filter.trim_end_matches("/#").trim_end_matches("/+"),
            unique_name("p")
        );
        if filter.ends_with('#') {
            wait_for("mosquitto_sub subscribed", Duration::from_secs(10), || {
                self.publish(&probe, "{}", false);
                if rec.messages().iter().any(|(t, _)| t == &probe) {
                    Ok(())
                } else {
                    Err("probe not seen yet".to_string())
                }
            });
        } else {
            thread::sleep(Duration::from_millis(500));
        }
        rec
    }

    /// Publishes a job to `node` and returns its id.
    pub fn send_job(&self, node: &str, job_id: &str, job: &serde_json::Value) {
        self.publish(
            &format!("{}/{node}/jobs/{job_id}", self.root),
            &job.to_string(),
            false,
        );
    }

    /// Waits for the job's final retained status on `node`.
    pub fn final_status(&self, node: &str, job_id: &str, timeout: Duration) -> serde_json::Value {
        let topic = format!("{}/{node}/jobs/{job_id}/status", self.root);
        wait_for(
            &format!("final state of {job_id} on {node}"),
            timeout,
            || match self.retained(&topic) {
                Some(s)
                    if ["succeeded", "failed", "rolled_back", "canceled"]
                        .contains(&s["state"].as_str().unwrap_or("")) =>
                {
                    Ok(s)
                }
                other => Err(format!("status {other:?}")),
            },
        )
    }

    /// Runs `ferry ARGS` against this fleet's broker and topic root.
    pub fn ferry(&self, args: &[&str], timeout: Duration) -> crate::CmdOutput {
        run_with_timeout(
            Command::new(ferry_bin()).args(args).args([
                "--mqtt",
                &self.bed.mqtt,
                "--topic-root",
                &self.root,
            ]),
            timeout,
        )
        .expect("run ferry")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Keep the folder (agent logs) when a test failed, for the CI log.
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Messages recorded by a background `mosquitto_sub -v`.
pub struct Recorder {
    child: Child,
    lines: Arc<Mutex<Vec<(String, String)>>>,
}

impl Recorder {
    pub fn messages(&self) -> Vec<(String, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a message whose topic ends with `suffix`; returns its payload.
    pub fn wait_topic(&self, suffix: &str, timeout: Duration) -> serde_json::Value {
        wait_topic_in(|| self.messages(), suffix, timeout)
    }
}

/// The retained message on `topic`, read with `mosquitto_sub` already
/// pointed at a broker (and, for TLS, holding an identity).
pub fn retained_with(mut mosquitto_sub: Command, topic: &str) -> Option<serde_json::Value> {
    let out = run_with_timeout(
        mosquitto_sub.args(["-t", topic, "-C", "1", "-W", "1", "--retained-only"]),
        Duration::from_secs(5),
    )
    .ok()?;
    let line = out.stdout.lines().next()?;
    serde_json::from_str(line).ok()
}

/// Waits until `messages` holds one whose topic ends with `suffix`; returns
/// its payload as JSON (or as a string when it is not JSON).
pub fn wait_topic_in(
    messages: impl Fn() -> Vec<(String, String)>,
    suffix: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_for(&format!("a message on …{suffix}"), timeout, || {
        messages()
            .into_iter()
            .find(|(t, _)| t.ends_with(suffix))
            .map(|(_, p)| serde_json::from_str(&p).unwrap_or(serde_json::Value::String(p)))
            .ok_or_else(|| format!("seen: {:?}", messages()))
    })
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ferry agent`; stopped with SIGTERM (its designed drain) when
/// dropped, killed if it does not exit in time.
pub struct Agent {
    pub node: String,
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait for the exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            eprintln!("agent {} did not stop on SIGTERM; killed", self.node);
        }
        if thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.node, self.log_text());
        }
    }
}

/// Polls a container's logs on `node` until it disappears there, and
/// returns the last logs read while it still existed.
pub struct LastLogs {
    handle: Option<thread::JoinHandle<String>>,
}

impl LastLogs {
    pub fn follow(node: &Node, container: &str) -> LastLogs {
        let node = node.clone();
        let container = container.to_string();
        let handle = thread::spawn(move || {
            let mut last = String::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(600) {
                let out = node.docker(&["logs", &container]);
                if !out.status.success() {
                    break;
                }
                last = out.stdout;
                thread::sleep(Duration::from_millis(100));
            }
            last
        });
        LastLogs {
            handle: Some(handle),
        }
    }

    /// Waits until the container is gone and returns its last logs.
    pub fn finish(mut self) -> String {
        self.handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}
