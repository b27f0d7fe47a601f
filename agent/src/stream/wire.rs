//! The data-port protocol: one checkpoint per connection, source → target.
//!
//! The transport is any byte stream (mutual TLS in production). All integers
//! are big-endian; "message" means a `u32` length (at most [`MAX_MESSAGE`])
//! followed by that many bytes of JSON.
//!
//! ```text
//! source                                   target
//!   "FERRY1\n"                       ──▶
//!   message TransferHeader            ──▶   checks it (job known? TLS peer is
//!                                           header.source_node? staging free?)
//!                                   ◀──     message Verdict {ok, error}
//!   body frames: u32 len + len bytes  ──▶   (only if the verdict was ok)
//!     len ≤ 256 KiB, len 0 ends the body
//!   trailer: 32-byte SHA-256 of all   ──▶
//!     body bytes, u64 raw tar bytes
//!                                   ◀──     message Verdict {ok, error}
//! ```
//!
//! The body is the zstd stream of a tar of the checkpoint folder (see
//! [`super::archive`]). The target unpacks it while it arrives; the final
//! verdict is ok only if the SHA-256 and the raw byte count match and the
//! archive was accepted. If unpacking fails before the end of the body, the
//! target sends its final verdict early and stops reading: the source watches
//! for it while it sends, so it reports the target's reason.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

use super::archive::{pack_dir, unpack_into, UnpackLimits, UnpackStats};
use super::pipe::{ChannelReader, ChannelWriter, Feed, CHUNK, DEPTH};
use super::ratelimit::TokenBucket;
use super::StreamError;

pub const MAGIC: &[u8; 7] = b"FERRY1\n";
/// Largest JSON message on the data connection: the header and verdicts here
/// and the control messages of `migration::protocol`. The largest real one is
/// the `Prepare` carrying a container's create body (env, labels, mounts),
/// a few KiB; anything near this is a broken or hostile peer.
pub const MAX_MESSAGE: u32 = 256 * 1024;
const MAX_FRAME: usize = CHUNK;
/// Longest silence tolerated from the peer at any step.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a source whose write failed waits for the target's reason.
const VERDICT_GRACE: Duration = Duration::from_secs(5);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// zstd window cap on the target (128 MiB): what levels up to 22 use.
const WINDOW_LOG_MAX: u32 = 27;

/// What the source announces before any body byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferHeader {
    pub job_id: String,
    pub source_node: String,
    pub target_node: String,
    pub container: String,
    pub checkpoint: String,
}

/// The target's answer, to the header and at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

impl Verdict {
    fn accept() -> Self {
        Verdict {
            ok: true,
            error: None,
        }
    }

    fn refuse(reason: impl Into<String>) -> Self {
        Verdict {
            ok: false,
            error: Some(reason.into()),
        }
    }

