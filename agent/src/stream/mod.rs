//! Checkpoint transfer: tar, zstd, rate limit, checksum, mutual TLS, and
//! the errors of all of them ([`StreamError`]).
//!
//! - [`archive`]: tar of a checkpoint folder, and extraction that never
//!   writes outside its destination.
//! - [`delta`]: page images as blocks the target lacks and references to
//!   blocks it has, by content hash (pre-copy).
//! - `pipe`: bounded byte pipes between the blocking tar/zstd threads and
//!   the async connection.
//! - [`ratelimit`]: a sans-I/O token bucket and the `10MiB/s` rate parser.
//! - [`wire`]: the data-port protocol between a source and a target agent.
//! - [`tls`]: mutual TLS configs from PEM files, and peer identities.
//! - [`admission`]: how many data connections each peer may hold in their
//!   TLS handshake.
//! - `tarcore`: tar byte counting and the safe-extraction core, shared by
//!   [`archive`] and the runtime's container-layer and volume apply.

pub mod admission;
pub mod archive;
pub mod delta;
mod pipe;
pub mod ratelimit;
pub(crate) mod tarcore;
pub mod tls;
pub mod wire;

#[cfg(test)]
pub(crate) mod testutil;

pub use archive::{pack_dir, unpack_into, UnpackLimits, UnpackStats};
pub use ratelimit::{parse_rate, TokenBucket};
pub use tls::{
    accept_peer, cert_matches_node, cert_names, check_identity, client_config, server_config,
    server_name, TlsFiles,
};
pub use wire::{
    read_header, receive_checkpoint, send_checkpoint, IncomingTransfer, Progress, ReceiveReport,
    SendOptions, SendReport, TransferHeader, Verdict,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid rate {value:?}: {reason}")]
    InvalidRate { value: String, reason: String },
    #[error("cannot pack {path}: {reason}")]
    Pack { path: PathBuf, reason: String },
    #[error("archive rejected: entry {entry:?}: {reason}")]
    Entry { entry: String, reason: String },
    #[error("archive rejected: {0}")]
    Archive(String),
    #[error("staging folder {path}: {reason}")]
    Staging { path: PathBuf, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("stream truncated: {0}")]
    Truncated(String),
    #[error("timed out after {secs} s {what}")]
    Timeout { what: String, secs: u64 },
    #[error("checksum mismatch: body sha256 is {actual}, sender announced {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("size mismatch: received {actual} raw bytes, sender announced {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("transfer refused for job {job_id}: {reason}")]
    Refused { job_id: String, reason: String },
    #[error("target {node} rejected the transfer: {reason}")]
    Rejected { node: String, reason: String },
    #[error("tls file {path}: {reason}")]
    TlsFile { path: PathBuf, reason: String },
    #[error("tls config: {0}")]
    TlsConfig(String),
    #[error("peer certificate: {0}")]
    PeerCert(String),
    #[error("tls handshake: {0}")]
    Handshake(String),
    #[error("background {what} task failed: {reason}")]
    Task { what: &'static str, reason: String },
}

impl StreamError {
    /// Wraps an I/O error with what was being done (and on which path or peer).
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> StreamError {
        StreamError::Io {
            context: context.into(),
            source,
        }
    }
}
