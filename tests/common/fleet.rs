//! A fleet on the bed: real `ferry agent` processes on its nodes, a fleet
//! PKI from `ferry certs`, and the broker they meet on (the bed's plain dev
//! broker or the production TLS configuration, see [`crate::broker`]), seen
//! through Debian's mosquitto clients, so jobs reach the agents exactly as a
//! third-party fleet manager would send them.
//!
//! Cleanup is by `Drop`, also when a test fails: agents are stopped by pid
//! ([`Agent`]); every container a test starts through the fleet, or names
//! to it with [`Fleet::track`], is removed from every node when the fleet is
//! dropped; the fleet's folder (certificates, agent logs) is kept only when
//! the test failed.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::broker::{Broker, DevBroker, TlsBroker, Who};
use crate::{
    check_counter_resumed, counter_values, parse_counter, run_with_timeout, unique_name, wait_for,
    Bed, CmdOutput, Container, Containers, Node, COUNTER_IMAGE,
};

/// How long an agent may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may drain after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a non-retained reply or a mosquitto client may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a whole migration may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// The states a job ends in.
const FINAL_STATES: [&str; 4] = ["succeeded", "failed", "rolled_back", "canceled"];
/// The phases a successful migration reports timings for.
pub const PHASES: [&str; 5] = ["precheck", "checkpoint", "transfer", "restore", "cleanup"];

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

/// `ferry certs --out OUT` for the manager, the broker and `nodes`.
pub fn ferry_certs(out: &Path, nodes: &[Node]) {
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let res = run_with_timeout(
        Command::new(ferry_bin())
            .args(["certs", "--out"])
            .arg(out)
            .args(["--nodes", &names.join(",")]),
        Duration::from_secs(30),
    )
    .expect("run ferry certs");
    assert!(res.status.success(), "ferry certs failed: {}", res.stderr);
}

/// SIGTERM by pid, then SIGKILL if it does not exit in time; the exit code.
pub fn stop_child(child: &mut Child, what: &str) -> Option<i32> {
    if let Ok(Some(status)) = child.try_wait() {
        return status.code();
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{what} (pid {}) did not stop on SIGTERM; killed",
        child.id()
    );
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A fleet on the plain dev broker of the bed.
pub type DevFleet = Fleet<DevBroker>;
/// A fleet on the production broker configuration.
pub type SecureFleet = Fleet<TlsBroker>;

/// A fleet on the bed: certificates for every node and the manager, a
/// broker of kind `B`, agents started on demand.
pub struct Fleet<B: Broker> {
    pub bed: Bed,
    pub dir: PathBuf,
    /// `ferry certs` output: ca.pem, broker.*, node1.*, node2.*, manager.*.
    pub certs: PathBuf,
    // Fields drop in this order: the containers first (a test's agents,
    // declared after its fleet, are stopped by then), the broker, the folder.
    containers: Containers,
    pub broker: B,
    _dir: RemoveOnSuccess,
}

/// Removes a folder when dropped, unless the test failed (the agent logs
/// in it then stay for the CI log).
struct RemoveOnSuccess(PathBuf);

impl Drop for RemoveOnSuccess {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// How to start an agent; the default is `ferry_bin()` on an ephemeral
/// port of its node's address.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentOptions<'a> {
    /// Another program than [`ferry_bin`]...
    pub bin: Option<&'a Path>,
    /// ...run through this command (e.g. qemu-aarch64).
    pub wrapper: &'a [&'a str],
    /// Where the data port listens.
    pub listen: Option<SocketAddr>,
    /// The data address the agent advertises, when not `listen`'s.
    pub advertise: Option<SocketAddr>,
    /// More `ferry agent` arguments.
    pub extra: &'a [&'a str],
    /// Another work dir (staging) than the node's default one in the fleet
    /// dir; the state dir (the job ledger) stays the node's.
    pub work_dir: Option<&'a Path>,
    /// Another CRIU for the agent's runc checkpoints than the node's
    /// wrapper (e.g. one that is slow on purpose).
    pub criu_path: Option<&'a Path>,
}