    fn reason(self) -> String {
        self.error.unwrap_or_else(|| "no reason given".into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOptions {
    /// zstd level; a job's default and range are the contract's
    /// (`mqtt::contract::DEFAULT_ZSTD_LEVEL`, `ZSTD_LEVELS`).
    pub zstd_level: i32,
    /// Bytes per second on the wire; `None` or 0 is unlimited.
    pub rate_limit: Option<u64>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            zstd_level: crate::mqtt::contract::DEFAULT_ZSTD_LEVEL,
            rate_limit: None,
        }
    }
}

/// Sent to the progress callback about 4 times a second, and once at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Tar bytes packed so far.
    pub bytes_raw: u64,
    /// Compressed body bytes sent so far.
    pub bytes_wire: u64,
    /// Mean wire rate since the start, bytes per second.
    pub rate_bps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    pub bytes_raw: u64,
    pub bytes_wire: u64,
    pub elapsed: Duration,
    /// Measured mean wire rate, bytes per second.
    pub rate_bps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveReport {
    pub header: TransferHeader,
    pub bytes_raw: u64,
    pub bytes_wire: u64,
}

/// Sends the checkpoint folder `dir` over `conn` and waits for the target's
/// final verdict. An error carries the target's reason when it gave one.
pub async fn send_checkpoint<S>(
    conn: S,
    header: &TransferHeader,
    dir: &Path,
    opts: &SendOptions,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<SendReport, StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let rejected = |reason: String| StreamError::Rejected {
        node: header.target_node.clone(),
        reason,
    };

    timed("sending the header", async {
        wr.write_all(MAGIC)
            .await
            .map_err(|e| StreamError::io("sending the header", e))?;
        write_message(&mut wr, header, "header").await
    })
    .await?;
    let verdict: Verdict = timed(
        "waiting for the header verdict",
        read_message(&mut rd, "header verdict"),
    )
    .await?;
    if !verdict.ok {
        return Err(rejected(verdict.reason()));
    }

    // Pack only once accepted: no CPU spent on a refused transfer.
    let (tx, rx) = mpsc::channel(DEPTH);
    let raw = Arc::new(AtomicU64::new(0));
    let packer = {
        let (dir, level, raw) = (dir.to_path_buf(), opts.zstd_level, raw.clone());
        tokio::task::spawn_blocking(move || pack_compressed(&dir, level, tx, &raw))
    };

    let final_verdict = read_message::<Verdict, _>(&mut rd, "final verdict");
    tokio::pin!(final_verdict);
    let body = send_body(&mut wr, rx, packer, opts, &raw, &mut progress, start);
    let sent = tokio::select! {
        biased;
        sent = body => sent,
        // Any answer before the end of the body means the target gave up.
        verdict = &mut final_verdict => {
            return Err(match verdict {
                Ok(v) if !v.ok => rejected(v.reason()),
                Ok(_) => StreamError::Protocol("target accepted before the end of the body".into()),
                Err(e) => e,
            });
        }
    };
    let (bytes_raw, bytes_wire) = match sent {
        Ok(done) => done,
        Err(BodyError::Local(e)) => return Err(e),
        Err(BodyError::Write(e)) => {
            // The target may have closed because it failed: it says why first.
            return Err(match timeout(VERDICT_GRACE, &mut final_verdict).await {
                Ok(Ok(v)) if !v.ok => rejected(v.reason()),
                _ => e,
            });
        }
    };
    let verdict = match timeout(IO_TIMEOUT, &mut final_verdict).await {
        Ok(v) => v?,
        Err(_) => return Err(timeout_error("waiting for the final verdict")),
    };
    if !verdict.ok {
        return Err(rejected(verdict.reason()));
    }
    let elapsed = start.elapsed();
    let rate_bps = rate(bytes_wire, elapsed);
    progress(Progress {
        bytes_raw,
        bytes_wire,
        rate_bps,
    });
    Ok(SendReport {
        bytes_raw,
        bytes_wire,
        elapsed,
        rate_bps,
    })
}

enum BodyError {
    /// Packing failed here; the target learns of it from the truncation.
    Local(StreamError),
    /// Writing to the target failed; the target may have said why.
    Write(StreamError),
}

/// Writes the frames and the trailer; returns (raw bytes, wire bytes).
async fn send_body<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    packer: tokio::task::JoinHandle<Result<u64, StreamError>>,
    opts: &SendOptions,
    raw: &AtomicU64,
    progress: &mut (impl FnMut(Progress) + Send),
    start: Instant,
) -> Result<(u64, u64), BodyError> {
    let limit = opts.rate_limit.filter(|r| *r > 0);
    // Slow links get small frames, so the target never waits a minute.
    let frame_max = limit.map_or(MAX_FRAME, |r| {
        (r / 8).clamp(4096, MAX_FRAME as u64) as usize
    });
    let mut bucket = limit.map(|r| TokenBucket::new(r, frame_max as u64 + 4));
    let mut hasher = Sha256::new();
    let mut wire = 0u64;
    let mut last_progress = start;
    while let Some(chunk) = rx.recv().await {
        for frame in chunk.chunks(frame_max) {
            if let Some(bucket) = bucket.as_mut() {
                let wait = bucket.reserve(Instant::now(), frame.len() as u64 + 4);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            // `frame.len()` ≤ MAX_FRAME, which fits a u32.
            write_frame(wr, frame).await.map_err(BodyError::Write)?;
            hasher.update(frame);
            wire += frame.len() as u64;
            let now = Instant::now();
            if now.duration_since(last_progress) >= PROGRESS_EVERY {
                last_progress = now;
                progress(Progress {
                    bytes_raw: raw.load(Ordering::Relaxed),
                    bytes_wire: wire,
                    rate_bps: rate(wire, now.duration_since(start)),
                });
            }
        }
    }
    let bytes_raw = packer
        .await
        .map_err(|e| {
            BodyError::Local(StreamError::Task {
                what: "pack",
                reason: e.to_string(),
            })
        })?
        .map_err(BodyError::Local)?;
    let mut trailer = Vec::with_capacity(4 + 32 + 8);
    trailer.extend_from_slice(&0u32.to_be_bytes());
    trailer.extend_from_slice(&hasher.finalize());
    trailer.extend_from_slice(&bytes_raw.to_be_bytes());
    timed("sending the trailer", async {
        wr.write_all(&trailer).await?;
        wr.flush().await
    })
    .await
    .map_err(|e| BodyError::Write(flatten_io("sending the trailer", e)))?;
    Ok((bytes_raw, wire))
}

async fn write_frame<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> Result<(), StreamError> {
    timed("sending the body", async {
        wr.write_all(&(frame.len() as u32).to_be_bytes()).await?;
        wr.write_all(frame).await
    })
    .await
    .map_err(|e| flatten_io("sending the body", e))
}

/// Blocking: tar → zstd → channel. Returns the raw tar byte count.
fn pack_compressed(
    dir: &Path,
    level: i32,
    tx: mpsc::Sender<Vec<u8>>,
    raw: &AtomicU64,
) -> Result<u64, StreamError> {
    let mut encoder = zstd::stream::write::Encoder::new(ChannelWriter::new(tx), level)
        .map_err(|e| StreamError::io(format!("starting zstd at level {level}"), e))?;
    let bytes_raw = pack_dir(
        dir,
        RawCounter {
            inner: &mut encoder,
            count: raw,
        },
    )?;
    encoder
        .finish()
        .and_then(ChannelWriter::finish)
        .map_err(|e| StreamError::io("finishing the zstd stream", e))?;
    Ok(bytes_raw)
}

/// Publishes the raw byte count for progress reports.
struct RawCounter<'a, W> {
    inner: W,
    count: &'a AtomicU64,
}

