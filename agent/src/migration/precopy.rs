//! Pre-copy by page content, without dirty tracking (issue 10).
//!
//! While the container runs, the source dumps it with `--leave-running` and
//! sends the page images as block deltas ([`crate::stream::delta`]) against
//! what the target already holds; the target keeps the assembled images in
//! its staging. The final (stopping) dump then sends, for each page block,
//! either the block or the hash of one the target has, and the target
//! assembles complete images before the restore.
//!
//! [`next_after`] decides, without I/O, whether another round is worth it;
//! the file helpers here do the encoding and assembly over folders.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::runtime::TcpDump;
use crate::stream::delta::{self, BlockHash, BlockIndex, DeltaError, DeltaStats, Known, BLOCK};

/// At most this many rounds while the container runs.
pub const MAX_ROUNDS: usize = 3;
/// A round that sent no more than this is as good as it gets.
pub const SMALL_DELTA: u64 = 4 << 20;

/// What follows a pre-copy round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Another round while the container runs.
    Round,
    /// Stop the container; the final dump goes as deltas against what the
    /// target holds.
    FinalDelta,
    /// Stop the container and copy its dump whole: the workload rewrites
    /// its memory faster than rounds can catch up.
    FinalWhole { note: String },
}

/// Decides after each round from the bytes each round had to send whole
/// (the first round: everything) and the pages' total size: rounds repeat
/// while the delta halves, at most [`MAX_ROUNDS`]; a delta that stays at
/// nine tenths of the memory means pre-copy gains nothing.
pub fn next_after(new_bytes: &[u64], total: u64) -> Next {
    let Some(&last) = new_bytes.last() else {
        return Next::Round;
    };
    if new_bytes.len() >= 2 {
        let prev = new_bytes[new_bytes.len() - 2];
        if last.saturating_mul(10) >= total.saturating_mul(9) && total > SMALL_DELTA {
            return Next::FinalWhole {
                note: format!(
                    "round {} still found {} of {} page bytes changed: the workload rewrites its memory faster than pre-copy catches up; stop and copy",
                    new_bytes.len(),
                    last,
                    total
                ),
            };
        }
        if last.saturating_mul(2) > prev {
            return Next::FinalDelta;
        }
    }
    if last <= SMALL_DELTA && new_bytes.len() >= 2 || new_bytes.len() >= MAX_ROUNDS {
        return Next::FinalDelta;
    }
    Next::Round
}