impl<B: Broker> Fleet<B> {
    pub fn new(bed: Bed) -> Fleet<B> {
        let dir = bed.state.join(unique_name("fleet"));
        std::fs::create_dir_all(&dir).expect("create the fleet dir");
        let guard = RemoveOnSuccess(dir.clone());
        let certs = dir.join("certs");
        ferry_certs(&certs, &bed.nodes);
        let broker = B::start(&bed, &dir, &certs);
        Fleet {
            containers: Containers::new(&bed.nodes),
            dir,
            certs,
            broker,
            bed,
            _dir: guard,
        }
    }

    pub fn node(&self, n: usize) -> &Node {
        self.bed.node(n)
    }

    pub fn root(&self) -> &str {
        self.broker.root()
    }

    /// `ROOT/rest`.
    pub fn topic(&self, rest: &str) -> String {
        format!("{}/{rest}", self.root())
    }

    /// (ca, cert, key) of `name` in the fleet PKI.
    pub fn tls_files(&self, name: &str) -> ferry_agent::stream::TlsFiles {
        ferry_agent::stream::TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{name}.pem")),
            key: self.certs.join(format!("{name}.key")),
        }
    }

    /// The `ferry agent` command line for node `n` with the TLS files
    /// `tls`; [`Fleet::start_agent_with`] runs it.
    pub fn agent_command(
        &self,
        n: usize,
        tls: &ferry_agent::stream::TlsFiles,
        opts: AgentOptions,
    ) -> Command {
        let node = self.node(n);
        let bin = opts.bin.map(Path::to_path_buf).unwrap_or_else(ferry_bin);
        let mut cmd = match opts.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let listen = opts
            .listen
            .unwrap_or_else(|| SocketAddr::new(node.addr.into(), 0));
        cmd.arg("agent")
            .args(["--node-id", &node.name, "--mqtt", &self.broker.url()])
            .args(["--docker", &node.docker_host])
            // Checkpoints through runc on the node's own runc state, with the
            // node's CRIU wrapper (fail-criu, criu.conf) and CRIU config.
            .arg("--docker-exec-root")
            .arg(&node.exec_root)
            .arg("--criu-path")
            .arg(
                opts.criu_path
                    .map_or_else(|| node.dir.join("bin/criu"), Path::to_path_buf),
            )
            .arg("--criu-config")
            .arg(node.dir.join("criu.conf"))
            .args(["--listen", &listen.to_string()])
            .arg("--work-dir")
            .arg(
                opts.work_dir
                    .map_or_else(|| self.work_dir(n), Path::to_path_buf),
            )
            .arg("--state-dir")
            .arg(self.dir.join(format!("{}-state", node.name)))
            .arg("--tls-ca")
            .arg(&tls.ca)
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .args(self.broker.agent_args());
        if let Some(a) = opts.advertise {
            cmd.args(["--advertise", &a.to_string()]);
        }
        cmd.args(opts.extra)
            .env("FERRY_LOG", "info,ferry_agent=debug");
        cmd
    }

    /// Node `n`'s agent state dir (job ledger, journal).
    pub fn state_dir(&self, n: usize) -> PathBuf {
        self.dir.join(format!("{}-state", self.node(n).name))
    }

    fn work_dir(&self, n: usize) -> PathBuf {
        self.dir.join(format!("{}-work", self.node(n).name))
    }

    /// Starts `ferry agent` for node `n` and waits until its retained status
    /// says it is online.
    pub fn start_agent(&self, n: usize) -> Agent {
        self.start_agent_with(n, AgentOptions::default())
    }

    pub fn start_agent_with(&self, n: usize, opts: AgentOptions) -> Agent {
        let node = self.node(n).name.clone();
        let log = self.dir.join(format!("{node}-agent.log"));
        let child = self
            .agent_command(n, &self.tls_files(&node), opts)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the agent of {node}: {e}"));
        let mut agent = Agent {
            node: node.clone(),
            child,
            log,
            work: self.work_dir(n),
        };
        let topic = self.topic(&format!("{node}/status"));
        wait_for(&format!("agent {node} online"), ONLINE_TIMEOUT, || {
            if let Ok(Some(exit)) = agent.child.try_wait() {
                return Ok(Err(format!(
                    "agent exited with {exit}: {}",
                    agent.log_text()
                )));
            }
            match self.retained(&topic) {
                Some(v) if v["online"] == true => Ok(Ok(())),
                other => Err(format!("status {other:?}")),
            }
        })
        .unwrap_or_else(|e: String| panic!("{e}"));
        agent
    }

    /// The retained message on `topic`, if any, as JSON.
    pub fn retained(&self, topic: &str) -> Option<Value> {
        let out = run_with_timeout(
            self.broker.client("mosquitto_sub").args([
                "-t",
                topic,
                "-C",
                "1",
                "-W",
                "1",
                "--retained-only",
            ]),
            Duration::from_secs(5),
        )
        .ok()?;
        let line = out.stdout.lines().next()?;
        serde_json::from_str(line).ok()
    }

    /// The retained status of `node`, which must have one.
    pub fn node_status(&self, node: &str) -> Value {
        self.retained(&self.topic(&format!("{node}/status")))
            .unwrap_or_else(|| panic!("no retained status for {node}"))
    }

    /// The data address `node` advertises.
    pub fn data_addr(&self, node: &str) -> SocketAddr {
        let status = self.node_status(node);
        status["data_addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{node} advertises no data address: {status}"))
    }

    /// Publishes with QoS 1 as the fleet manager, which must succeed.
    pub fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let out = publish(self.broker.client("mosquitto_pub"), topic, payload, retain);
        assert!(
            out.status.success(),
            "mosquitto_pub {topic}: {}",
            out.stderr
        );
    }

    /// Publishes a job to `node`.
    pub fn send_job(&self, node: &str, job_id: &str, job: &Value) {
        self.publish(
            &self.topic(&format!("{node}/jobs/{job_id}")),
            &job.to_string(),
            false,
        );
    }

    /// Records every message under `filter` as the fleet manager, from
    /// the broker's SUBACK on (start it before publishing a job, so the
    /// non-retained accepted/rejected reply is not missed).
    pub fn subscribe(&self, filter: &str) -> Subscriber {
        let sub = Subscriber::start(self.broker.client("mosquitto_sub"), &[filter]);
        assert!(
            sub.subscribed(),
            "the manager could not subscribe to {filter}: {}",
            sub.diagnostics()
        );
        sub
    }

    /// Waits for the job's final retained status on `node`.
    pub fn final_status(&self, node: &str, job_id: &str, timeout: Duration) -> Value {
        let topic = self.topic(&format!("{node}/jobs/{job_id}/status"));
        wait_for(
            &format!("final state of {job_id} on {node}"),
            timeout,
            || match self.retained(&topic) {
                Some(s) if FINAL_STATES.contains(&s["state"].as_str().unwrap_or("")) => Ok(s),
                other => Err(format!("status {other:?}")),
            },
        )
    }

    /// Removes container `name` from every node when the fleet is dropped:
    /// for containers an agent may create on the test's behalf.
    pub fn track(&self, name: &str) {
        self.containers.track(name);
    }

    /// Starts a container on node `n` under a fresh name, tracked.
    pub fn run(&self, n: usize, prefix: &str, image: &str, args: &[&str]) -> Container {
        let name = unique_name(prefix);
        self.track(&name);
        self.node(n).run(&name, image, args)
    }

    /// Starts a container on node `n` under a fresh name, tracked, with
    /// `docker run` options (see [`Node::run_with`]).
    pub fn run_with(
        &self,
        n: usize,
        prefix: &str,
        options: &[&str],
        image: &str,
        args: &[&str],
    ) -> Container {
        let name = unique_name(prefix);
        self.track(&name);
        self.node(n).run_with(&name, options, image, args)
    }

    /// Same, with more `docker run` options before the image, on no
    /// network (see [`Node::run_opts`]).
    pub fn run_opts(
        &self,
        n: usize,
        prefix: &str,
        image: &str,
        opts: &[&str],
        args: &[&str],
    ) -> Container {
        let name = unique_name(prefix);
        self.track(&name);
        self.node(n).run_opts(&name, image, opts, args)
    }

    /// Starts `counter` on node `n` and waits until it has printed a few
    /// values.
    pub fn start_counter(&self, n: usize) -> Container {
        let source = self.run(n, "counter", COUNTER_IMAGE, &[]);
        source.wait_counting(REPLY_TIMEOUT);
        source
    }

    /// Publishes a job that migrates `source` to node `to` (with
    /// `options`, when given); returns the job id.
    pub fn send_migrate(&self, source: &Container, to: usize, options: Option<Value>) -> String {
        let job = unique_name("job");
        let mut order =
            json!({"action": "migrate", "container": source.name, "target": self.node(to).name});
        if let Some(o) = options {
            order["options"] = o;
        }
        self.send_job(&source.node.name, &job, &order);
        job
    }

    /// Migrates the running counter `source` to node `to` with a job from
    /// the manager (with `options`, when given) and checks what a user
    /// sees: the job accepted; the source's final status succeeded, without
    /// an error, every phase timed; the target's own status succeeded, as
    /// the target; the container gone from the source node, and running on
    /// `to`, counting on from the source's last value + 1.
    pub fn migrate_counter(
        &self,
        source: &Container,
        to: usize,
        options: Option<Value>,
    ) -> Migrated {
        let (src, dst) = (&source.node, self.node(to));
        let name = &source.name;
        let replies = self.subscribe(&self.topic(&format!("{}/jobs/+/accepted", src.name)));
        let source_logs = LastLogs::follow(src, name);
        let job = self.send_migrate(source, to, options);
        let accepted = replies.wait_topic(&format!("/jobs/{job}/accepted"), REPLY_TIMEOUT);
        assert_eq!(accepted["job_id"], job.as_str());

        let status = self.final_status(&src.name, &job, JOB_TIMEOUT);
        let path = format!("{} -> {}", src.name, dst.name);
        assert_eq!(
            status["state"], "succeeded",
            "{path}: final status {status}"
        );
        assert_eq!(status["error"], Value::Null, "{path}: {status}");
        for phase in PHASES {
            assert!(
                status["timings_ms"][phase].as_u64().is_some(),
                "{path}: no timing for {phase}: {status}"
            );
        }
        let target_view = self.final_status(&dst.name, &job, REPLY_TIMEOUT);
        assert_eq!(
            target_view["state"], "succeeded",
            "{path}: the target's status {target_view}"
        );
        assert_eq!(target_view["role"], "target", "{target_view}");

        let before = counter_values(&source_logs.finish());
        assert!(!src.exists(name), "{name} still exists on {}", src.name);
        wait_for(&format!("counter on {}", dst.name), REPLY_TIMEOUT, || {
            check_counter_resumed(&before, &parse_counter(&dst.logs(name))?, 5)
        });
        assert!(
            dst.is_running(name),
            "{name} is not running on {}",
            dst.name
        );
        println!(
            "{path}: counter stopped at {}, went on; timings {}",
            before.last().unwrap_or(&0),
            status["timings_ms"]
        );
        Migrated {
            job,
            status,
            before,
        }
    }

    /// After a migration of the counter `source` to node `to` that failed
    /// once the source had checkpointed (`job`, and `status` the source's
    /// final status), checks what a user sees: the job rolled back with an
    /// error that names `cause`; the target's own status failed; the
    /// container on no node but the source, where it counts on from 0
    /// without a gap. Returns the target's status and the counter's values.
    pub fn assert_rolled_back(
        &self,
        source: &Container,
        to: usize,
        job: &str,
        status: &Value,
        cause: &str,
    ) -> (Value, Vec<u64>) {
        let dst = self.node(to);
        assert_eq!(status["state"], "rolled_back", "final status: {status}");
        let checkpointed_in = status["timings_ms"]["checkpoint"].as_u64().unwrap_or(0);
        assert!(
            checkpointed_in > 0,
            "the job failed before the checkpoint: {status}"
        );
        let error = status["error"].as_str().unwrap_or("");
        assert!(
            error.contains(cause),
            "the error should name the {cause}: {error}"
        );
        let target_view = self.final_status(&dst.name, job, REPLY_TIMEOUT);
        assert_eq!(
            target_view["state"], "failed",
            "the target's status: {target_view}"
        );
        assert!(
            !dst.exists(&source.name),
            "{} was left behind on {}",
            source.name,
            dst.name
        );
        let values = counter_went_on_at_source(source, status);
        println!(
            "rolled back: the counter on {} went on to {} with no gap; source error: {error}; target error: {}",
            source.node.name,
            values.last().unwrap_or(&0),
            target_view["error"]
        );
        (target_view, values)
    }
}