impl<W: std::io::Write> std::io::Write for RawCounter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A transfer whose header was read and not answered yet. The caller checks
/// the header (job known, TLS peer is `header.source_node`, …) and then
/// either [`accept`](Self::accept)s or [`refuse`](Self::refuse)s it.
#[derive(Debug)]
pub struct IncomingTransfer<S> {
    conn: S,
    header: TransferHeader,
}

/// Reads the magic and the header. A malformed header is answered with a
/// refusal naming the problem. Each read times out after a minute of silence.
pub async fn read_header<S>(mut conn: S) -> Result<IncomingTransfer<S>, StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut magic = [0u8; MAGIC.len()];
    timed("reading the magic", conn.read_exact(&mut magic))
        .await
        .map_err(|e| flatten_io("reading the magic", e))?;
    if &magic != MAGIC {
        return Err(StreamError::Protocol(
            "not a ferry data connection (bad magic)".into(),
        ));
    }
    match timed("reading the header", read_message(&mut conn, "header")).await {
        Ok(header) => Ok(IncomingTransfer { conn, header }),
        Err(e) => {
            if matches!(e, StreamError::Protocol(_)) {
                answer(&mut conn, Verdict::refuse(e.to_string())).await;
            }
            Err(e)
        }
    }
}

impl<S> IncomingTransfer<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub fn header(&self) -> &TransferHeader {
        &self.header
    }

    /// Tells the source why not, and closes.
    pub async fn refuse(mut self, reason: &str) -> Result<(), StreamError> {
        timed(
            "sending the refusal",
            write_message(&mut self.conn, &Verdict::refuse(reason), "verdict"),
        )
        .await?;
        let _ = timeout(VERDICT_GRACE, self.conn.shutdown()).await;
        Ok(())
    }

    /// Receives the checkpoint into `staging`, which must be empty or not
    /// exist. On any error (and if this future is dropped) the staging
    /// folder is removed.
    pub async fn accept(
        self,
        staging: &Path,
        limits: &UnpackLimits,
    ) -> Result<ReceiveReport, StreamError> {
        let IncomingTransfer { mut conn, header } = self;
        if let Err(e) = prepare_staging(staging) {
            answer(&mut conn, Verdict::refuse(e.to_string())).await;
            return Err(e);
        }
        timed(
            "accepting the header",
            write_message(&mut conn, &Verdict::accept(), "verdict"),
        )
        .await?;

        let (feed_tx, feed_rx) = mpsc::channel(DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let (commit_tx, commit_rx) = oneshot::channel();
        let unpacker = {
            let (staging, limits) = (staging.to_path_buf(), limits.clone());
            tokio::task::spawn_blocking(move || {
                unpack_task(feed_rx, staging, limits, done_tx, commit_rx)
            })
        };

        let outcome = match receive_body(&mut conn, feed_tx, done_rx, limits).await {
            Ok(done) => timed(
                "sending the final verdict",
                write_message(&mut conn, &Verdict::accept(), "verdict"),
            )
            .await
            .map(|()| done),
            Err(e) => {
                answer(&mut conn, Verdict::refuse(e.to_string())).await;
                Err(e)
            }
        };
        // The blocking task keeps the staging folder only on `true`, and
        // removes it before it ends otherwise.
        let _ = commit_tx.send(outcome.is_ok());
        unpacker.await.map_err(|e| StreamError::Task {
            what: "unpack",
            reason: e.to_string(),
        })?;
        match outcome {
            Ok((stats, bytes_wire)) => Ok(ReceiveReport {
                header,
                bytes_raw: stats.bytes_read,
                bytes_wire,
            }),
            Err(e) => {
                drain(&mut conn).await;
                Err(e)
            }
        }
    }
}

