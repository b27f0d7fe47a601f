//! The two brokers a [`Fleet`](crate::fleet::Fleet) can meet on.
//!
//! [`DevBroker`] is the bed's plain listener (`tests/bed/bed up`), shared by
//! every test: each fleet gets a topic root of its own, so retained messages
//! of other tests never mix in, and its agents run with `--insecure` (their
//! data ports still use mutual TLS).
//!
//! [`TlsBroker`] is a mosquitto of the fleet's own, started from
//! `broker-config/mosquitto.conf` and `broker-config/acl` (only paths, the
//! port and the log destination rewritten; every other line as shipped),
//! with a second "rogue" PKI of the same names under another CA, so that
//! tests can connect as any identity ([`Who`]). Agents reach it on
//! `mqtts://` with their node certificates and the agent's default topic
//! root, which the production ACL grants. It is stopped (by its pid) when
//! dropped.
//!
//! [`AedesBroker`] is the second MQTT implementation the contract is tested
//! on: aedes (npm, `tests/bed/aedes/server.js`, installed by `bed install`)
//! of the fleet's own, plain TCP on a free loopback port, so its tests run
//! on any bed, whichever broker the bed itself started.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::fleet::{ferry_certs, stop_child};
use crate::{run_with_timeout, Bed};

/// How a fleet's agents and the test's mosquitto clients reach a broker.
pub trait Broker: Sized {
    /// Brings the broker up for a fleet whose folder is `dir` and whose
    /// `ferry certs` PKI is in `certs`.
    fn start(bed: &Bed, dir: &Path, certs: &Path) -> Self;
    /// The URL agents connect to.
    fn url(&self) -> String;
    /// The topic root of the fleet.
    fn root(&self) -> &str;
    /// What `ferry agent` needs beyond `--mqtt` and its node's TLS files.
    fn agent_args(&self) -> Vec<String>;
    /// `mosquitto_pub` or `mosquitto_sub` (`tool`) connected as the fleet
    /// manager, its stdout line-buffered.
    fn client(&self, tool: &str) -> Command;
}

/// Line-buffered: `mosquitto_sub -d` prints the SUBACK into a pipe, where
/// it would otherwise wait until a message arrives.
pub fn line_buffered(tool: &str, host: &str, port: &str) -> Command {
    let mut c = Command::new("stdbuf");
    c.args(["-oL", tool, "-h", host, "-p", port]);
    c
}

/// What `ferry agent` needs for a plain (no TLS) broker: the topic root
/// and `--insecure`.
pub fn plain_agent_args(root: &str) -> Vec<String> {
    vec!["--topic-root".into(), root.into(), "--insecure".into()]
}

/// The bed's plain dev listener.
pub struct DevBroker {
    url: String,
    host: String,
    port: String,
    root: String,
}

