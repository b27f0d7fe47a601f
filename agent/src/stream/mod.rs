//! Checkpoint transfer: tar, zstd, rate limit, checksum, mutual TLS.

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}