/// [`read_header`], `authorize`, then [`IncomingTransfer::accept`] or
/// [`IncomingTransfer::refuse`] with the reason `authorize` returned.
pub async fn receive_checkpoint<S>(
    conn: S,
    staging: &Path,
    limits: &UnpackLimits,
    authorize: impl FnOnce(&TransferHeader) -> Result<(), String>,
) -> Result<ReceiveReport, StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let incoming = read_header(conn).await?;
    match authorize(incoming.header()) {
        Ok(()) => incoming.accept(staging, limits).await,
        Err(reason) => {
            let job_id = incoming.header().job_id.clone();
            incoming.refuse(&reason).await?;
            Err(StreamError::Refused { job_id, reason })
        }
    }
}

fn prepare_staging(staging: &Path) -> Result<(), StreamError> {
    let refuse = |reason: String| StreamError::Staging {
        path: staging.to_path_buf(),
        reason,
    };
    match std::fs::symlink_metadata(staging) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = std::fs::read_dir(staging).map_err(|e| refuse(e.to_string()))?;
            if entries.next().is_some() {
                return Err(refuse("not empty".into()));
            }
            Ok(())
        }
        Ok(_) => Err(refuse("exists and is not a folder".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(staging).map_err(|e| refuse(format!("creating it: {e}")))
        }
        Err(e) => Err(refuse(e.to_string())),
    }
}

/// Reads frames and the trailer, feeding the unpacker; returns the unpack
/// stats and the wire byte count once everything checked out.
async fn receive_body<S: AsyncRead + Unpin>(
    conn: &mut S,
    feed: mpsc::Sender<Feed>,
    done: oneshot::Receiver<Result<UnpackStats, StreamError>>,
    limits: &UnpackLimits,
) -> Result<(UnpackStats, u64), StreamError> {
    // zstd never grows data by more than a few bytes per 128 KiB block.
    let max_wire = limits
        .max_total_bytes
        .saturating_add(limits.max_total_bytes / 64)
        .saturating_add(1 << 20);
    let unpack_ended = || StreamError::Task {
        what: "unpack",
        reason: "ended without a result".into(),
    };
    let mut hasher = Sha256::new();
    let mut wire = 0u64;
    loop {
        let mut len = [0u8; 4];
        read_exact(conn, &mut len, "the body", wire).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            break;
        }
        if len > MAX_FRAME {
            return Err(StreamError::Protocol(format!(
                "frame of {len} bytes, over the {MAX_FRAME} byte limit"
            )));
        }
        wire += len as u64;
        if wire > max_wire {
            return Err(StreamError::Archive(format!(
                "compressed body over {max_wire} bytes"
            )));
        }
        let mut frame = vec![0u8; len];
        read_exact(conn, &mut frame, "the body", wire).await?;
        hasher.update(&frame);
        if feed.send(Feed::Data(frame)).await.is_err() {
            // The unpacker stopped early: its error is the reason.
            return Err(match done.await {
                Ok(Err(e)) => e,
                _ => unpack_ended(),
            });
        }
    }
    let mut trailer = [0u8; 40];
    read_exact(conn, &mut trailer, "the trailer", wire).await?;
    let (expected_sum, expected_raw) = trailer.split_at(32);
    let mut raw = [0u8; 8];
    raw.copy_from_slice(expected_raw);
    let expected_raw = u64::from_be_bytes(raw);
    // A failed send means the unpacker already ended; `done` says how.
    let _ = feed.send(Feed::End).await;
    drop(feed);
    let unpacked = done.await.map_err(|_| unpack_ended())?;
    let actual_sum = hasher.finalize();
    // A corrupted body also breaks zstd or tar: report the root cause.
    if actual_sum.as_slice() != expected_sum {
        return Err(StreamError::ChecksumMismatch {
            expected: hex::encode(expected_sum),
            actual: hex::encode(actual_sum),
        });
    }
    let stats = unpacked?;
    if stats.bytes_read != expected_raw {
        return Err(StreamError::SizeMismatch {
            expected: expected_raw,
            actual: stats.bytes_read,
        });
    }
    Ok((stats, wire))
}

/// Blocking: channel → zstd → tar → staging. Removes the staging folder
/// unless the async side commits.
fn unpack_task(
    feed: mpsc::Receiver<Feed>,
    staging: PathBuf,
    limits: UnpackLimits,
    done: oneshot::Sender<Result<UnpackStats, StreamError>>,
    commit: oneshot::Receiver<bool>,
) {
    let result = unpack_zstd(ChannelReader::new(feed), &staging, &limits);
    let unpacked = result.is_ok();
    let _ = done.send(result);
    // A dropped sender (the receive future was cancelled) is a `false`.
    let keep = unpacked && commit.blocking_recv().unwrap_or(false);
    if !keep {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(staging = %staging.display(), error = %e, "cannot remove staging folder");
            }
        }
    }
}