/// Why a job's pre-copy is skipped before any round, or `None` to go on.
/// A leave-running dump must not touch established connections: with
/// `tcp-established` CRIU would put the live sockets into repair mode and
/// lock the network, with `tcp-close` the dump's semantics on a container
/// left running are not what the job asked for; so only a container
/// without established connections is pre-copied.
pub fn skip_reason(tcp: TcpDump) -> Option<String> {
    match tcp {
        TcpDump::Plain => None,
        TcpDump::Close | TcpDump::Established => Some(format!(
            "pre-copy skipped: the container has established TCP connections (dump mode {tcp:?}), which a dump that leaves it running would lock or close"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreCopyError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("assembling {path}: {source}")]
    Delta { path: PathBuf, source: DeltaError },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PreCopyError {
    let path = path.to_path_buf();
    move |source| PreCopyError::Io { what, path, source }
}

/// The top-level entries of `dir`, sorted.
fn entries(dir: &Path) -> Result<Vec<String>, PreCopyError> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let e = e.map_err(io_err("listing", dir))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn encode_file(
    from: &Path,
    to: &Path,
    known: &Known,
    hashes: &mut Vec<BlockHash>,
) -> Result<DeltaStats, PreCopyError> {
    let input = File::open(from).map_err(io_err("opening", from))?;
    let len = input.metadata().map_err(io_err("reading", from))?.len();
    let out = File::create(to).map_err(io_err("creating", to))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let st = delta::encode(
        BufReader::with_capacity(1 << 20, input),
        len,
        known,
        &mut out,
        hashes,
    )
    .map_err(io_err("encoding", from))?;
    out.flush().map_err(io_err("writing", to))?;
    Ok(st)
}

/// A pre-copy round on the source: each page image of `dump` goes into
/// `out` (created empty) as `<name>.delta` against `known`; nothing else
/// (the final dump brings the rest). Returns the stats and the hashes of
/// every full block, in order: what the target holds afterwards.
pub fn encode_round(
    dump: &Path,
    out: &Path,
    known: &Known,
) -> Result<(DeltaStats, Vec<BlockHash>), PreCopyError> {
    fresh_dir(out)?;
    let mut total = DeltaStats::default();
    let mut hashes = Vec::new();
    for name in entries(dump)?
        .into_iter()
        .filter(|n| delta::is_page_image(n))
    {
        let to = out.join(format!("{name}{}", delta::SUFFIX));
        total.add(encode_file(&dump.join(&name), &to, known, &mut hashes)?);
    }
    Ok((total, hashes))
}

/// The final dump on the source: `out` (created empty) mirrors the
/// checkpoint folder `ckpt` with hard links (copies across filesystems),
/// except that its page images are deltas against `known`. `ckpt` itself
/// stays whole for a rollback.
pub fn encode_final(ckpt: &Path, out: &Path, known: &Known) -> Result<DeltaStats, PreCopyError> {
    fresh_dir(out)?;
    let mut total = DeltaStats::default();
    let mut hashes = Vec::new();
    for name in entries(ckpt)? {
        let from = ckpt.join(&name);
        if delta::is_page_image(&name) {
            let to = out.join(format!("{name}{}", delta::SUFFIX));
            total.add(encode_file(&from, &to, known, &mut hashes)?);
            hashes.clear();
        } else {
            link_tree(&from, &out.join(&name))?;
        }
    }
    Ok(total)
}

fn link_tree(from: &Path, to: &Path) -> Result<(), PreCopyError> {
    let meta = fs::symlink_metadata(from).map_err(io_err("reading", from))?;
    if meta.is_dir() {
        fs::create_dir(to).map_err(io_err("creating", to))?;
        for name in entries(from)? {
            link_tree(&from.join(&name), &to.join(&name))?;
        }
    } else if meta.is_file() && fs::hard_link(from, to).is_err() {
        fs::copy(from, to).map_err(io_err("copying", from))?;
    }
    // Anything else the packer refuses in the original as well.
    Ok(())
}

fn fresh_dir(dir: &Path) -> Result<(), PreCopyError> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err("removing", dir))?;
    }
    fs::create_dir_all(dir).map_err(io_err("creating", dir))
}

/// The page images a target holds from the last round, and where each of
/// their full blocks is by hash.
#[derive(Debug, Default)]
pub struct Staged {
    /// The images, with the number of the first full block of each.
    files: Vec<(PathBuf, u64)>,
    index: BlockIndex,
}

impl Staged {
    /// Blocks the target can fill references from.
    pub fn blocks(&self) -> usize {
        self.index.len()
    }

    pub fn index_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    fn opened(&self) -> Result<Vec<(File, u64)>, PreCopyError> {
        self.files
            .iter()
            .map(|(p, first)| Ok((File::open(p).map_err(io_err("opening", p))?, *first)))
            .collect()
    }
}

/// Reads block `hash` of the staged images into `buf`.
fn fetch(
    index: &BlockIndex,
    files: &[(File, u64)],
    hash: &BlockHash,
    buf: &mut [u8],
) -> io::Result<bool> {
    let Some(block) = index.lookup(hash) else {
        return Ok(false);
    };
    let block = u64::from(block);
    let i = files.partition_point(|(_, first)| *first <= block);
    let Some((file, first)) = i.checked_sub(1).and_then(|i| files.get(i)) else {
        return Ok(false);
    };
    file.read_exact_at(buf, (block - first) * BLOCK as u64)?;
    Ok(true)
}

