//! The production broker configuration on the bed, and a hostile peer.
//!
//! [`SecureFleet`] starts a mosquitto of its own from
//! `broker-config/mosquitto.conf` and `broker-config/acl` (only paths, the
//! port and the log destination rewritten; every other line as shipped), a
//! fleet PKI from `ferry certs`, a second "rogue" PKI with the same names
//! under another CA, and agents on `mqtts://` with their node certificates
//! and no `--insecure`. Mosquitto's clients act as a chosen identity.
//! Everything lives under one folder of the bed's state dir and the broker
//! is stopped (by its pid) when the fleet is dropped.
//!
//! [`hostile`] speaks the data-port protocol by hand, to feed a real agent
//! archives and streams that ferry's own sender would never produce, and
//! [`FlipRelay`] corrupts one byte of a live connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::fleet::ferry_bin;
use crate::{run_with_timeout, unique_name, wait_for, Bed, CmdOutput, Node};

/// The topic root `broker-config/acl` grants.
pub const ROOT: &str = "ferry/v1";
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const BROKER_START: Duration = Duration::from_secs(10);

/// Who a mosquitto client connects as.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// The certificate of that name from the fleet CA (`node1`, `manager`).
    Fleet(&'a str),
    /// A certificate of the same name from another CA.
    Rogue(&'a str),
    /// TLS without a client certificate.
    NoCert,
}

pub struct SecureFleet {
    pub bed: Bed,
    pub dir: PathBuf,
    /// `ferry certs` output: ca.pem, broker.*, node1.*, node2.*, manager.*.
    pub certs: PathBuf,
    /// Same names, another CA.
    pub rogue: PathBuf,
    pub port: u16,
    pub broker_log: PathBuf,
    broker: Child,
}

impl SecureFleet {
    pub fn new(bed: Bed) -> SecureFleet {
        let dir = bed.state.join(unique_name("secure"));
        std::fs::create_dir_all(&dir).expect("create the secure fleet dir");
        let nodes: Vec<&str> = bed.nodes.iter().map(|n| n.name.as_str()).collect();
        let certs = dir.join("certs");
        let rogue = dir.join("rogue");
        for out in [&certs, &rogue] {
            let res = run_with_timeout(
                Command::new(ferry_bin())
                    .args(["certs", "--out"])
                    .arg(out)
                    .args(["--nodes", &nodes.join(",")]),
                Duration::from_secs(30),
            )
            .expect("run ferry certs");
            assert!(res.status.success(), "ferry certs failed: {}", res.stderr);
        }
        let (broker, port, broker_log) = start_broker(&dir, &certs);
        SecureFleet {
            bed,
            dir,
            certs,
            rogue,
            port,
            broker_log,
            broker,
        }
    }

    pub fn node(&self, n: usize) -> &Node {
        self.bed.node(n)
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// (ca, cert, key) of `name` in the fleet PKI.
    pub fn tls_files(&self, name: &str) -> ferry_agent::stream::TlsFiles {
        ferry_agent::stream::TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{name}.pem")),
            key: self.certs.join(format!("{name}.key")),
        }
    }

    pub fn broker_log_text(&self) -> String {
        std::fs::read_to_string(&self.broker_log).unwrap_or_default()
    }

    /// `ferry agent` for node `n` on the TLS broker, data port on an
    /// ephemeral port of the node's address.
    pub fn start_agent(&self, n: usize) -> SecureAgent {
        self.start_agent_with(n, None, None)
    }

    /// Same, with an explicit listen and advertised data address.
    pub fn start_agent_with(
        &self,
        n: usize,
        listen: Option<SocketAddr>,
        advertise: Option<SocketAddr>,
    ) -> SecureAgent {
        let node = self.node(n).clone();
        let work = self.dir.join(format!("{}-work", node.name));
        let log = self.dir.join(format!("{}-agent.log", node.name));
        let files = self.tls_files(&node.name);
        let listen = listen.unwrap_or_else(|| SocketAddr::new(node.addr.into(), 0));
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("agent")
            .args(["--node-id", &node.name, "--mqtt", &self.mqtt_url()])
            .args(["--docker", &node.docker_host])
            .args(["--listen", &listen.to_string()])
            .arg("--work-dir")
            .arg(&work)
            .arg("--tls-ca")
            .arg(&files.ca)
            .arg("--tls-cert")
            .arg(&files.cert)
            .arg("--tls-key")
            .arg(&files.key);
        if let Some(a) = advertise {
            cmd.args(["--advertise", &a.to_string()]);
        }
        let child = cmd
            .env("FERRY_LOG", "info,ferry_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log file"))
            .spawn()
            .expect("start ferry agent");
        let mut agent = SecureAgent {
            node: node.name.clone(),
            child,
            log,
            work,
        };
        let topic = format!("{ROOT}/{}/status", node.name);
        crate::fleet::wait_agent_online(
            &format!("agent {} online on the TLS broker", node.name),
            &mut agent.child,
            &agent.log,
            || self.retained(&topic),
        );
        agent
    }

    fn client(&self, tool: &str, who: Who) -> Command {
        // Line-buffered: mosquitto_sub's debug lines (the SUBACK) otherwise
        // sit in a pipe buffer until a message arrives.
        let mut c = Command::new("stdbuf");
        c.args(["-oL", tool, "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--cafile")
            .arg(self.certs.join("ca.pem"));
        let identity = match who {
            Who::Fleet(name) => Some((&self.certs, name)),
            Who::Rogue(name) => Some((&self.rogue, name)),
            Who::NoCert => None,
        };
        if let Some((dir, name)) = identity {
            c.arg("--cert")
                .arg(dir.join(format!("{name}.pem")))
                .arg("--key")
                .arg(dir.join(format!("{name}.key")));
        }
        c
    }

    /// `mosquitto_pub -q 1` as `who`; the caller judges the outcome (MQTT
    /// 3.1.1 gives a publisher no sign of an ACL denial).
    pub fn publish_as(&self, who: Who, topic: &str, payload: &str, retain: bool) -> CmdOutput {
        let mut cmd = self.client("mosquitto_pub", who);
        cmd.args(["-q", "1", "-t", topic, "-m", payload]);
        if retain {
            cmd.arg("-r");
        }
        run_with_timeout(&mut cmd, Duration::from_secs(10)).expect("run mosquitto_pub")
    }

    /// `mosquitto_pub -q 1 -f FILE` as `who`: for payloads too large for
    /// a command line.
    pub fn publish_file_as(&self, who: Who, topic: &str, file: &Path) -> CmdOutput {
        let mut cmd = self.client("mosquitto_pub", who);
        cmd.args(["-q", "1", "-t", topic, "-f"]).arg(file);
        run_with_timeout(&mut cmd, Duration::from_secs(10)).expect("run mosquitto_pub")
    }

    /// Publishes as the fleet manager, which must succeed.
    pub fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let out = self.publish_as(Who::Fleet("manager"), topic, payload, retain);
        assert!(
            out.status.success(),
            "mosquitto_pub {topic}: {}",
            out.stderr
        );
    }

    pub fn send_job(&self, node: &str, job_id: &str, job: &serde_json::Value) {
        self.publish(
            &format!("{ROOT}/{node}/jobs/{job_id}"),
            &job.to_string(),
            false,
        );
    }

    /// The retained message on `topic` as the manager sees it.
    pub fn retained(&self, topic: &str) -> Option<serde_json::Value> {
        crate::fleet::retained_with(self.client("mosquitto_sub", Who::Fleet("manager")), topic)
    }

    pub fn final_status(&self, node: &str, job_id: &str, timeout: Duration) -> serde_json::Value {
        let topic = format!("{ROOT}/{node}/jobs/{job_id}/status");
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

    /// A subscriber as `who`; returns once the broker acknowledged the
    /// subscription (or the connection failed: see [`Subscriber::failed`]).
    pub fn subscribe_as(&self, who: Who, filter: &str) -> Subscriber {
        let mut child = self
            .client("mosquitto_sub", who)
            .args(["-d", "-v", "-q", "1", "-t", filter])
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
            &format!("mosquitto_sub {filter} subscribed or refused"),
            Duration::from_secs(10),
            || {
                if sub.state.lock().unwrap().subscribed || !sub.is_running() {
                    Ok(())
                } else {
                    Err("no SUBACK yet".to_string())
                }
            },
        );
        sub
    }
}