fn unpack_zstd(
    input: ChannelReader,
    staging: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, StreamError> {
    let mut decoder =
        zstd::stream::read::Decoder::new(input).map_err(|e| StreamError::io("starting zstd", e))?;
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .map_err(|e| StreamError::io("capping the zstd window", e))?;
    unpack_into(decoder, staging, limits)
}

async fn read_exact<R: AsyncRead + Unpin>(
    conn: &mut R,
    buf: &mut [u8],
    what: &str,
    wire: u64,
) -> Result<(), StreamError> {
    match timeout(IO_TIMEOUT, conn.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StreamError::Truncated(
            format!("connection closed in {what} after {wire} body bytes"),
        )),
        Ok(Err(e)) => Err(StreamError::io(format!("reading {what}"), e)),
        Err(_) => Err(timeout_error(&format!("reading {what}"))),
    }
}

async fn write_message<W, T>(wr: &mut W, msg: &T, what: &str) -> Result<(), StreamError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    write_json_frame(wr, msg, what, MAX_MESSAGE).await
}

async fn read_message<T, R>(rd: &mut R, what: &str) -> Result<T, StreamError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    read_json_frame(rd, what, MAX_MESSAGE).await
}

/// One JSON message behind a u32 big-endian length of at most `max` bytes:
/// the framing of the header and verdicts here, and of the control
/// conversation around the stream (`migration::protocol`).
pub(crate) async fn write_json_frame<W, T>(
    wr: &mut W,
    msg: &T,
    what: &str,
    max: u32,
) -> Result<(), StreamError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let json = serde_json::to_vec(msg)
        .map_err(|e| StreamError::Protocol(format!("encoding the {what}: {e}")))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| {
            StreamError::Protocol(format!("{what} of {} bytes is too large", json.len()))
        })?;
    let mut buf = Vec::with_capacity(4 + json.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&json);
    wr.write_all(&buf)
        .await
        .map_err(|e| StreamError::io(format!("sending the {what}"), e))?;
    wr.flush()
        .await
        .map_err(|e| StreamError::io(format!("sending the {what}"), e))
}

pub(crate) async fn read_json_frame<T, R>(
    rd: &mut R,
    what: &str,
    max: u32,
) -> Result<T, StreamError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            StreamError::Truncated(format!("connection closed before the {what}"))
        }
        _ => StreamError::io(format!("reading the {what}"), e),
    };
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await.map_err(eof)?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(StreamError::Protocol(format!(
            "{what} of {len} bytes, over the {max} byte limit"
        )));
    }
    let mut json = vec![0u8; len as usize];
    rd.read_exact(&mut json).await.map_err(eof)?;
    serde_json::from_slice(&json).map_err(|e| StreamError::Protocol(format!("bad {what}: {e}")))
}

/// Best effort: the peer may already be gone.
async fn answer<W: AsyncWrite + Unpin>(wr: &mut W, verdict: Verdict) {
    let _ = timeout(VERDICT_GRACE, write_message(wr, &verdict, "verdict")).await;
}