/// An image [`assemble`] wrote, with the hashes of its full blocks.
pub type Assembled = (PathBuf, Vec<BlockHash>);

/// Decodes every `<name>.delta` at the top of `from` into `<into>/<name>`
/// (a new file), filling references from `staged`, with at most `max`
/// bytes of content in all; each delta is removed once decoded. Returns
/// the stats and the images written, with their block hashes in order.
pub fn assemble(
    from: &Path,
    into: &Path,
    staged: &Staged,
    mut max: u64,
) -> Result<(DeltaStats, Vec<Assembled>), PreCopyError> {
    let files = staged.opened()?;
    let mut total = DeltaStats::default();
    let mut written = Vec::new();
    for name in entries(from)? {
        let Some(image) = name.strip_suffix(delta::SUFFIX) else {
            continue;
        };
        // Only page images travel as deltas; anything else is refused.
        if !delta::is_page_image(image) {
            return Err(PreCopyError::Delta {
                path: from.join(&name),
                source: DeltaError::Magic,
            });
        }
        let src = from.join(&name);
        let dst = into.join(image);
        let input = File::open(&src).map_err(io_err("opening", &src))?;
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .map_err(io_err("creating", &dst))?;
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let mut hashes = Vec::new();
        let st = delta::decode(
            BufReader::with_capacity(1 << 20, input),
            max,
            |h, buf| fetch(&staged.index, &files, h, buf),
            &mut out,
            &mut hashes,
        )
        .map_err(|source| PreCopyError::Delta {
            path: dst.clone(),
            source,
        })?;
        out.flush().map_err(io_err("writing", &dst))?;
        fs::remove_file(&src).map_err(io_err("removing", &src))?;
        max = max.saturating_sub(st.bytes);
        total.add(st);
        written.push((dst, hashes));
    }
    Ok((total, written))
}

/// The final dump on the target: decodes every `<name>.delta` at the top
/// of `dir` into `<dir>/<name>`, like [`assemble`], except that a delta
/// whose references all name the block already at their own position in
/// the staged image of the same name (memory that did not move: the usual
/// case) is applied in place: the staged image is moved over and only the
/// new blocks are written, then it is read back and checked. Those go last,
/// after the deltas that read staged blocks elsewhere. Returns the stats
/// and how many images were patched in place.
pub fn assemble_final(
    dir: &Path,
    staged: &Staged,
    max: u64,
) -> Result<(DeltaStats, usize), PreCopyError> {
    let mut in_place = Vec::new();
    for name in entries(dir)? {
        let Some(image) = name.strip_suffix(delta::SUFFIX) else {
            continue;
        };
        let Some(i) = staged
            .files
            .iter()
            .position(|(p, _)| p.file_name().is_some_and(|n| n == image))
        else {
            continue;
        };
        let (path, first) = &staged.files[i];
        let end = staged
            .files
            .get(i + 1)
            .map_or(staged.index.len() as u64, |(_, f)| *f);
        let len = fs::metadata(path).map_err(io_err("reading", path))?.len();
        let src = dir.join(&name);
        let input = File::open(&src).map_err(io_err("opening", &src))?;
        let at = |b: u64| {
            (first + b < end)
                .then(|| staged.index.hash_at(first + b).copied())
                .flatten()
        };
        let ok = delta::positional(BufReader::with_capacity(1 << 20, input), len, at).map_err(
            |source| PreCopyError::Delta {
                path: src.clone(),
                source,
            },
        )?;
        if ok {
            in_place.push((name.clone(), image.to_owned(), path.clone()));
        }
    }
    // The others first: they may read staged blocks of any image.
    let tmp = dir.join(".in-place");
    if !in_place.is_empty() {
        fresh_dir(&tmp)?;
        for (name, _, _) in &in_place {
            let (from, to) = (dir.join(name), tmp.join(name));
            fs::rename(&from, &to).map_err(io_err("moving", &from))?;
        }
    }
    let (mut total, _) = assemble(dir, dir, staged, max)?;
    let mut left = max.saturating_sub(total.bytes);
    for (name, image, staged_path) in &in_place {
        let src = tmp.join(name);
        let dst = dir.join(image);
        fs::rename(staged_path, &dst).map_err(io_err("moving", staged_path))?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dst)
            .map_err(io_err("opening", &dst))?;
        let input = File::open(&src).map_err(io_err("opening", &src))?;
        let st = delta::patch(BufReader::with_capacity(1 << 20, input), &file, left).map_err(
            |source| PreCopyError::Delta {
                path: dst.clone(),
                source,
            },
        )?;
        left = left.saturating_sub(st.bytes);
        total.add(st);
    }
    if !in_place.is_empty() {
        fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
    }
    Ok((total, in_place.len()))
}