impl Drop for SecureFleet {
    fn drop(&mut self) {
        stop_child(&mut self.broker, "mosquitto");
        if thread::panicking() {
            eprintln!("---- broker log ----\n{}", self.broker_log_text());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGTERM by pid, then SIGKILL if it does not exit in time.
fn stop_child(child: &mut Child, what: &str) -> Option<i32> {
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

/// Directives of the production file that name local paths, the port or
/// the log destination, and what they become here. Every one of them must
/// be in the production file (so the test notices when it changes); `None`
/// drops the line.
fn overrides(dir: &Path, certs: &Path, port: u16) -> Vec<(&'static str, Option<String>)> {
    let p = |path: PathBuf| Some(path.display().to_string());
    vec![
        ("pid_file", None),
        ("acl_file", p(dir.join("acl"))),
        (
            "persistence_location",
            Some(format!("{}/", dir.join("db").display())),
        ),
        ("listener", Some(format!("{port} 127.0.0.1"))),
        ("cafile", p(certs.join("ca.pem"))),
        ("certfile", p(certs.join("broker.pem"))),
        ("keyfile", p(certs.join("broker.key"))),
        ("log_dest", Some("stderr".into())),
    ]
}

/// The production configuration with [`overrides`] applied.
pub fn render_config(text: &str, overrides: &[(&str, Option<String>)]) -> String {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        match overrides.iter().find(|(k, _)| *k == key) {
            Some((k, value)) => {
                *seen.entry(k).or_default() += 1;
                if let Some(v) = value {
                    out.push_str(&format!("{k} {v}\n"));
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, _) in overrides {
        assert_eq!(
            seen.get(k).copied().unwrap_or(0),
            1,
            "broker-config/mosquitto.conf should set {k} exactly once"
        );
    }
    out
}

fn chown_to_mosquitto(path: &Path) {
    let out = run_with_timeout(
        Command::new("chown").arg("mosquitto:").arg(path),
        Duration::from_secs(10),
    )
    .expect("run chown");
    assert!(
        out.status.success(),
        "chown mosquitto: {}: {} (the bed installs mosquitto, which creates that user)",
        path.display(),
        out.stderr
    );
}

/// Starts mosquitto from the production files on a free loopback port.
/// As in production, the broker key and its state folder belong to the
/// `mosquitto` user the broker drops to.
fn start_broker(fleet_dir: &Path, certs: &Path) -> (Child, u16, PathBuf) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let conf = std::fs::read_to_string(repo.join("broker-config/mosquitto.conf"))
        .expect("read broker-config/mosquitto.conf");
    let dir = fleet_dir.join("broker");
    std::fs::create_dir_all(dir.join("db")).expect("create the broker dir");
    std::fs::copy(repo.join("broker-config/acl"), dir.join("acl")).expect("copy broker-config/acl");
    chown_to_mosquitto(&dir.join("db"));
    chown_to_mosquitto(&certs.join("broker.key"));
    let log = dir.join("mosquitto.log");
    let mut last = String::new();
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, render_config(&conf, &overrides(&dir, certs, port)))
            .expect("write the broker config");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("broker log");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start mosquitto (the bed installs it: tests/bed/bed install)");
        let start = Instant::now();
        while start.elapsed() < BROKER_START {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(" running") && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port, log);
            }
            thread::sleep(Duration::from_millis(50));
        }
        stop_child(&mut child, "mosquitto");
        last = std::fs::read_to_string(&log).unwrap_or_default();
    }
    panic!("mosquitto did not start from the production config:\n{last}");
}

/// A running `ferry agent` on the TLS broker; SIGTERM on drop.
pub struct SecureAgent {
    pub node: String,
    child: Child,
    pub log: PathBuf,
    pub work: PathBuf,
}

impl SecureAgent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (the designed drain), then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        stop_child(&mut self.child, &format!("agent {}", self.node))
    }
}

