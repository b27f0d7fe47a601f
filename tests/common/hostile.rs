//! A hostile peer for a real agent's data port: it speaks the protocol by
//! hand, with the agent's own types, to feed archives and streams that
//! ferry's own sender would never produce; [`FlipRelay`] corrupts one byte
//! of a live connection; [`tree`] lists what a hostile transfer may have
//! written.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ferry_agent::migration::protocol::{self, Prepare, ToSource, ToTarget};
use ferry_agent::stream::wire::{TransferHeader, Verdict, MAGIC};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

/// Connects to the data port at `addr` of the agent `server` (the name in
/// its certificate) as the holder of `config`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    server: &str,
) -> Result<TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let name = ferry_agent::stream::server_name(server).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

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
        // As a source does once its checkpoint is ready: the stream follows.
        protocol::send(conn, &ToTarget::Sending)
            .await
            .map_err(|e| Outcome::Broken(e.to_string()))?;
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
