//! Helpers for integration tests on the local edge-fleet bed (`tests/bed/bed`).
//!
//! `tests/bed/bed up N` writes an env file describing the bed: the broker,
//! and for each node its Docker socket, data root and agent address. Tests
//! find it through `FERRY_BED_ENV` (set by `tests/run`), or at
//! [`DEFAULT_ENV_FILE`]. The format is documented at the top of
//! `tests/bed/bed`: one `KEY=value` per line, `#` comments.
//!
//! Everything here talks to the real daemons through Debian's docker client;
//! nothing is faked.

pub mod broker;
pub mod fleet;
pub mod hostile;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where `tests/bed/bed up` writes the env file with the default state dir.
pub const DEFAULT_ENV_FILE: &str = "/tmp/ferry-bed/bed.env";
/// What a test says when it finds no bed.
pub const NOT_UP: &str = "bed is not up: run tests/bed/bed up 2 (or tests/run)";
/// The client the bed uses unless its env file names another.
pub const DEFAULT_DOCKER: &str = "/usr/bin/docker";
/// Prints 0, 1, 2, ... every 100 ms (`images/counter.c`).
pub const COUNTER_IMAGE: &str = "ferry-test/counter:latest";
/// `memhog SIZE_MIB` (`images/memhog.c`).
pub const MEMHOG_IMAGE: &str = "ferry-test/memhog:latest";

/// How long a single docker command may take before the test gives up on it.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// How often [`wait_for`] looks again.
const POLL: Duration = Duration::from_millis(100);

/// Why the bed's env file could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum EnvError {
    /// The file does not exist: the bed is not up.
    NotUp {
        path: PathBuf,
    },
    Unreadable {
        path: PathBuf,
        reason: String,
    },
    BadLine {
        line: usize,
        text: String,
    },
    MissingKey {
        key: String,
    },
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvError::NotUp { path } => write!(f, "{NOT_UP} ({} not found)", path.display()),
            EnvError::Unreadable { path, reason } => {
                write!(f, "cannot read bed env file {}: {reason}", path.display())
            }
            EnvError::BadLine { line, text } => {
                write!(f, "bed env file line {line} is not KEY=value: {text:?}")
            }
            EnvError::MissingKey { key } => write!(f, "bed env file has no {key}"),
            EnvError::BadValue { key, value, reason } => {
                write!(f, "bed env file: {key}={value}: {reason}")
            }
        }
    }
}

impl std::error::Error for EnvError {}

/// Parses `KEY=value` lines; blank lines and `#` comments are skipped, and a
/// value wrapped in matching single or double quotes loses them.
pub fn parse_env(text: &str) -> Result<HashMap<String, String>, EnvError> {
    let mut map = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || EnvError::BadLine {
            line: i + 1,
            text: raw.to_string(),
        };
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(bad());
        }
        let value = unquote(value);
        map.insert(key.to_string(), value.to_string());
    }
    Ok(map)
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// The bed as its env file describes it.
#[derive(Debug, Clone)]
pub struct Bed {
    pub state: PathBuf,
    /// `mqtt://127.0.0.1:PORT`
    pub mqtt: String,
    /// The broker as containers on any node's bridge reach it
    /// (`FERRY_BED_MQTT_BRIDGE_HOST`, `FERRY_BED_MQTT_PORT`), when the bed
    /// says.
    pub mqtt_bridge: Option<(Ipv4Addr, u16)>,
    /// This bed's network index K: its subnets are 10.(200+K).0.0/16.
    pub net_index: Option<u8>,
    pub nodes: Vec<Node>,
}

/// One simulated edge node: a dockerd of its own and an address for its agent.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// `unix:///...`, as `docker -H` and `DOCKER_HOST` take it.
    pub docker_host: String,
    /// The daemon's DockerRootDir.
    pub data_root: PathBuf,
    pub exec_root: PathBuf,
    /// The loopback address this node's agent binds.
    pub addr: Ipv4Addr,
    /// Scratch space for this node's agent.
    pub dir: PathBuf,
    docker: PathBuf,
}