/// A counter migration that succeeded.
pub struct Migrated {
    pub job: String,
    /// The source's final status.
    pub status: Value,
    /// What the source printed.
    pub before: Vec<u64>,
}

impl Fleet<DevBroker> {
    /// Runs `ferry ARGS` against this fleet's broker and topic root.
    pub fn ferry(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        run_with_timeout(
            Command::new(ferry_bin()).args(args).args([
                "--mqtt",
                &self.broker.url(),
                "--topic-root",
                self.root(),
            ]),
            timeout,
        )
        .expect("run ferry")
    }

    /// `ferry migrate` of `container` from node1 to node2 as job `job`,
    /// through the CLI; fails the test unless the command succeeds.
    pub fn cli_migrate_1_to_2(&self, container: &str, job: &str) -> CmdOutput {
        let out = self.ferry(
            &[
                "migrate", container, "--from", "node1", "--to", "node2", "--job-id", job,
            ],
            JOB_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "ferry migrate failed: {}{}",
            out.stdout,
            out.stderr
        );
        out
    }
}

impl Fleet<TlsBroker> {
    /// `mosquitto_pub -q 1` as `who`; the caller judges the outcome (MQTT
    /// 3.1.1 gives a publisher no sign of an ACL denial).
    pub fn publish_as(&self, who: Who, topic: &str, payload: &str, retain: bool) -> CmdOutput {
        publish(
            self.broker.client_as("mosquitto_pub", who),
            topic,
            payload,
            retain,
        )
    }