/// The images a round assembled, as the next round's [`Staged`].
pub fn staged_from(written: Vec<Assembled>) -> Staged {
    let mut files = Vec::with_capacity(written.len());
    let mut all = Vec::new();
    for (path, hashes) in written {
        files.push((path, all.len() as u64));
        all.extend(hashes);
    }
    Staged {
        index: BlockIndex::new(all),
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rounds_repeat_while_the_delta_halves_at_most_three() {
        let total = 256 * MIB;
        assert_eq!(next_after(&[], total), Next::Round);
        // After the first round there is nothing to compare yet.
        assert_eq!(next_after(&[total], total), Next::Round);
        // Halved, and still large: once more.
        assert_eq!(next_after(&[total, 100 * MIB], total), Next::Round);
        // Small enough: stop.
        assert_eq!(next_after(&[total, MIB], total), Next::FinalDelta);
        // Did not halve: stop.
        assert_eq!(
            next_after(&[total, 100 * MIB, 60 * MIB], total),
            Next::FinalDelta
        );
        assert_eq!(
            next_after(&[total, 100 * MIB, 40 * MIB], total),
            Next::FinalDelta
        );
        // The bound.
        assert_eq!(
            next_after(&[total, 100 * MIB, 10 * MIB], total),
            Next::FinalDelta
        );
    }

    #[test]
    fn a_workload_that_rewrites_everything_falls_back_to_stop_and_copy() {
        let total = 256 * MIB;
        let next = next_after(&[total, total - MIB], total);
        assert!(
            matches!(&next, Next::FinalWhole { note } if note.contains("stop and copy")),
            "{next:?}"
        );
        // Half rewritten: the final delta still saves the other half.
        assert_eq!(
            next_after(&[total, total / 2 + MIB], total),
            Next::FinalDelta
        );
    }

    #[test]
    fn only_containers_without_connections_are_pre_copied() {
        assert_eq!(skip_reason(TcpDump::Plain), None);
        for tcp in [TcpDump::Close, TcpDump::Established] {
            assert!(skip_reason(tcp).unwrap().contains("established TCP"));
        }
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-precopy-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Two rounds and a final over real folders: the target ends with the
    /// final dump's images byte for byte, having received few literal blocks.
    #[test]
    fn rounds_and_final_assemble_the_final_images() {
        let root = temp("rounds");
        let (dump, send, recv, pre, ckpt, out) = (
            root.join("dump"),
            root.join("send"),
            root.join("recv"),
            root.join("pre"),
            root.join("ckpt"),
            root.join("final"),
        );
        // Round 1: two page images and a metadata image.
        fs::create_dir_all(&dump).unwrap();
        let p1 = noise(40 * BLOCK, 1);
        let p2 = noise(8 * BLOCK + 100, 2);
        fs::write(dump.join("pages-1.img"), &p1).unwrap();
        fs::write(dump.join("pages-2.img"), &p2).unwrap();
        fs::write(dump.join("core-1.img"), b"core").unwrap();
        let (st, hashes) = encode_round(&dump, &send, &Known::default()).unwrap();
        assert_eq!(st.literal_blocks, 40 + 9);
        assert_eq!(hashes.len(), 48);
        assert_eq!(
            entries(&send).unwrap(),
            ["pages-1.img.delta", "pages-2.img.delta"]
        );
        // The target assembles round 1 from nothing.
        fs::rename(&send, &recv).unwrap();
        fs::create_dir_all(&pre).unwrap();
        let (_, written) = assemble(&recv, &pre, &Staged::default(), u64::MAX).unwrap();
        let staged = staged_from(written);
        assert_eq!(fs::read(pre.join("pages-1.img")).unwrap(), p1);
        assert_eq!(staged.blocks(), 48);
        let known = Known::new(hashes);

        // The final dump: pages moved (a block in front), one rewritten.
        fs::create_dir_all(ckpt.join("sub")).unwrap();
        let mut f1 = noise(BLOCK, 10);
        f1.extend_from_slice(&p1);
        f1[20 * BLOCK] ^= 0x55;
        fs::write(ckpt.join("pages-1.img"), &f1).unwrap();
        fs::write(ckpt.join("pages-2.img"), &p2).unwrap();
        fs::write(ckpt.join("core-1.img"), b"core2").unwrap();
        fs::write(ckpt.join("sub/state.tar"), b"files").unwrap();
        let st = encode_final(&ckpt, &out, &known).unwrap();
        assert_eq!(st.literal_blocks, 1 + 1 + 1, "new, rewritten, short tail");
        assert_eq!(
            fs::read(ckpt.join("pages-1.img")).unwrap(),
            f1,
            "the original stays whole"
        );
        assert_eq!(fs::read(out.join("sub/state.tar")).unwrap(), b"files");
        // The target assembles next to the other images: pages-1.img moved
        // (copied from staged blocks), pages-2.img did not (patched in
        // place: the staged copy is gone from `pre`).
        let (st, in_place) = assemble_final(&out, &staged, u64::MAX).unwrap();
        assert_eq!((st.literal_blocks, in_place), (3, 1));
        assert!(!pre.join("pages-2.img").exists());
        assert_eq!(
            entries(&out).unwrap(),
            ["core-1.img", "pages-1.img", "pages-2.img", "sub"]
        );
        assert_eq!(fs::read(out.join("pages-1.img")).unwrap(), f1);
        assert_eq!(fs::read(out.join("pages-2.img")).unwrap(), p2);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_staged_image_changed_under_the_target_fails_the_assembly() {
        let root = temp("corrupt");
        let (dump, send, pre, out) = (
            root.join("dump"),
            root.join("send"),
            root.join("pre"),
            root.join("out"),
        );
        fs::create_dir_all(&dump).unwrap();
        fs::create_dir_all(&pre).unwrap();
        let p = noise(16 * BLOCK, 4);
        fs::write(dump.join("pages-1.img"), &p).unwrap();
        let (_, hashes) = encode_round(&dump, &send, &Known::default()).unwrap();
        let (_, written) = assemble(&send, &pre, &Staged::default(), u64::MAX).unwrap();
        let staged = staged_from(written);
        // The final refers to every block; the staged copy got corrupted.
        encode_final(&dump, &out, &Known::new(hashes)).unwrap();
        let mut bad = p.clone();
        bad[5 * BLOCK + 9] ^= 1;
        fs::write(pre.join("pages-1.img"), &bad).unwrap();
        let err = assemble_final(&out, &staged, u64::MAX).unwrap_err();
        assert!(
            matches!(
                &err,
                PreCopyError::Delta {
                    source: DeltaError::Checksum { .. },
                    ..
                }
            ),
            "{err}"
        );
        // And more content than announced is refused.
        fs::write(pre.join("pages-1.img"), &p).unwrap();
        let _ = fs::remove_file(out.join("pages-1.img"));
        encode_final(&dump, &out, &Known::default()).unwrap();
        let err = assemble_final(&out, &staged, 1000).unwrap_err();
        assert!(
            matches!(
                &err,
                PreCopyError::Delta {
                    source: DeltaError::TooLong { .. },
                    ..
                }
            ),
            "{err}"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