impl Drop for SecureAgent {
    fn drop(&mut self) {
        stop_child(&mut self.child, &format!("agent {}", self.node));
        if thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.node, self.log_text());
        }
    }
}

#[derive(Default)]
struct SubState {
    subscribed: bool,
    messages: Vec<(String, String)>,
    debug: Vec<String>,
    stderr: String,
}

/// A background `mosquitto_sub -d -v` as some identity.
pub struct Subscriber {
    child: Child,
    state: Arc<Mutex<SubState>>,
}

impl Subscriber {
    pub fn messages(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().messages.clone()
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

    pub fn wait_topic(&self, suffix: &str, timeout: Duration) -> serde_json::Value {
        crate::fleet::wait_topic_in(|| self.messages(), suffix, timeout)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every path under `root`, relative, sorted.
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A TCP relay on `listen` to `upstream` that flips one bit of the byte at
/// offset `flip_at` of the first connection's client → server direction.
pub struct FlipRelay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bytes relayed client → server and server → client, first connection.
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    pub flipped: Arc<AtomicBool>,
}

impl FlipRelay {
    pub fn start(listener: TcpListener, upstream: SocketAddr, flip_at: u64) -> FlipRelay {
        let addr = listener.local_addr().expect("relay address");
        listener.set_nonblocking(true).expect("nonblocking relay");
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let flipped = Arc::new(AtomicBool::new(false));
        let relay = FlipRelay {
            addr,
            stop: stop.clone(),
            up: up.clone(),
            down: down.clone(),
            flipped: flipped.clone(),
        };
        thread::spawn(move || {
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => break,
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let flip = first.then_some(flip_at);
                let (u, d) = if first {
                    (up.clone(), down.clone())
                } else {
                    (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)))
                };
                first = false;
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let f = flipped.clone();
                thread::spawn(move || pump(client, server, flip, u, Some(f)));
                thread::spawn(move || pump(s2, c2, None, d, None));
            }
        });
        relay
    }
}