    /// `mosquitto_pub -q 1 -f FILE` as `who`: for payloads too large for
    /// a command line.
    pub fn publish_file_as(&self, who: Who, topic: &str, file: &Path) -> CmdOutput {
        let mut cmd = self.broker.client_as("mosquitto_pub", who);
        cmd.args(["-q", "1", "-t", topic, "-f"]).arg(file);
        run_with_timeout(&mut cmd, Duration::from_secs(10)).expect("run mosquitto_pub")
    }

    /// A subscriber as `who`; returns once the broker acknowledged the
    /// subscription, or the connection failed (see [`Subscriber::subscribed`]).
    pub fn subscribe_as(&self, who: Who, filters: &[&str]) -> Subscriber {
        Subscriber::start(self.broker.client_as("mosquitto_sub", who), filters)
    }

    /// A subscriber from a `mosquitto_sub` command the test set up itself
    /// (another listener, a client id of its choice).
    pub fn subscribe_with(&self, mosquitto_sub: Command, filters: &[&str]) -> Subscriber {
        Subscriber::start(mosquitto_sub, filters)
    }

    pub fn broker_log_text(&self) -> String {
        self.broker.log_text()
    }
}

fn publish(mut mosquitto_pub: Command, topic: &str, payload: &str, retain: bool) -> CmdOutput {
    mosquitto_pub.args(["-q", "1", "-t", topic, "-m", payload]);
    if retain {
        mosquitto_pub.arg("-r");
    }
    run_with_timeout(&mut mosquitto_pub, Duration::from_secs(10)).expect("run mosquitto_pub")
}