impl Bed {
    /// Reads the env file named by `FERRY_BED_ENV`, or [`DEFAULT_ENV_FILE`].
    pub fn from_env() -> Result<Bed, EnvError> {
        let path = std::env::var_os("FERRY_BED_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ENV_FILE));
        Bed::from_file(&path)
    }

    pub fn from_file(path: &Path) -> Result<Bed, EnvError> {
        let text = fs::read_to_string(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => EnvError::NotUp {
                path: path.to_path_buf(),
            },
            _ => EnvError::Unreadable {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })?;
        Bed::from_env_text(&text)
    }

    pub fn from_env_text(text: &str) -> Result<Bed, EnvError> {
        let map = parse_env(text)?;
        let get = |key: &str| {
            map.get(key).cloned().ok_or_else(|| EnvError::MissingKey {
                key: key.to_string(),
            })
        };
        let docker = PathBuf::from(
            map.get("FERRY_BED_DOCKER")
                .map(String::as_str)
                .unwrap_or(DEFAULT_DOCKER),
        );
        let count_text = get("FERRY_BED_NODE_COUNT")?;
        let count: usize = count_text.parse().map_err(|_| EnvError::BadValue {
            key: "FERRY_BED_NODE_COUNT".into(),
            value: count_text.clone(),
            reason: "not a number".into(),
        })?;
        let mut nodes = Vec::with_capacity(count);
        for i in 1..=count {
            let key = |what: &str| format!("FERRY_NODE{i}_{what}");
            let docker_host = get(&key("DOCKER"))?;
            if !docker_host.starts_with("unix:///") {
                return Err(EnvError::BadValue {
                    key: key("DOCKER"),
                    value: docker_host,
                    reason: "expected unix:///path/to/docker.sock".into(),
                });
            }
            let addr_text = get(&key("ADDR"))?;
            let addr = addr_text.parse().map_err(|_| EnvError::BadValue {
                key: key("ADDR"),
                value: addr_text.clone(),
                reason: "not an IPv4 address".into(),
            })?;
            nodes.push(Node {
                name: map
                    .get(&key("NAME"))
                    .cloned()
                    .unwrap_or_else(|| format!("node{i}")),
                docker_host,
                data_root: get(&key("DATA_ROOT"))?.into(),
                exec_root: get(&key("EXEC_ROOT"))?.into(),
                addr,
                dir: get(&key("DIR"))?.into(),
                docker: docker.clone(),
            });
        }
        let text = |key: &str| map.get(key).map(String::as_str).unwrap_or_default();
        let mqtt_bridge = text("FERRY_BED_MQTT_BRIDGE_HOST")
            .parse()
            .ok()
            .zip(text("FERRY_BED_MQTT_PORT").parse().ok());
        Ok(Bed {
            state: get("FERRY_BED_STATE")?.into(),
            mqtt: get("FERRY_BED_MQTT")?,
            mqtt_bridge,
            net_index: text("FERRY_BED_NET_INDEX").parse().ok(),
            nodes,
        })
    }

    /// The bed, or a test failure that says how to bring it up.
    pub fn require() -> Bed {
        Bed::from_env().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Node `n`, counting from 1 like the bed's names (`node1`).
    pub fn node(&self, n: usize) -> &Node {
        n.checked_sub(1)
            .and_then(|i| self.nodes.get(i))
            .unwrap_or_else(|| {
                panic!(
                    "this test needs node{n}, the bed has {} node(s): run tests/bed/bed down && tests/bed/bed up {n}",
                    self.nodes.len()
                )
            })
    }
}

/// What a command printed, and how it ended.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it after `timeout`. Both pipes are
/// drained while it runs, so a chatty command cannot block on a full pipe.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<CmdOutput> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", timeout.as_secs()),
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(CmdOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

impl Node {
    /// `docker -H <this node> ARGS`, whatever its exit status.
    pub fn docker(&self, args: &[&str]) -> CmdOutput {
        self.try_docker(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Same, but a client that cannot run or does not answer is an error
    /// rather than a panic: for `Drop`, which may run while unwinding.
    pub fn try_docker(&self, args: &[&str]) -> Result<CmdOutput, String> {
        let mut cmd = Command::new(&self.docker);
        cmd.arg("-H").arg(&self.docker_host).args(args);
        run_with_timeout(&mut cmd, DOCKER_TIMEOUT).map_err(|e| {
            format!(
                "{}: running {} -H {} {}: {e}",
                self.name,
                self.docker.display(),
                self.docker_host,
                args.join(" ")
            )
        })
    }

    /// `docker rm -f NAME_OR_ID`; a container that is not there (a
    /// migration moved it, a test removed it) is not an error.
    pub fn remove(&self, container: &str) -> Result<(), String> {
        let out = self.try_docker(&["rm", "-f", container])?;
        if out.status.success() || out.stderr.contains("No such container") {
            Ok(())
        } else {
            Err(format!(
                "{}: could not remove container {container}: {}",
                self.name,
                out.stderr.trim()
            ))
        }
    }

    /// Whether a container of that name or id exists on this node.
    pub fn exists(&self, container: &str) -> bool {
        self.docker(&["inspect", container]).status.success()
    }

    /// `docker -H <this node> ARGS`, which must succeed; returns its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        if !out.status.success() {
            panic!(
                "{}: docker {} failed ({}): {}",
                self.name,
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        out.stdout
    }

    /// Starts a container (`--network none`, always) and returns a guard
    /// that removes it when dropped.
    pub fn run(&self, name: &str, image: &str, args: &[&str]) -> Container {
        let mut argv = vec!["run", "-d", "--network", "none", "--name", name, image];
        argv.extend_from_slice(args);
        let id = self.docker_ok(&argv).trim().to_string();
        Container::new(self, name, id)
    }

    /// `docker run -d --name NAME OPTIONS... IMAGE ARGS...`: a container
    /// with the networks, ports and settings `options` give (the default
    /// bridge when they name no network); removed when the guard drops.
    pub fn run_with(&self, name: &str, options: &[&str], image: &str, args: &[&str]) -> Container {
        let mut argv = vec!["run", "-d", "--name", name];
        argv.extend_from_slice(options);
        argv.push(image);
        argv.extend_from_slice(args);
        let id = self.docker_ok(&argv).trim().to_string();
        Container::new(self, name, id)
    }

    /// Writes `text` as this node's CRIU configuration (see `tests/bed/bed`:
    /// the node's CRIU reads `DIR/criu.conf` while it exists, as runc's
    /// CRIU reads /etc/criu/runc.conf on a device); removed when the guard
    /// drops.
    pub fn criu_conf(&self, text: &str) -> RemoveOnDrop {
        let path = self.dir.join("criu.conf");
        fs::write(&path, text)
            .unwrap_or_else(|e| panic!("{}: cannot write {}: {e}", self.name, path.display()));
        RemoveOnDrop(path)
    }

    /// Starts a container with more `docker run` options (`opts`, before
    /// the image) and returns a guard that removes it when dropped.
    pub fn run_opts(&self, name: &str, image: &str, opts: &[&str], args: &[&str]) -> Container {
        self.try_run_opts(name, image, opts, args)
            .unwrap_or_else(|e| panic!("{}: docker run {opts:?} {image}: {e}", self.name))
    }

    /// Same, but a container the daemon refuses to start is the daemon's
    /// message instead of a panic.
    pub fn try_run_opts(
        &self,
        name: &str,
        image: &str,
        opts: &[&str],
        args: &[&str],
    ) -> Result<Container, String> {
        let mut argv = vec!["run", "-d", "--network", "none", "--name", name];
        argv.extend_from_slice(opts);
        argv.push(image);
        argv.extend_from_slice(args);
        let out = self.docker(&argv);
        if !out.status.success() {
            // A container created but not started is removed as well.
            let _ = self.remove(name);
            return Err(out.stderr.trim().to_string());
        }
        Ok(Container::new(self, name, out.stdout.trim().to_string()))
    }

    /// Creates a container without starting it (`--network none`, always).
    pub fn create(&self, name: &str, image: &str, args: &[&str]) -> Container {
        let mut argv = vec!["create", "--network", "none", "--name", name, image];
        argv.extend_from_slice(args);
        let id = self.docker_ok(&argv).trim().to_string();
        Container::new(self, name, id)
    }

    /// The container's stdout so far.
    pub fn logs(&self, id: &str) -> String {
        self.docker_ok(&["logs", id])
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.docker_ok(&["inspect", "--format", "{{.State.Running}}", id])
            .trim()
            == "true"
    }

    /// Checkpoints the container through the Engine API; CRIU stops it.
    pub fn checkpoint(&self, id: &str, checkpoint: &str) {
        self.docker_ok(&["checkpoint", "create", id, checkpoint]);
    }

    /// Where this daemon keeps (and looks for) a container's checkpoint.
    pub fn checkpoint_dir(&self, id: &str, checkpoint: &str) -> PathBuf {
        self.data_root
            .join("containers")
            .join(id)
            .join("checkpoints")
            .join(checkpoint)
    }

    /// Starts a created container from a checkpoint that lies in
    /// [`Node::checkpoint_dir`] (a custom checkpoint dir is refused by this
    /// Engine version; see FACTS.md).
    pub fn start_from_checkpoint(&self, id: &str, checkpoint: &str) {
        self.docker_ok(&["start", "--checkpoint", checkpoint, id]);
    }
}

/// A container on a node, removed (`docker rm -f`) when dropped, also when
/// the test fails.
pub struct Container {
    pub node: Node,
    pub name: String,
    /// The full id.
    pub id: String,
}

impl Container {
    fn new(node: &Node, name: &str, id: String) -> Container {
        assert!(
            id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}: docker printed {id:?} where a container id was expected",
            node.name
        );
        Container {
            node: node.clone(),
            name: name.to_string(),
            id,
        }
    }

    pub fn logs(&self) -> String {
        self.node.logs(&self.id)
    }

    /// Waits until this counter has printed a few values.
    pub fn wait_counting(&self, timeout: Duration) {
        wait_for("counter printing", timeout, || {
            let v = parse_counter(&self.logs())?;
            (v.len() >= 5)
                .then_some(())
                .ok_or(format!("{} values", v.len()))
        });
    }

    pub fn is_running(&self) -> bool {
        self.node.is_running(&self.id)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.node.remove(&self.id) {
            eprintln!("{e} ({})", self.name);
        }
    }
}

/// A file removed when dropped.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A TCP port nothing listens on at any of `addrs` right now: for a port a
/// container publishes on one node and, after a migration, on another.
pub fn free_port(addrs: &[Ipv4Addr]) -> u16 {
    for _ in 0..100 {
        let Some(first) = addrs.first() else {
            panic!("free_port needs an address");
        };
        let probe = std::net::TcpListener::bind((*first, 0)).expect("bind a probe port");
        let port = probe.local_addr().expect("probe address").port();
        if addrs[1..]
            .iter()
            .all(|a| std::net::TcpListener::bind((*a, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {addrs:?}");
}

/// Names of the containers a test created, or had an agent create for it:
/// removed from every node when dropped, also when the test fails (a
/// migrated container keeps its name on the target). A container that
/// cannot be removed fails the test, or is reported when it already failed.
pub struct Containers {
    nodes: Vec<Node>,
    names: Mutex<Vec<String>>,
}

impl Containers {
    pub fn new(nodes: &[Node]) -> Containers {
        Containers {
            nodes: nodes.to_vec(),
            names: Mutex::new(Vec::new()),
        }
    }

    /// Removes `name` from every node when `self` is dropped.
    pub fn track(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let names = std::mem::take(self.names.get_mut().unwrap_or_else(|p| p.into_inner()));
        let left: Vec<String> = names
            .iter()
            .flat_map(|name| self.nodes.iter().map(move |node| node.remove(name)))
            .filter_map(Result::err)
            .collect();
        if left.is_empty() {
            return;
        }
        let text = format!("containers left behind:\n{}", left.join("\n"));
        if thread::panicking() {
            eprintln!("{text}");
        } else {
            panic!("{text}");
        }
    }
}

/// Polls `check` every 100 ms until it returns `Ok`, or fails the test after
/// `timeout` with `what` and the last reason `check` gave.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if start.elapsed() >= timeout => {
                panic!(
                    "timed out after {:.1} s waiting for {what}: {why}",
                    start.elapsed().as_secs_f64()
                )
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// A container name no other test (or earlier run on the same bed) uses.
pub fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "ferry-test-{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Copies a directory tree of plain files (a CRIU image folder), keeping
/// permission bits.
pub fn copy_dir(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &to)?;
        } else {
            return Err(io::Error::other(format!(
                "{}: neither a file nor a directory",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

/// The values a `counter` printed, in order; the test fails on anything else.
pub fn counter_values(logs: &str) -> Vec<u64> {
    parse_counter(logs).unwrap_or_else(|e| panic!("{e}"))
}

/// The values a `counter` printed, in order.
pub fn parse_counter(logs: &str) -> Result<Vec<u64>, String> {
    logs.lines()
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| format!("counter printed {l:?}, not a number"))
        })
        .collect()
}

/// Checks that a counter resumed rather than restarted: the source printed
/// 0, 1, ... without a gap; the target's first value is the source's last
/// plus one; and the target went on by exactly one per line for at least
/// `min_after` lines.
pub fn check_counter_resumed(
    before: &[u64],
    after: &[u64],
    min_after: usize,
) -> Result<(), String> {
    let last = *before
        .last()
        .ok_or("the source counter printed nothing before the checkpoint")?;
    if before.iter().enumerate().any(|(i, &v)| v != i as u64) {
        return Err(format!(
            "the source counter did not count 0, 1, 2, ...: {before:?}"
        ));
    }
    if after.len() < min_after {
        return Err(format!(
            "the restored counter printed {} value(s), need at least {min_after}: {after:?}",
            after.len()
        ));
    }
    if after[0] != last + 1 {
        return Err(format!(
            "the restored counter began at {}, expected {} (the source's last value {last} + 1); \
             0 means it restarted, {last} that it repeated a value; after: {after:?}",
            after[0],
            last + 1
        ));
    }
    if let Some(w) = after.windows(2).find(|w| w[1] != w[0] + 1) {
        return Err(format!(
            "the restored counter went from {} to {}, expected {}: {after:?}",
            w[0],
            w[1],
            w[0] + 1
        ));
    }
    Ok(())
}

/// What a `memhog` printed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MemhogLog {
    /// `ready SIZE_MIB checksum HEX`
    pub ready: Option<(u64, String)>,
    /// `tick N checksum HEX`, in order.
    pub ticks: Vec<(u64, String)>,
    /// `memhog SIZE PERCENT`: the rewrite count of each tick line (`tick N
    /// rewrites R checksum HEX`), in order.
    pub rewrites: Vec<u64>,
    /// `mismatch at page P`
    pub mismatch: Option<u64>,
}

/// Waits until `memhog` has filled its memory; returns the checksum it printed.
pub fn memhog_ready(memhog: &Container) -> String {
    wait_for(
        &format!("{} ready on {}", memhog.name, memhog.node.name),
        Duration::from_secs(60),
        || {
            let log = parse_memhog(&memhog.logs())?;
            log.ready.map(|(_, sum)| sum).ok_or("not ready".to_string())
        },
    )
}

pub fn parse_memhog(logs: &str) -> Result<MemhogLog, String> {
    let mut log = MemhogLog::default();
    for line in logs.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("memhog printed {line:?}"))
        };
        match words.as_slice() {
            ["ready", mib, "checksum", sum] => log.ready = Some((num(mib)?, sum.to_string())),
            ["tick", n, "checksum", sum] => log.ticks.push((num(n)?, sum.to_string())),
            ["tick", n, "rewrites", r, "checksum", sum] => {
                log.ticks.push((num(n)?, sum.to_string()));
                log.rewrites.push(num(r)?);
            }
            ["mismatch", "at", "page", p] => log.mismatch = Some(num(p)?),
            _ => return Err(format!("memhog printed {line:?}")),
        }
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "\
# ferry test bed
FERRY_BED_STATE=/tmp/ferry-bed
FERRY_BED_MQTT=mqtt://127.0.0.1:23456
FERRY_BED_DOCKER=/usr/bin/docker
FERRY_BED_NODE_COUNT=2
FERRY_BED_NODES=node1,node2
FERRY_NODE1_NAME=node1
FERRY_NODE1_DOCKER=unix:///tmp/ferry-bed/node1/docker.sock
FERRY_NODE1_DATA_ROOT=/tmp/ferry-bed/node1/data
FERRY_NODE1_EXEC_ROOT=/tmp/ferry-bed/node1/exec
FERRY_NODE1_ADDR=127.0.0.11
FERRY_NODE1_DIR=/tmp/ferry-bed/node1

FERRY_NODE2_NAME=node2
FERRY_NODE2_DOCKER=unix:///tmp/ferry-bed/node2/docker.sock
FERRY_NODE2_DATA_ROOT=\"/tmp/ferry-bed/node2/data\"
FERRY_NODE2_EXEC_ROOT=/tmp/ferry-bed/node2/exec
FERRY_NODE2_ADDR=127.0.0.12
FERRY_NODE2_DIR=/tmp/ferry-bed/node2
";

    #[test]
    fn env_file_describes_the_nodes() {
        let bed = Bed::from_env_text(ENV).unwrap();
        assert_eq!(bed.mqtt, "mqtt://127.0.0.1:23456");
        assert_eq!(bed.nodes.len(), 2);
        let n2 = bed.node(2);
        assert_eq!(n2.name, "node2");
        assert_eq!(n2.addr, Ipv4Addr::new(127, 0, 0, 12));
        assert_eq!(n2.data_root, PathBuf::from("/tmp/ferry-bed/node2/data"));
        assert_eq!(
            n2.checkpoint_dir("abc", "cp1"),
            PathBuf::from("/tmp/ferry-bed/node2/data/containers/abc/checkpoints/cp1")
        );
    }

    #[test]
    fn env_file_errors_name_the_problem() {
        let missing = ENV.replace("FERRY_NODE2_ADDR=127.0.0.12\n", "");
        assert_eq!(
            Bed::from_env_text(&missing).unwrap_err(),
            EnvError::MissingKey {
                key: "FERRY_NODE2_ADDR".into()
            }
        );
        let tcp = ENV.replace("unix:///tmp/ferry-bed/node1", "tcp://127.0.0.1:2375/x");
        assert!(
            matches!(Bed::from_env_text(&tcp), Err(EnvError::BadValue { key, .. }) if key == "FERRY_NODE1_DOCKER")
        );
        assert_eq!(
            parse_env("A=1\nexport B=2\n").unwrap_err(),
            EnvError::BadLine {
                line: 2,
                text: "export B=2".into()
            }
        );
    }

    #[test]
    fn a_missing_env_file_says_how_to_bring_the_bed_up() {
        let err = Bed::from_file(Path::new("/nonexistent/ferry/bed.env")).unwrap_err();
        assert!(err.to_string().starts_with(NOT_UP), "{err}");
    }

    #[test]
    fn a_resumed_counter_passes() {
        assert_eq!(
            check_counter_resumed(&[0, 1, 2, 3, 4, 5], &[6, 7, 8, 9, 10], 5),
            Ok(())
        );
    }

    #[test]
    fn a_restarted_counter_fails() {
        let err = check_counter_resumed(&[0, 1, 2, 3, 4, 5], &[0, 1, 2, 3, 4], 5).unwrap_err();
        assert!(err.contains("began at 0, expected 6"), "{err}");
    }

    #[test]
    fn a_repeated_value_fails() {
        let err = check_counter_resumed(&[0, 1, 2, 3, 4, 5], &[5, 6, 7, 8, 9], 5).unwrap_err();
        assert!(err.contains("began at 5, expected 6"), "{err}");
        let err = check_counter_resumed(&[0, 1, 2, 3, 4, 5], &[6, 7, 7, 8, 9], 5).unwrap_err();
        assert!(err.contains("went from 7 to 7"), "{err}");
    }

    #[test]
    fn a_skipped_value_or_a_short_run_fails() {
        assert!(check_counter_resumed(&[0, 1, 2], &[4, 5, 6, 7, 8], 5).is_err());
        assert!(check_counter_resumed(&[0, 1, 2], &[3, 4, 6, 7, 8], 5).is_err());
        assert!(check_counter_resumed(&[0, 1, 2], &[3, 4, 5], 5).is_err());
        assert!(check_counter_resumed(&[], &[0, 1, 2, 3, 4], 5).is_err());
    }

    #[test]
    fn counter_and_memhog_output_parse() {
        assert_eq!(parse_counter("0\n1\n2\n"), Ok(vec![0, 1, 2]));
        assert!(parse_counter("0\nx\n").is_err());
        let log =
            parse_memhog("ready 64 checksum d0b3\ntick 1 checksum d0b3\nmismatch at page 9\n")
                .unwrap();
        assert_eq!(log.ready, Some((64, "d0b3".into())));
        assert_eq!(log.ticks, vec![(1, "d0b3".into())]);
        assert_eq!(log.mismatch, Some(9));
    }
}