impl Broker for DevBroker {
    fn start(bed: &Bed, dir: &Path, _certs: &Path) -> DevBroker {
        let hostport = bed
            .mqtt
            .strip_prefix("mqtt://")
            .expect("the bed's broker is mqtt://");
        let (host, port) = hostport.rsplit_once(':').expect("broker host:port");
        let name = dir.file_name().expect("fleet dir name").to_string_lossy();
        DevBroker {
            url: bed.mqtt.clone(),
            host: host.to_string(),
            port: port.to_string(),
            root: format!("{name}/v1"),
        }
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn root(&self) -> &str {
        &self.root
    }

    fn agent_args(&self) -> Vec<String> {
        plain_agent_args(&self.root)
    }

    fn client(&self, tool: &str) -> Command {
        line_buffered(tool, &self.host, &self.port)
    }
}

/// The topic root `broker-config/acl` grants, the agent's default.
pub const ROOT: &str = "ferry/v1";
const BROKER_START: Duration = Duration::from_secs(10);

/// Who a mosquitto client connects to the [`TlsBroker`] as.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// The certificate of that name from the fleet CA (`node1`, `manager`).
    Fleet(&'a str),
    /// A certificate of the same name from another CA.
    Rogue(&'a str),
    /// TLS without a client certificate.
    NoCert,
}

/// The production broker configuration, on free loopback ports.
pub struct TlsBroker {
    /// The nodes' listener (fleet CA, client id = certificate CN).
    pub port: u16,
    /// The manager's listener (the manager's CA alone, any client id).
    pub manager_port: u16,
    /// The fleet PKI (`ferry certs` output: ca.pem, broker.*, node1.*, ...).
    pub certs: PathBuf,
    /// Same names, another CA.
    pub rogue: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Broker for TlsBroker {
    fn start(bed: &Bed, dir: &Path, certs: &Path) -> TlsBroker {
        let rogue = dir.join("rogue");
        ferry_certs(&rogue, &bed.nodes);
        let (child, (port, manager_port), log) = start_mosquitto(dir, certs);
        TlsBroker {
            port,
            manager_port,
            certs: certs.to_path_buf(),
            rogue,
            log,
            dir: dir.to_path_buf(),
            child,
        }
    }

    fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    fn root(&self) -> &str {
        ROOT
    }

    fn agent_args(&self) -> Vec<String> {
        Vec::new()
    }

    fn client(&self, tool: &str) -> Command {
        self.client_as(tool, Who::Fleet("manager"))
    }
}

impl TlsBroker {
    /// Where the manager's commands connect: the listener that trusts the
    /// manager's CA.
    pub fn manager_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.manager_port)
    }

    /// `mosquitto_pub` or `mosquitto_sub` connected as `who`, on the
    /// manager's listener for the `manager` name, else on the nodes'.
    pub fn client_as(&self, tool: &str, who: Who) -> Command {
        let port = match who {
            Who::Fleet("manager") | Who::Rogue("manager") => self.manager_port,
            _ => self.port,
        };
        self.client_on(tool, who, port)
    }

    /// `mosquitto_pub` or `mosquitto_sub` connected as `who` to `port`.
    pub fn client_on(&self, tool: &str, who: Who, port: u16) -> Command {
        let mut c = line_buffered(tool, "127.0.0.1", &port.to_string());
        c.arg("--cafile").arg(self.certs.join("ca.pem"));
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the broker and starts it again from the same files (it reads
    /// its CRL only at start), on new ports; agents started before it
    /// still dial the old ones.
    pub fn restart(&mut self) {
        stop_child(&mut self.child, "mosquitto");
        let (child, (port, manager_port), log) = start_mosquitto(&self.dir, &self.certs);
        (self.child, self.port, self.manager_port, self.log) = (child, port, manager_port, log);
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        stop_child(&mut self.child, "mosquitto");
        if thread::panicking() {
            eprintln!("---- broker log ----\n{}", self.log_text());
        }
    }
}

/// Directives of the production file that name local paths, the ports or
/// the log destination, and what they become here, in the order the file
/// has them (the nodes' listener, then the manager's). Every one of them
/// must be in the production file as often as it is here (so the test
/// notices when it changes); `None` drops the line.
fn overrides(
    dir: &Path,
    certs: &Path,
    (port, manager_port): (u16, u16),
) -> Vec<(&'static str, Option<String>)> {
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
        ("crlfile", p(certs.join("crl.pem"))),
        ("listener", Some(format!("{manager_port} 127.0.0.1"))),
        ("cafile", p(certs.join("manager-ca.pem"))),
        ("certfile", p(certs.join("broker.pem"))),
        ("keyfile", p(certs.join("broker.key"))),
        ("log_dest", Some("stderr".into())),
    ]
}

/// The production configuration with [`overrides`] applied: the n-th line
/// of a directive takes its n-th override.
pub fn render_config(text: &str, overrides: &[(&str, Option<String>)]) -> String {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        let n = seen.get(key).copied().unwrap_or(0);
        match overrides.iter().filter(|(k, _)| *k == key).nth(n) {
            Some((k, value)) => {
                *seen.entry(k).or_default() += 1;
                if let Some(v) = value {
                    out.push_str(&format!("{k} {v}\n"));
                }
            }
            None => {
                if overrides.iter().any(|(k, _)| *k == key) {
                    *seen.entry(key).or_default() += 1;
                }
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (k, _) in overrides {
        let want = overrides.iter().filter(|(o, _)| o == k).count();
        assert_eq!(
            seen.get(k).copied().unwrap_or(0),
            want,
            "broker-config/mosquitto.conf should set {k} {want} time(s)"
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
fn start_mosquitto(fleet_dir: &Path, certs: &Path) -> (Child, (u16, u16), PathBuf) {
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
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("find a free port")
                .port()
        };
        let ports = (free(), free());
        let port = ports.0;
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, render_config(&conf, &overrides(&dir, certs, ports)))
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
            if text.contains(" running")
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
                && TcpStream::connect(("127.0.0.1", ports.1)).is_ok()
            {
                return (child, ports, log);
            }
            thread::sleep(Duration::from_millis(50));
        }
        stop_child(&mut child, "mosquitto");
        last = std::fs::read_to_string(&log).unwrap_or_default();
    }
    panic!("mosquitto did not start from the production config:\n{last}");
}

/// aedes of the fleet's own: `node tests/bed/aedes/server.js` on a free
/// loopback port, plain TCP, anonymous, sessions and retained messages in
/// memory. Agents use the default topic root and `--insecure` (plain MQTT;
/// their data ports still use mutual TLS). Stopped by its pid when dropped.
pub struct AedesBroker {
    pub port: u16,
    /// Its connect and disconnect lines, one per client id.
    pub log: PathBuf,
    child: Child,
}

impl Broker for AedesBroker {
    fn start(_bed: &Bed, dir: &Path, _certs: &Path) -> AedesBroker {
        let log = dir.join("aedes.log");
        let (child, port) = start_aedes(&log);
        AedesBroker { port, log, child }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn root(&self) -> &str {
        ROOT
    }

    fn agent_args(&self) -> Vec<String> {
        vec!["--insecure".into()]
    }

    fn client(&self, tool: &str) -> Command {
        line_buffered(tool, "127.0.0.1", &self.port.to_string())
    }
}

impl AedesBroker {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AedesBroker {
    fn drop(&mut self) {
        stop_child(&mut self.child, "aedes");
        if thread::panicking() {
            eprintln!("---- aedes log ----\n{}", self.log_text());
        }
    }
}

/// Starts `tests/bed/aedes/server.js` on 127.0.0.1, port 0, and reads the
/// port it took from its `listening HOST:PORT` line; waits for `ready`.
fn start_aedes(log: &Path) -> (Child, u16) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bed/aedes");
    assert!(
        dir.join("node_modules/aedes/package.json").exists(),
        "aedes is not installed in {}: run tests/bed/bed install (npm ci there)",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg(dir.join("server.js"))
        .arg("--log")
        .arg(log)
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node (Node.js >= 20; tests/bed/bed install checks it)");
    let stdout = child.stdout.take().expect("aedes stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut port = None;
    while let Some(left) = BROKER_START.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(line) if line == "ready" => {
                if let Some(p) = port {
                    return (child, p);
                }
                break;
            }
            Ok(line) => {
                port = port.or_else(|| {
                    line.strip_prefix("listening 127.0.0.1:")
                        .and_then(|p| p.parse().ok())
                });
            }
            Err(_) => break,
        }
    }
    stop_child(&mut child, "aedes");
    panic!(
        "aedes did not start within {BROKER_START:?}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
