//! What the drivers need of the node they run on ([`Node`]): the engine and
//! its facts, the job registry and the peers' statuses, the timeouts, and
//! two seams: [`Reporter`] (job statuses out; MQTT in the agent, a recorder
//! in unit tests) and [`Dial`] (a data connection to a peer; TCP + mutual
//! TLS in the agent, an in-memory pipe in unit tests).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::check::Facts;
use super::registry::{JobRegistry, Peers};
use super::MigrationError;
use crate::mqtt::contract::{JobStatus, Topics};
use crate::mqtt::MqttHandle;
use crate::runtime::EngineInfo;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A data connection: TLS over TCP, plain TCP with `--insecure`, or an
/// in-memory pipe in tests.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Where job statuses go.
pub trait Reporter: Send + Sync {
    fn job_status<'a>(&'a self, status: &'a JobStatus) -> BoxFuture<'a, ()>;
}

/// Opens the data connection to a target.
pub trait Dial: Send + Sync {
    /// `addr` is what the target advertises in its status.
    fn dial<'a>(
        &'a self,
        target: &'a str,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Conn>, MigrationError>>;
}

/// How long each side waits for the other.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    /// The target prechecks and creates the container before answering.
    pub prepare: Duration,
    /// Docker's restore path copies the images through containerd: allow
    /// for large checkpoints on slow SD cards.
    pub restore: Duration,
    pub commit: Duration,
    /// Source status updates during a transfer, at most this often.
    pub progress_every: Duration,
    /// A peer that connects must say what it wants promptly.
    pub prepare_wait: Duration,
    /// The source answers `Restored` with `Commit` at once.
    pub commit_wait: Duration,
    /// Between `Prepared` and the stream, the longest silence from a source
    /// that checkpoints (it says `Progress` every
    /// [`KEEPALIVE_EVERY`](super::protocol::KEEPALIVE_EVERY)).
    pub source_silence: Duration,
    /// How long a restored container must stay up before it counts as running.
    pub settle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            prepare: Duration::from_secs(120),
            restore: Duration::from_secs(900),
            commit: Duration::from_secs(30),
            progress_every: Duration::from_millis(500),
            prepare_wait: Duration::from_secs(30),
            commit_wait: Duration::from_secs(60),
            source_silence: Duration::from_secs(60),
            settle: Duration::from_millis(500),
        }
    }
}

/// Everything a driver needs about the node it runs on.
pub struct Node<E> {
    pub id: String,
    pub engine: E,
    pub engine_info: EngineInfo,
    pub page_size: u64,
    /// CRIU's version, or why it does not work here.
    pub criu: Result<String, String>,
    pub work_dir: PathBuf,
    /// The data address this node advertises; a port the source published
    /// on its own address is published on this one's IP.
    pub advertise: Option<SocketAddr>,
    pub reporter: Box<dyn Reporter>,
    pub dialer: Box<dyn Dial>,
    pub timeouts: Timeouts,
    pub peers: Peers,
    pub jobs: JobRegistry,
    /// In-flight jobs on persistent storage; `None` in unit tests of the
    /// drivers, which then behave as before the journal (a target removes
    /// its copy when the connection ends before `Commit`).
    pub journal: Option<super::journal::Journal>,
    /// Whether orders must be signed by the manager, and the target's
    /// ledger of the signed incoming jobs it accepted.
    pub orders: crate::order::Orders,
    /// What an incoming container may use on this node.
    pub policy: crate::runtime::admission::HostPolicy,
}

impl<E> Node<E> {
    /// Records `entry` durably (no-op without a journal).
    pub fn journal_write(
        &self,
        entry: &super::journal::Entry,
    ) -> Result<(), super::journal::JournalError> {
        match &self.journal {
            Some(j) => j.write(entry),
            None => Ok(()),
        }
    }

    /// Forgets a final job; a failure only leaves work for the next start.
    pub fn journal_remove(&self, entry: &super::journal::Entry) {
        if let Some(j) = &self.journal {
            if let Err(error) = j.remove(entry.role, &entry.job_id) {
                tracing::warn!(%error, "cannot remove a final job from the journal");
            }
        }
    }

    /// This node's side of the compatibility check.
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            node: &self.id,
            arch: &self.engine_info.arch,
            page_size: self.page_size,
            criu: self.criu.as_ref().map(|_| ()).map_err(String::as_str),
            criu_version: self.criu.as_deref().ok(),
            kernel: Some(self.engine_info.kernel.as_str()).filter(|k| !k.is_empty()),
        }
    }

    /// Why CRIU cannot serve migrations on this node, if it cannot.
    pub fn criu_problem(&self) -> Option<String> {
        super::check::criu_usable(&self.facts())
            .err()
            .map(|e| e.to_string())
    }

    pub async fn publish_job(&self, status: &JobStatus) {
        self.reporter.job_status(status).await
    }
}

/// Job statuses as retained MQTT messages under this node's topics. Never
/// waits for the broker: the latest status of each job goes out when the
/// broker can take it (see `mqtt::board`).
pub struct MqttReporter {
    pub mqtt: MqttHandle,
    pub topics: Topics,
}

impl Reporter for MqttReporter {
    fn job_status<'a>(&'a self, status: &'a JobStatus) -> BoxFuture<'a, ()> {
        let topic = self.topics.job_status(&status.node, &status.job_id);
        let live = !status.state.is_final();
        if let Err(e) = self.mqtt.publish_latest(&topic, status, live) {
            tracing::warn!(%topic, error = %e, "cannot publish job status");
        }
        Box::pin(std::future::ready(()))
    }
}

/// TCP, then mutual TLS unless the agent runs `--insecure` without TLS files.
pub struct TcpDialer {
    /// Replaced on SIGHUP (see [`crate::stream::tls::Current`]).
    pub tls: Option<Arc<crate::stream::tls::Current<rustls::ClientConfig>>>,
    pub connect_timeout: Duration,
}

impl TcpDialer {
    async fn connect(&self, target: &str, addr: &str) -> Result<Box<dyn Conn>, MigrationError> {
        let sock: SocketAddr = addr
            .parse()
            .map_err(|source| MigrationError::BadDataAddress {
                target: target.to_owned(),
                source,
            })?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(sock))
            .await
            .map_err(|_| MigrationError::ConnectTimeout {
                target: target.to_owned(),
                addr: addr.to_owned(),
            })?
            .map_err(|source| MigrationError::Connect {
                target: target.to_owned(),
                addr: addr.to_owned(),
                source,
            })?;
        tcp.set_nodelay(true).ok();
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        // The target must present a certificate for its node id.
        let name = rustls_pki_types::ServerName::try_from(target.to_owned()).map_err(|source| {
            MigrationError::TlsName {
                target: target.to_owned(),
                source,
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(tls.get())
            .connect(name, tcp)
            .await
            .map_err(|source| MigrationError::Handshake {
                target: target.to_owned(),
                addr: addr.to_owned(),
                source,
            })?;
        Ok(Box::new(stream))
    }
}

impl Dial for TcpDialer {
    fn dial<'a>(
        &'a self,
        target: &'a str,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Conn>, MigrationError>> {
        Box::pin(self.connect(target, addr))
    }
}
