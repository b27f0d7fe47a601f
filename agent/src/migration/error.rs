//! What can stop a migration, as the drivers see it: one variant per cause,
//! worded for the job status a fleet manager reads. The pure checks have
//! their own enum ([`CheckError`]); the registry its own
//! ([`RegisterError`]). Text crosses a boundary only where the contract
//! carries text: a job status's `error`, a `Refused`/`Failed` reason on the
//! data connection, a rejected job's `reason`.

use std::path::PathBuf;

use super::check::CheckError;
use super::protocol::ProtocolError;
use super::registry::RegisterError;
use crate::runtime::state::StateError;
use crate::runtime::RuntimeError;
use crate::stream::StreamError;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Nothing is done that the journal does not record first.
    #[error(transparent)]
    Journal(#[from] super::journal::JournalError),
    // --- source: before anything stopped
    #[error("precheck: {0}")]
    Precheck(CheckError),
    /// A target's refusal, or an identity/compatibility failure on the target.
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("target {target} advertises a bad data address: {source}")]
    BadDataAddress {
        target: String,
        source: std::net::AddrParseError,
    },
    #[error("connecting to {target} at {addr} timed out")]
    ConnectTimeout { target: String, addr: String },
    #[error("cannot connect to {target} at {addr}: {source}")]
    Connect {
        target: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("node id {target} is not usable as a TLS name: {source}")]
    TlsName {
        target: String,
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("TLS handshake with {target} at {addr} failed: {source}")]
    Handshake {
        target: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("prepare on {target}: {source}")]
    Prepare {
        target: String,
        source: ProtocolError,
    },
    #[error("target {target} did not answer the prepare in time")]
    PrepareTimeout { target: String },
    #[error("target {target} refused: {reason}")]
    Refused { target: String, reason: String },
    #[error("target {target} answered {answer} to prepare")]
    UnexpectedPrepareAnswer { target: String, answer: String },
    /// The mounts cannot move, or what moves could not be surveyed.
    #[error("precheck: {0}")]
    Survey(Box<StateError>),
    #[error("image for {target}: {source}")]
    ExportImage {
        target: String,
        source: Box<StateError>,
    },
    #[error("image to {target}: {source}")]
    SendImage { target: String, source: StreamError },
    #[error("restart policy: cannot set it to no before the checkpoint: {0}")]
    PausePolicy(Box<StateError>),

    // --- source: the container is (or may be) stopped
    #[error("checkpoint: {0}")]
    Checkpoint(RuntimeError),
    #[error("cannot read the TCP connections of the container: {0}")]
    TcpState(RuntimeError),
    #[error("checkpoint not started: {0}")]
    TcpAtCheckpoint(crate::runtime::sockets::TcpRefusal),
    #[error("transfer: {0}")]
    CheckpointDir(RuntimeError),
    #[error("transfer to {target}: {source}")]
    Transfer { target: String, source: StreamError },
    #[error("pre-copy round {round}: dump of the running container: {source}")]
    PreCopyDump {
        round: usize,
        source: Box<RuntimeError>,
    },
    #[error("pre-copy round {round} to {target}: {source}")]
    PreCopySend {
        round: usize,
        target: String,
        source: StreamError,
    },
    #[error("pre-copy: {0}")]
    PreCopy(#[from] super::precopy::PreCopyError),
    #[error("pre-copy: {0}")]
    PreCopyTask(tokio::task::JoinError),
    #[error("restore: target did not answer in time")]
    RestoreTimeout,
    #[error("restore: {0}")]
    AwaitRestore(ProtocolError),
    #[error("restore on target failed: {reason}")]
    RestoreFailedOnTarget { reason: String },
    #[error("target {target} failed during the {phase}: {reason}")]
    TargetFailedEarly {
        target: String,
        phase: &'static str,
        reason: String,
    },
    #[error("restore: unexpected answer {answer}")]
    UnexpectedRestoreAnswer { answer: String },
    #[error("canceled by request")]
    Canceled,
    #[error("rollback: {0}")]
    RollbackInspect(RuntimeError),
    #[error("checkpoint: packing files and volumes: {0}")]
    PackState(Box<StateError>),
    #[error("rollback: restoring the original on {node} failed: {source}")]
    Rollback {
        node: String,
        source: Box<RuntimeError>,
    },
    #[error("rollback: the original runs again on {node}, but its restart policy could not be put back: {source}")]
    ResumePolicy {
        node: String,
        source: Box<StateError>,
    },

    // --- source: past the point of no return
    #[error(
        "target did not confirm the commit ({0}); the stopped original is kept with its checkpoint"
    )]
    CommitUnconfirmed(Unconfirmed),
    #[error(
        "cleanup: the workload runs on the target, but the original could not be removed: {0}"
    )]
    RemoveOriginal(RuntimeError),
    #[error(
        "cleanup: the workload runs on the target, but the source's volumes could not be removed: {0}"
    )]
    RemoveVolumes(Box<StateError>),

    // --- target
    /// The signed order does not allow what the prepare asks.
    #[error("order: {0}")]
    Order(#[from] crate::order::OrderError),
    #[error("bad prepare: {0}")]
    BadPrepare(ProtocolError),
    #[error("expected prepare as the first message")]
    NotPrepare,
    #[error("cannot create container {name} on {node}: {source}")]
    Create {
        name: String,
        node: String,
        source: Box<RuntimeError>,
    },
    #[error("image {image}: {source}")]
    ImageCheck {
        image: String,
        source: Box<StateError>,
    },
    #[error("image request: {0}")]
    ImageRequest(ProtocolError),
    #[error("receiving the image: {0}")]
    ReceiveImage(StreamError),
    #[error("image {image}: {source}")]
    PlaceImage {
        image: String,
        source: Box<StateError>,
    },
    #[error("cannot create the volumes of {name} on {node}: {source}")]
    CreateVolumes {
        name: String,
        node: String,
        source: Box<StateError>,
    },
    #[error("prepare reply: {0}")]
    PrepareReply(ProtocolError),
    #[error("restore: applying files and volumes: {0}")]
    ApplyState(Box<StateError>),
    #[error("receive: {0}")]
    Receive(StreamError),
    #[error("receive: the stream named {got}, expected {expected}")]
    UnexpectedStream { got: String, expected: String },
    #[error("target agent stopping")]
    TargetStopping,
    #[error("source silent for {silent_s} s while at its {phase} (no progress)")]
    SourceSilent { phase: String, silent_s: u64 },
    #[error("waiting for the stream: {0}")]
    AwaitStream(ProtocolError),
    #[error("expected progress or the stream, got {answer}")]
    UnexpectedBeforeStream { answer: String },
    #[error("restore: {0}")]
    Restore(RuntimeError),
    #[error("restore: cannot place images in {}: {source}", dir.display())]
    PlaceImages {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("restore on {node}: {source}")]
    RestoreStart {
        node: String,
        source: Box<RuntimeError>,
    },
    #[error("restored container {name} exited right away on {node}")]
    ExitedRightAway { name: String, node: String },
    #[error("restored, but cannot tell the source: {0}")]
    RestoredUntold(ProtocolError),
    #[error("source closed the connection before committing")]
    SourceClosed,
    #[error("the source decided abort ({after})")]
    SourceAborted { after: String },
    #[error("waiting for commit: {0}")]
    AwaitCommit(ProtocolError),
    #[error("source did not commit in time")]
    CommitTimeout,
    #[error("expected commit, got {answer}")]
    UnexpectedCommitAnswer { answer: String },

    /// A step ran without what an earlier step provides: a driver bug.
    #[error("{0}")]
    Missing(&'static str),
}

/// Why the source cannot tell whether the target kept the container.
#[derive(Debug, thiserror::Error)]
pub enum Unconfirmed {
    #[error("{0}")]
    Send(ProtocolError),
    #[error("{0}")]
    Recv(ProtocolError),
    #[error("answer {0}")]
    Answer(String),
    #[error("timeout")]
    Timeout,
}
