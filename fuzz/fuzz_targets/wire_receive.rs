//! `stream::wire::receive_checkpoint`: what a peer sends on the data port
//! after the prepare, read from a byte slice. With the first byte even the
//! rest is the stream as it is; odd, the rest is a body that this harness
//! frames correctly (magic, header, frames, checksum trailer), so zstd and
//! tar see it. Whatever happens, nothing lands outside the staging folder,
//! and a failed receive leaves no staging folder behind.
#![no_main]

mod sandbox;

use std::io::Read;
use std::sync::OnceLock;

use ferry_agent::stream::archive::UnpackLimits;
use ferry_agent::stream::wire::{receive_checkpoint, TransferHeader, MAGIC};
use libfuzzer_sys::fuzz_target;
use sandbox::Sandbox;
use sha2::{Digest, Sha256};

const LIMITS: UnpackLimits = UnpackLimits {
    max_entry_bytes: 1 << 20,
    max_total_bytes: 4 << 20,
    max_entries: 256,
};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| Sandbox::new("wire"))
}

fn message(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn framed(body: &[u8]) -> Vec<u8> {
    let header = TransferHeader {
        job_id: "job-1".into(),
        source_node: "node-a".into(),
        target_node: "node-b".into(),
        container: "web".into(),
        checkpoint: "ferry-job-1".into(),
    };
    let mut out = MAGIC.to_vec();
    message(&mut out, &serde_json::to_vec(&header).expect("header"));
    for frame in body.chunks(4096) {
        message(&mut out, frame);
    }
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&Sha256::digest(body));
    // The true raw size when the body decodes, so the success path is reachable.
    let raw = zstd::stream::read::Decoder::new(body)
        .ok()
        .and_then(|d| std::io::copy(&mut d.take(8 << 20), &mut std::io::sink()).ok())
        .unwrap_or(0);
    out.extend_from_slice(&raw.to_be_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(rest)
    };
    let sb = sandbox();
    sb.reset();
    let conn = tokio::io::join(&stream[..], tokio::io::sink());
    let result = runtime().block_on(receive_checkpoint(conn, &sb.dest, &LIMITS, |h| {
        if h.target_node == "node-b" {
            Ok(())
        } else {
            Err(format!("not for node-b: {}", h.target_node))
        }
    }));
    sb.check();
    match result {
        Ok(report) => {
            assert!(sb.dest.is_dir());
            assert!(report.bytes_raw <= LIMITS.max_total_bytes);
        }
        Err(e) => assert!(!sb.dest.exists(), "staging left behind after: {e}"),
    }
});