/// After an early refusal, reads what the source still sends for a moment,
/// so that closing does not reset the connection before it read the verdict.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut S) {
    let _ = timeout(VERDICT_GRACE, async {
        let _ = conn.shutdown().await;
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A receiver that gives up mid-stream (its agent stops): the sender,
/// which watches for the final verdict while it sends, reports `reason`.
pub async fn refuse_now<W: AsyncWrite + Unpin>(wr: &mut W, reason: &str) {
    answer(wr, Verdict::refuse(reason)).await;
    let _ = timeout(VERDICT_GRACE, wr.flush()).await;
}

/// Runs `fut` with the I/O timeout; `what` names the step in the error.
async fn timed<T, E, F>(what: &str, fut: F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: From<TimedOut>,
{
    match timeout(IO_TIMEOUT, fut).await {
        Ok(result) => result,
        Err(_) => Err(TimedOut(what.to_string()).into()),
    }
}

/// A timeout, convertible into both error types `timed` is used with.
struct TimedOut(String);

impl From<TimedOut> for StreamError {
    fn from(t: TimedOut) -> Self {
        timeout_error(&t.0)
    }
}

impl From<TimedOut> for std::io::Error {
    fn from(t: TimedOut) -> Self {
        std::io::Error::new(std::io::ErrorKind::TimedOut, t.0)
    }
}

fn timeout_error(what: &str) -> StreamError {
    StreamError::Timeout {
        what: what.to_string(),
        secs: IO_TIMEOUT.as_secs(),
    }
}

fn flatten_io(what: &str, e: std::io::Error) -> StreamError {
    match e.kind() {
        std::io::ErrorKind::TimedOut => timeout_error(what),
        std::io::ErrorKind::UnexpectedEof => {
            StreamError::Truncated(format!("connection closed while {what}"))
        }
        _ => StreamError::io(what, e),
    }
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        (bytes as f64 / secs) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::{noise, tree, TempDir};
    use std::fs;
    use tokio::io::{duplex, DuplexStream};

    const MIB: usize = 1 << 20;

    fn header() -> TransferHeader {
        TransferHeader {
            job_id: "job-1".into(),
            source_node: "node-a".into(),
            target_node: "node-b".into(),
            container: "web".into(),
            checkpoint: "cp1".into(),
        }
    }

    /// A checkpoint-like folder: small files, a folder, and a `big_mib` MiB
    /// file of alternating random and zero blocks.
    fn checkpoint(dir: &Path, big_mib: usize) {
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("core-1.img"), b"core").unwrap();
        fs::write(dir.join("sub/fdinfo-2.img"), noise(10_000, 5)).unwrap();
        let mut big = Vec::with_capacity(big_mib * MIB);
        for block in 0..big_mib * 16 {
            if block % 2 == 0 {
                big.extend_from_slice(&noise(64 * 1024, block as u64));
            } else {
                big.resize(big.len() + 64 * 1024, 0);
            }
        }
        fs::write(dir.join("pages-1.img"), big).unwrap();
    }

    /// A source folder holding `checkpoint(_, big_mib)`, and a target
    /// folder with the (not yet created) staging path inside it.
    fn folders(tag: &str, big_mib: usize) -> (TempDir, TempDir, PathBuf) {
        let src = TempDir::new(&format!("wire-{tag}-src"));
        checkpoint(src.path(), big_mib);
        let dst = TempDir::new(&format!("wire-{tag}-dst"));
        let staging = dst.join("staging");
        (src, dst, staging)
    }

    fn same_tree(a: &Path, b: &Path) {
        let (ta, tb) = (tree(a), tree(b));
        assert_eq!(ta, tb);
        for rel in ta {
            let (pa, pb) = (a.join(&rel), b.join(&rel));
            if pa.is_file() {
                assert!(
                    fs::read(&pa).unwrap() == fs::read(&pb).unwrap(),
                    "{rel} differs"
                );
            }
        }
    }

    #[tokio::test]
    async fn round_trip_preserves_the_folder_and_compresses() {
        let (src, _dst, staging) = folders("round-trip", 20);
        let (a, b) = duplex(64 * 1024);

        let target = {
            let staging = staging.clone();
            tokio::spawn(async move {
                let incoming = read_header(b).await?;
                assert_eq!(incoming.header(), &header());
                incoming.accept(&staging, &UnpackLimits::default()).await
            })
        };
        let mut reports = Vec::new();
        let sent = send_checkpoint(a, &header(), src.path(), &SendOptions::default(), |p| {
            reports.push(p)
        })
        .await
        .unwrap();
        let received = target.await.unwrap().unwrap();

        same_tree(src.path(), &staging);
        assert_eq!(received.header, header());
        assert_eq!(received.bytes_raw, sent.bytes_raw);
        assert_eq!(received.bytes_wire, sent.bytes_wire);
        assert!(sent.bytes_raw > 20 * MIB as u64);
        assert!(
            sent.bytes_wire < sent.bytes_raw * 3 / 4,
            "{} wire bytes for {} raw",
            sent.bytes_wire,
            sent.bytes_raw
        );
        let last = reports.last().expect("a final progress report");
        assert_eq!(
            (last.bytes_raw, last.bytes_wire),
            (sent.bytes_raw, sent.bytes_wire)
        );
        assert!(reports
            .windows(2)
            .all(|w| w[0].bytes_wire <= w[1].bytes_wire));
    }

    #[derive(Clone, Copy)]
    enum Tamper {
        /// Flip the byte at this offset of the source → target stream.
        Flip(usize),
        /// Close the source → target direction after this many bytes.
        Cut(usize),
    }

    /// A man in the middle: returns (source end, target end).
    fn relay(tamper: Tamper) -> (DuplexStream, DuplexStream) {
        let (source, relay_a) = duplex(64 * 1024);
        let (relay_b, target) = duplex(64 * 1024);
        let (mut a_rd, mut a_wr) = tokio::io::split(relay_a);
        let (mut b_rd, mut b_wr) = tokio::io::split(relay_b);
        tokio::spawn(async move {
            let mut pos = 0usize;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match a_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &mut buf[..n];
                match tamper {
                    Tamper::Flip(at) if (pos..pos + n).contains(&at) => chunk[at - pos] ^= 0x20,
                    Tamper::Cut(at) if pos + n >= at => {
                        let _ = b_wr.write_all(&chunk[..at - pos]).await;
                        break;
                    }
                    _ => {}
                }
                if b_wr.write_all(chunk).await.is_err() {
                    break;
                }
                pos += n;
            }
            let _ = b_wr.shutdown().await;
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut b_rd, &mut a_wr).await;
            let _ = a_wr.shutdown().await;
        });
        (source, target)
    }

    async fn transfer(
        src: &Path,
        source_end: DuplexStream,
        target_end: DuplexStream,
        staging: &Path,
        limits: UnpackLimits,
    ) -> (
        Result<SendReport, StreamError>,
        Result<ReceiveReport, StreamError>,
    ) {
        let staging = staging.to_path_buf();
        let target = tokio::spawn(async move {
            receive_checkpoint(target_end, &staging, &limits, |_| Ok(())).await
        });
        let sent =
            send_checkpoint(source_end, &header(), src, &SendOptions::default(), |_| {}).await;
        (sent, target.await.unwrap())
    }

    #[tokio::test]
    async fn flipped_body_byte_fails_both_sides_and_cleans_staging() {
        let (src, _dst, staging) = folders("flip", 1);
        let (a, b) = relay(Tamper::Flip(50_000));
        let (sent, received) = transfer(src.path(), a, b, &staging, UnpackLimits::default()).await;
        let err = received.unwrap_err();
        assert!(
            matches!(
                err,
                StreamError::ChecksumMismatch { .. }
                    | StreamError::Archive(_)
                    | StreamError::Entry { .. }
            ),
            "{err}"
        );
        let sent = sent.unwrap_err().to_string();
        assert!(
            sent.contains("target node-b rejected the transfer"),
            "{sent}"
        );
        assert!(sent.contains(&err.to_string()), "{sent}");
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn truncated_stream_fails_both_sides_and_cleans_staging() {
        let (src, _dst, staging) = folders("cut", 1);
        let (a, b) = relay(Tamper::Cut(300_000));
        let (sent, received) = transfer(src.path(), a, b, &staging, UnpackLimits::default()).await;
        let err = received.unwrap_err();
        assert!(matches!(err, StreamError::Truncated(_)), "{err}");
        assert!(sent.is_err());
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn refused_header_gives_the_sender_the_reason() {
        let (src, _dst, staging) = folders("refuse", 1);
        let (a, b) = duplex(64 * 1024);
        let target = {
            let staging = staging.clone();
            tokio::spawn(async move {
                receive_checkpoint(b, &staging, &UnpackLimits::default(), |h| {
                    Err(format!("job {} is unknown here", h.job_id))
                })
                .await
            })
        };
        let sent = send_checkpoint(a, &header(), src.path(), &SendOptions::default(), |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&sent, StreamError::Rejected { node, reason }
                if node == "node-b" && reason == "job job-1 is unknown here"),
            "{sent}"
        );
        let received = target.await.unwrap().unwrap_err();
        assert!(
            matches!(received, StreamError::Refused { .. }),
            "{received}"
        );
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn busy_staging_is_refused_and_left_alone() {
        let (src, _dst, staging) = folders("busy", 1);
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("previous.img"), b"keep me").unwrap();
        let (a, b) = duplex(64 * 1024);
        let (sent, received) = transfer(src.path(), a, b, &staging, UnpackLimits::default()).await;
        let sent = sent.unwrap_err().to_string();
        assert!(
            sent.contains("not empty") && sent.contains("staging"),
            "{sent}"
        );
        assert!(matches!(received.unwrap_err(), StreamError::Staging { .. }));
        assert_eq!(fs::read(staging.join("previous.img")).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn archive_rejected_mid_body_reaches_the_sender() {
        let (src, _dst, staging) = folders("limit", 8);
        let limits = UnpackLimits {
            max_entry_bytes: MIB as u64,
            ..UnpackLimits::default()
        };
        let (a, b) = duplex(64 * 1024);
        let (sent, received) = transfer(src.path(), a, b, &staging, limits).await;
        let err = received.unwrap_err();
        assert!(
            matches!(&err, StreamError::Entry { entry, .. } if entry == "pages-1.img"),
            "{err}"
        );
        let sent = sent.unwrap_err().to_string();
        assert!(
            sent.contains("rejected")
                && sent.contains("pages-1.img")
                && sent.contains("per-entry limit"),
            "{sent}"
        );
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn sender_reports_what_it_cannot_pack() {
        let src = TempDir::new("wire-pack-src");
        checkpoint(src.path(), 1);
        std::os::unix::fs::symlink("/etc", src.join("zz-link")).unwrap();
        let dst = TempDir::new("wire-pack-dst");
        let staging = dst.join("staging");
        let (a, b) = duplex(64 * 1024);
        let (sent, received) = transfer(src.path(), a, b, &staging, UnpackLimits::default()).await;
        let sent = sent.unwrap_err().to_string();
        assert!(
            sent.contains("zz-link") && sent.contains("symlink"),
            "{sent}"
        );
        assert!(received.is_err());
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn garbage_and_oversized_headers_are_refused() {
        let (mut a, b) = duplex(1024);
        let target = tokio::spawn(read_header(b));
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = target.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");

        let (mut a, b) = duplex(1024);
        let target = tokio::spawn(read_header(b));
        a.write_all(MAGIC).await.unwrap();
        a.write_all(&(10u32 << 20).to_be_bytes()).await.unwrap();
        let err = target.await.unwrap().unwrap_err();
        let limit = format!("over the {MAX_MESSAGE} byte limit");
        assert!(err.to_string().contains(&limit), "{err}");
        let verdict: Verdict = read_message(&mut a, "verdict").await.unwrap();
        assert!(!verdict.ok && verdict.reason().contains(&MAX_MESSAGE.to_string()));

        let (mut a, b) = duplex(1024);
        let target = tokio::spawn(read_header(b));
        a.write_all(MAGIC).await.unwrap();
        let json = br#"{"job_id":"j","source_node":"a","target_node":"b","container":"c","checkpoint":"k","extra":1}"#;
        a.write_all(&(json.len() as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(json).await.unwrap();
        let err = target.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    /// A receiver that accepts any header, already past its first verdict:
    /// the returned end is where the body goes next.
    async fn accepted_receiver(
        staging: &Path,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<ReceiveReport, StreamError>>,
    ) {
        let (mut a, b) = duplex(64 * 1024);
        let staging = staging.to_path_buf();
        let target = tokio::spawn(async move {
            receive_checkpoint(b, &staging, &UnpackLimits::default(), |_| Ok(())).await
        });
        a.write_all(MAGIC).await.unwrap();
        write_message(&mut a, &header(), "header").await.unwrap();
        let verdict: Verdict = read_message(&mut a, "verdict").await.unwrap();
        assert!(verdict.ok);
        (a, target)
    }

    #[tokio::test]
    async fn oversized_frame_is_a_protocol_error() {
        let dst = TempDir::new("wire-frame-dst");
        let staging = dst.join("staging");
        let (mut a, target) = accepted_receiver(&staging).await;
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let err = target.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("frame of 262145 bytes"), "{err}");
        let verdict: Verdict = read_message(&mut a, "verdict").await.unwrap();
        assert!(!verdict.ok && verdict.reason().contains("262145"));
        assert!(!staging.exists());
    }

    #[tokio::test]
    async fn cancelled_receive_removes_staging() {
        let dst = TempDir::new("wire-cancel-dst");
        let staging = dst.join("staging");
        let (mut a, target) = accepted_receiver(&staging).await;
        let body = zstd::encode_all(&noise(100_000, 1)[..], 3).unwrap();
        write_frame(&mut a, &body[..body.len() / 2]).await.unwrap();
        assert!(staging.is_dir());
        target.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while staging.exists() {
            assert!(
                Instant::now() < deadline,
                "staging still there after cancel"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn transfer_futures_can_be_spawned() {
        fn is_send<T: Send>(_: &T) {}
        let (a, b) = duplex(1);
        let (dir, limits, opts) = (
            Path::new("x"),
            UnpackLimits::default(),
            SendOptions::default(),
        );
        is_send(&send_checkpoint(a, &header(), dir, &opts, |_| {}));
        is_send(&receive_checkpoint(b, dir, &limits, |_| Ok(())));
    }

    #[tokio::test]
    async fn rate_limit_slows_the_transfer() {
        let src = TempDir::new("wire-rate-src");
        fs::write(src.join("pages-1.img"), noise(4 * MIB, 9)).unwrap();
        let dst = TempDir::new("wire-rate-dst");
        let (a, b) = duplex(64 * 1024);
        let staging = dst.join("staging");
        let target = tokio::spawn(async move {
            receive_checkpoint(b, &staging, &UnpackLimits::default(), |_| Ok(())).await
        });
        let opts = SendOptions {
            rate_limit: Some(8 * MIB as u64),
            ..SendOptions::default()
        };
        let start = Instant::now();
        let sent = send_checkpoint(a, &header(), src.path(), &opts, |_| {})
            .await
            .unwrap();
        target.await.unwrap().unwrap();
        // 4 MiB of noise at 8 MiB/s, minus one burst: about 0.47 s.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert!(sent.rate_bps < 12 * MIB as u64, "{} B/s", sent.rate_bps);
    }
}