/// A running `ferry agent`; stopped by its pid with SIGTERM (its designed
/// drain) when dropped, killed if it does not exit in time. Its log is
/// printed when the test failed.
pub struct Agent {
    pub node: String,
    child: Child,
    pub log: PathBuf,
    pub work: PathBuf,
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
        stop_child(&mut self.child, &format!("agent {}", self.node))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
        if thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.node, self.log_text());
        }
    }
}

#[derive(Default)]
struct SubState {
    subscribed: bool,
    messages: Vec<(String, String)>,
    /// When each message arrived, in ms since the Unix epoch (the agents'
    /// clock for `updated_ms`).
    arrived_ms: Vec<u64>,
    debug: Vec<String>,
    stderr: String,
}

/// A background `mosquitto_sub -d -v`: the messages it received, in order.
pub struct Subscriber {
    child: Child,
    state: Arc<Mutex<SubState>>,
}

impl Subscriber {
    /// Starts `mosquitto_sub` (already pointed at a broker as some identity)
    /// on `filters` and waits for the broker's SUBACK, or for the client's
    /// end.
    fn start(mut mosquitto_sub: Command, filters: &[&str]) -> Subscriber {
        mosquitto_sub.args(["-d", "-v", "-q", "1"]);
        for f in filters {
            mosquitto_sub.args(["-t", f]);
        }
        let mut child = mosquitto_sub
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mosquitto_sub");
        let state = Arc::new(Mutex::new(SubState::default()));
        let stdout = child.stdout.take().expect("mosquitto_sub stdout");
        let stderr = child.stderr.take().expect("mosquitto_sub stderr");
        let sink = state.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                if line.starts_with("Subscribed (mid:") {
                    s.subscribed = true;
                } else if line.starts_with("Client ") {
                    s.debug.push(line);
                } else if let Some((topic, payload)) = line.split_once(' ') {
                    s.messages.push((topic.to_string(), payload.to_string()));
                    s.arrived_ms.push(now_ms());
                }
            }
        });
        let sink = state.clone();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            sink.lock().unwrap().stderr = text;
        });
        let mut sub = Subscriber { child, state };
        wait_for(
            &format!("mosquitto_sub {filters:?} subscribed or refused"),
            Duration::from_secs(10),
            || {
                if sub.subscribed() || !sub.is_running() {
                    Ok(())
                } else {
                    Err("no SUBACK yet".to_string())
                }
            },
        );
        sub
    }

    pub fn messages(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().messages.clone()
    }

    /// The payloads received so far, each with its arrival time (ms since
    /// the Unix epoch).
    pub fn payloads_at(&self) -> Vec<(u64, String)> {
        let s = self.state.lock().unwrap();
        s.arrived_ms
            .iter()
            .zip(&s.messages)
            .map(|(t, (_, p))| (*t, p.clone()))
            .collect()
    }

    /// Whether the broker acknowledged the subscription.
    pub fn subscribed(&self) -> bool {
        self.state.lock().unwrap().subscribed
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the client said on stderr and in its debug lines (after it ended).
    pub fn diagnostics(&self) -> String {
        let s = self.state.lock().unwrap();
        format!("{}{}", s.debug.join("\n"), s.stderr)
    }

    /// Waits for a message whose topic ends with `suffix`; returns its
    /// payload as JSON (or as a string when it is not JSON).
    pub fn wait_topic(&self, suffix: &str, timeout: Duration) -> Value {
        wait_for(&format!("a message on …{suffix}"), timeout, || {
            self.messages()
                .into_iter()
                .find(|(t, _)| t.ends_with(suffix))
                .map(|(_, p)| serde_json::from_str(&p).unwrap_or(Value::String(p)))
                .ok_or_else(|| format!("seen: {:?}", self.messages()))
        })
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// After a rollback: the source's counter runs again and its output has no
/// gap or repeat from 0 on, well past the frozen time the job's status
/// reports (it prints 10 values a second). Returns the values.
fn counter_went_on_at_source(source: &Container, status: &Value) -> Vec<u64> {
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
                match node.try_docker(&["logs", &container]) {
                    Ok(out) if out.status.success() => last = out.stdout,
                    _ => break,
                }
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