impl Drop for FlipRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    flip_at: Option<u64>,
    count: Arc<AtomicU64>,
    flipped: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pos = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = flip_at {
            if (pos..pos + n as u64).contains(&at) {
                buf[(at - pos) as usize] ^= 0x01;
                if let Some(f) = &flipped {
                    f.store(true, Ordering::Relaxed);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        pos += n as u64;
        count.store(pos, Ordering::Relaxed);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A peer that speaks the data-port protocol by hand.
pub mod hostile {
    use std::time::Duration;

    use ferry_agent::migration::protocol::{self, Prepare, ToSource, ToTarget};
    use ferry_agent::stream::wire::{TransferHeader, Verdict, MAGIC};
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Largest frame the receiver accepts.
    const FRAME: usize = 256 * 1024;
    /// zstd's largest block.
    const BLOCK: usize = 128 * 1024;

    /// A tar header (ustar) for `name`, of `kind` (`b'0'` file, `b'2'`
    /// symlink, ...), claiming `size` bytes; sizes beyond 11 octal digits
    /// use GNU's base-256 form. Names are written as given: `..` included.
    pub fn tar_header(name: &str, kind: u8, link: &str, size: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        if size < 0o77777777777 {
            h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        } else {
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        }
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// A zstd frame written block by block: raw blocks for data, RLE blocks
    /// for runs of zeros (4 bytes per 128 KiB: a 10 GiB bomb is 320 KiB).
    pub struct Zstd {
        pub out: Vec<u8>,
        /// Bytes the frame decompresses to.
        pub raw: u64,
    }

    impl Default for Zstd {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Zstd {
        pub fn new() -> Zstd {
            // Magic; no content size, no checksum, no dictionary; a 128 KiB
            // window (exponent 7).
            let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
            out.reserve(1 << 16);
            Zstd { out, raw: 0 }
        }

        fn block(&mut self, kind: u32, size: usize, last: bool) {
            let h = (size as u32) << 3 | kind << 1 | last as u32;
            self.out.extend_from_slice(&h.to_le_bytes()[..3]);
        }

        pub fn data(&mut self, data: &[u8]) -> &mut Self {
            for chunk in data.chunks(BLOCK) {
                self.block(0, chunk.len(), false);
                self.out.extend_from_slice(chunk);
            }
            self.raw += data.len() as u64;
            self
        }

        pub fn zeros(&mut self, mut n: u64) -> &mut Self {
            self.raw += n;
            while n > 0 {
                let size = n.min(BLOCK as u64) as usize;
                self.block(1, size, false);
                self.out.push(0);
                n -= size as u64;
            }
            self
        }

        pub fn finish(mut self) -> (Vec<u8>, u64) {
            self.block(0, 0, true);
            (self.out, self.raw)
        }
    }

    /// How far a hostile transfer got, and what the target said.
    #[derive(Debug)]
    pub enum Outcome {
        /// The target answered the prepare with something else than `Prepared`.
        NotPrepared(String),
        /// The header was refused.
        HeaderRefused(String),
        /// The final verdict (the target may send it before the body ends).
        Final(Verdict),
        /// The connection failed; the error.
        Broken(String),
    }

    async fn message<W: AsyncWrite + Unpin>(w: &mut W, json: &[u8]) -> std::io::Result<()> {
        w.write_all(&(json.len() as u32).to_be_bytes()).await?;
        w.write_all(json).await
    }

    async fn verdict<R: AsyncRead + Unpin>(r: &mut R) -> Result<Verdict, String> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await.map_err(|e| e.to_string())?;
        let mut json = vec![0u8; u32::from_be_bytes(len).min(1 << 16) as usize];
        r.read_exact(&mut json).await.map_err(|e| e.to_string())?;
        serde_json::from_slice(&json).map_err(|e| e.to_string())
    }

    /// Prepare, then the stream: `body` (a zstd stream) in frames and a
    /// trailer announcing `raw` tar bytes and the body's SHA-256, or
    /// `bad_sum` instead. Reads the final verdict.
    pub async fn transfer<S: AsyncRead + AsyncWrite + Unpin + Send>(
        conn: &mut S,
        prepare: Prepare,
        header: &TransferHeader,
        body: &[u8],
        raw: u64,
        bad_sum: Option<[u8; 32]>,
    ) -> Outcome {
        let step = async {
            protocol::send(conn, &ToTarget::Prepare(Box::new(prepare)))
                .await
                .map_err(|e| Outcome::Broken(e.to_string()))?;
            match protocol::recv::<_, ToSource>(conn).await {
                Ok(ToSource::Prepared { .. }) => {}
                Ok(other) => return Err(Outcome::NotPrepared(format!("{other:?}"))),
                Err(e) => return Err(Outcome::Broken(e.to_string())),
            }
            let json = serde_json::to_vec(header).expect("encode header");
            conn.write_all(MAGIC)
                .await
                .map_err(|e| Outcome::Broken(e.to_string()))?;
            message(conn, &json)
                .await
                .map_err(|e| Outcome::Broken(e.to_string()))?;
            conn.flush()
                .await
                .map_err(|e| Outcome::Broken(e.to_string()))?;
            let v = verdict(conn).await.map_err(Outcome::Broken)?;
            if !v.ok {
                return Err(Outcome::HeaderRefused(v.error.unwrap_or_default()));
            }
            // A target that gave up early stops reading: a failed write
            // then leads to its verdict, which is already on its way.
            let sent = async {
                for frame in body.chunks(FRAME) {
                    message(conn, frame).await?;
                }
                conn.write_all(&0u32.to_be_bytes()).await?;
                let sum: [u8; 32] = bad_sum.unwrap_or_else(|| Sha256::digest(body).into());
                conn.write_all(&sum).await?;
                conn.write_all(&raw.to_be_bytes()).await?;
                conn.flush().await
            }
            .await;
            match tokio::time::timeout(Duration::from_secs(120), verdict(conn)).await {
                Ok(Ok(v)) => Ok(Outcome::Final(v)),
                Ok(Err(e)) => Err(Outcome::Broken(format!("{e} (writing: {sent:?})"))),
                Err(_) => Err(Outcome::Broken("no final verdict in 120 s".into())),
            }
        };
        match step.await {
            Ok(o) | Err(o) => o,
        }
    }
}
