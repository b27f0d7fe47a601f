//! Block delta of CRIU page images against what the target already holds,
//! without dirty tracking: each 4 KiB block is sent either whole or as the
//! hash of a block the target has, looked up by content (VMAs move, so a
//! block's position says nothing).
//!
//! Sans-I/O over `Read`/`Write`: the encoder needs only the set of hashes
//! the target holds ([`Known`]); the decoder a function that fills a block
//! for a hash (the target's [`BlockIndex`] over its staged images). A delta
//! ends with a checksum of the complete content, which the decoder checks,
//! so a wrong reference fails the job instead of restoring corrupt memory.
//! The checksum is the SHA-256 over each full block's hash (and the bytes of
//! a short last block): both sides hash every block once anyway, so the
//! content is read and hashed once, not twice.
//!
//! Format: `MAGIC`, content length (u64 LE), one record per block (`LITERAL`
//! then the block, the last one possibly short; or `REFERENCE` then the
//! 16-byte hash of a full block), then the 32-byte checksum.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Block size: a page on every platform ferry runs on.
pub const BLOCK: usize = 4096;
/// What a delta file starts with.
pub const MAGIC: &[u8; 8] = b"FRYDLT1\n";
/// The suffix a delta of image `pages-1.img` travels under.
pub const SUFFIX: &str = ".delta";
const LITERAL: u8 = 0;
const REFERENCE: u8 = 1;

/// SHA-256 of a block, truncated to 128 bits.
pub type BlockHash = [u8; 16];

pub fn block_hash(block: &[u8]) -> BlockHash {
    let full = Sha256::digest(block);
    let mut h = [0u8; 16];
    h.copy_from_slice(&full[..16]);
    h
}

/// Whether `name` is a CRIU page image, the only files sent as deltas.
pub fn is_page_image(name: &str) -> bool {
    name.strip_prefix("pages-")
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The hashes of the blocks the target holds (the source's view): a sorted
/// array, 16 bytes a block (4 MiB for 1 GiB of pages).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Known {
    sorted: Vec<BlockHash>,
}

impl Known {
    pub fn new(mut hashes: Vec<BlockHash>) -> Known {
        hashes.sort_unstable();
        hashes.dedup();
        hashes.shrink_to_fit();
        Known { sorted: hashes }
    }

    pub fn contains(&self, h: &BlockHash) -> bool {
        self.sorted.binary_search(h).is_ok()
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Heap bytes the index holds.
    pub fn heap_bytes(&self) -> usize {
        self.sorted.capacity() * std::mem::size_of::<BlockHash>()
    }
}

/// Where each block the target holds is (the target's view): the hash of
/// every block in order (`block` numbers the blocks of the staged images
/// one after another), and the block numbers sorted by hash; 20 bytes a
/// block (5 MiB for 1 GiB of pages).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    hashes: Vec<BlockHash>,
    by_hash: Vec<u32>,
}

impl BlockIndex {
    /// From the hashes of blocks 0, 1, 2, ... in order.
    pub fn new(hashes: Vec<BlockHash>) -> BlockIndex {
        let mut by_hash: Vec<u32> = (0..hashes.len() as u32).collect();
        by_hash.sort_unstable_by_key(|&i| hashes[i as usize]);
        let mut hashes = hashes;
        hashes.shrink_to_fit();
        BlockIndex { hashes, by_hash }
    }

    /// A block with this content.
    pub fn lookup(&self, h: &BlockHash) -> Option<u32> {
        self.by_hash
            .binary_search_by(|&i| self.hashes[i as usize].cmp(h))
            .ok()
            .map(|at| self.by_hash[at])
    }

    /// The hash of block `block`.
    pub fn hash_at(&self, block: u64) -> Option<&BlockHash> {
        usize::try_from(block).ok().and_then(|b| self.hashes.get(b))
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.hashes.capacity() * std::mem::size_of::<BlockHash>()
            + self.by_hash.capacity() * std::mem::size_of::<u32>()
    }
}

/// What one encode or decode handled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeltaStats {
    /// Length of the complete content.
    pub bytes: u64,
    pub blocks: u64,
    /// Blocks sent whole.
    pub literal_blocks: u64,
    /// Bytes of the delta itself.
    pub delta_bytes: u64,
}

impl DeltaStats {
    pub fn add(&mut self, o: DeltaStats) {
        self.bytes += o.bytes;
        self.blocks += o.blocks;
        self.literal_blocks += o.literal_blocks;
        self.delta_bytes += o.delta_bytes;
    }

    /// Bytes of the blocks sent whole.
    pub fn literal_bytes(&self) -> u64 {
        (self.literal_blocks * BLOCK as u64).min(self.bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a block delta (bad magic)")]
    Magic,
    #[error("delta content of {len} bytes, over the {max} byte limit")]
    TooLong { len: u64, max: u64 },
    #[error("delta record {record} has unknown tag {tag}")]
    Tag { record: u64, tag: u8 },
    #[error("delta refers to block {hash} that is not here")]
    Unknown { hash: String },
    #[error("assembled content does not match its checksum (sent {sent}, assembled {got})")]
    Checksum { sent: String, got: String },
    #[error("delta has bytes after its checksum")]
    Trailing,
}

/// Reads `len` bytes of content from `input` and writes their delta against
/// `known` to `out`; pushes the hash of every full block to `hashes` (what
/// the target holds once it decoded this).
pub fn encode(
    mut input: impl Read,
    len: u64,
    known: &Known,
    mut out: impl Write,
    hashes: &mut Vec<BlockHash>,
) -> io::Result<DeltaStats> {
    let mut st = DeltaStats {
        bytes: len,
        ..DeltaStats::default()
    };
    out.write_all(MAGIC)?;
    out.write_all(&len.to_le_bytes())?;
    st.delta_bytes = 16;
    let mut sum = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        let block = &mut buf[..n];
        input.read_exact(block)?;
        left -= n as u64;
        st.blocks += 1;
        let h = (n == BLOCK).then(|| block_hash(block));
        match &h {
            Some(h) => sum.update(h),
            None => sum.update(&*block),
        }
        if let Some(h) = h {
            hashes.push(h);
            if known.contains(&h) {
                out.write_all(&[REFERENCE])?;
                out.write_all(&h)?;
                st.delta_bytes += 17;
                continue;
            }
        }
        out.write_all(&[LITERAL])?;
        out.write_all(block)?;
        st.literal_blocks += 1;
        st.delta_bytes += 1 + n as u64;
    }
    out.write_all(&sum.finalize())?;
    st.delta_bytes += 32;
    Ok(st)
}

/// Writes the content of the delta `input` to `out`, filling referenced
/// blocks with `fetch` (false: not here), refusing content over `max`
/// bytes, and checking the checksum. Pushes the hash of every full block to
/// `hashes`.
pub fn decode(
    mut input: impl Read,
    max: u64,
    mut fetch: impl FnMut(&BlockHash, &mut [u8]) -> io::Result<bool>,
    mut out: impl Write,
    hashes: &mut Vec<BlockHash>,
) -> Result<DeltaStats, DeltaError> {
    let mut head = [0u8; 16];
    input.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(DeltaError::Magic);
    }
    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if len > max {
        return Err(DeltaError::TooLong { len, max });
    }
    let mut st = DeltaStats {
        bytes: len,
        delta_bytes: 16,
        ..DeltaStats::default()
    };
    let mut sum = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        let mut tag = [0u8];
        input.read_exact(&mut tag)?;
        match tag[0] {
            LITERAL => {
                input.read_exact(&mut buf[..n])?;
                st.literal_blocks += 1;
                st.delta_bytes += 1 + n as u64;
            }
            REFERENCE if n == BLOCK => {
                let mut h = [0u8; 16];
                input.read_exact(&mut h)?;
                st.delta_bytes += 17;
                if !fetch(&h, &mut buf)? {
                    return Err(DeltaError::Unknown {
                        hash: hex::encode(h),
                    });
                }
            }
            tag => {
                return Err(DeltaError::Tag {
                    record: st.blocks,
                    tag,
                })
            }
        }
        let block = &buf[..n];
        if n == BLOCK {
            let h = block_hash(block);
            sum.update(h);
            hashes.push(h);
        } else {
            sum.update(block);
        }
        out.write_all(block)?;
        left -= n as u64;
        st.blocks += 1;
    }
    let mut sent = [0u8; 32];
    input.read_exact(&mut sent)?;
    st.delta_bytes += 32;
    let got = sum.finalize();
    if got[..] != sent[..] {
        return Err(DeltaError::Checksum {
            sent: hex::encode(sent),
            got: hex::encode(got),
        });
    }
    if input.read(&mut [0u8])? != 0 {
        return Err(DeltaError::Trailing);
    }
    Ok(st)
}

/// Whether delta `input` can be applied in place to a file holding the
/// blocks whose hashes `at` gives by position (`at(i)`: block i's, `None`
/// past the end): its content is `len` bytes long (the file's length) and
/// every reference names the block already at its own position. Reads the
/// delta through, literal blocks included.
pub fn positional(
    mut input: impl Read,
    len: u64,
    at: impl Fn(u64) -> Option<BlockHash>,
) -> Result<bool, DeltaError> {
    let got = read_head(&mut input)?;
    if got != len {
        return Ok(false);
    }
    let mut buf = vec![0u8; BLOCK];
    let (mut left, mut i) = (len, 0u64);
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        let mut tag = [0u8];
        input.read_exact(&mut tag)?;
        match tag[0] {
            LITERAL => input.read_exact(&mut buf[..n])?,
            REFERENCE if n == BLOCK => {
                let mut h = [0u8; 16];
                input.read_exact(&mut h)?;
                if at(i) != Some(h) {
                    return Ok(false);
                }
            }
            tag => return Err(DeltaError::Tag { record: i, tag }),
        }
        left -= n as u64;
        i += 1;
    }
    Ok(true)
}

fn read_head(input: &mut impl Read) -> Result<u64, DeltaError> {
    let mut head = [0u8; 16];
    input.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(DeltaError::Magic);
    }
    Ok(u64::from_le_bytes(head[8..].try_into().expect("8 bytes")))
}

/// Applies delta `input` in place to `file` (for which [`positional`] said
/// yes): writes its literal blocks at their place, then reads the whole
/// file back and checks the delta's checksum against what is on disk.
pub fn patch(
    mut input: impl Read,
    file: &std::fs::File,
    max: u64,
) -> Result<DeltaStats, DeltaError> {
    use std::os::unix::fs::FileExt;
    let len = read_head(&mut input)?;
    if len > max {
        return Err(DeltaError::TooLong { len, max });
    }
    let mut st = DeltaStats {
        bytes: len,
        delta_bytes: 16,
        ..DeltaStats::default()
    };
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        let mut tag = [0u8];
        input.read_exact(&mut tag)?;
        match tag[0] {
            LITERAL => {
                input.read_exact(&mut buf[..n])?;
                file.write_all_at(&buf[..n], st.blocks * BLOCK as u64)?;
                st.literal_blocks += 1;
                st.delta_bytes += 1 + n as u64;
            }
            REFERENCE if n == BLOCK => {
                input.read_exact(&mut [0u8; 16])?;
                st.delta_bytes += 17;
            }
            tag => {
                return Err(DeltaError::Tag {
                    record: st.blocks,
                    tag,
                })
            }
        }
        left -= n as u64;
        st.blocks += 1;
    }
    file.set_len(len)?;
    let mut sent = [0u8; 32];
    input.read_exact(&mut sent)?;
    st.delta_bytes += 32;
    if input.read(&mut [0u8])? != 0 {
        return Err(DeltaError::Trailing);
    }
    // What is on disk now, not what should be.
    let mut sum = Sha256::new();
    let mut big = vec![0u8; 256 * BLOCK];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(big.len() as u64) as usize;
        file.read_exact_at(&mut big[..n], at)?;
        for block in big[..n].chunks(BLOCK) {
            if block.len() == BLOCK {
                sum.update(block_hash(block));
            } else {
                sum.update(block);
            }
        }
        at += n as u64;
    }
    let got = sum.finalize();
    if got[..] != sent[..] {
        return Err(DeltaError::Checksum {
            sent: hex::encode(sent),
            got: hex::encode(got),
        });
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise: distinct blocks.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// What the target holds after receiving `old` in full.
    struct Target {
        data: Vec<u8>,
        index: BlockIndex,
    }

    impl Target {
        fn holding(data: &[u8]) -> (Target, Known) {
            let hashes: Vec<BlockHash> = data.chunks_exact(BLOCK).map(block_hash).collect();
            let t = Target {
                data: data.to_vec(),
                index: BlockIndex::new(hashes.clone()),
            };
            (t, Known::new(hashes))
        }

        fn decode(&self, delta: &[u8]) -> Result<(Vec<u8>, DeltaStats), DeltaError> {
            let mut out = Vec::new();
            let st = decode(
                delta,
                u64::MAX,
                |h, buf| {
                    Ok(match self.index.lookup(h) {
                        Some(b) => {
                            let at = b as usize * BLOCK;
                            buf.copy_from_slice(&self.data[at..at + BLOCK]);
                            true
                        }
                        None => false,
                    })
                },
                &mut out,
                &mut Vec::new(),
            )?;
            Ok((out, st))
        }
    }

    fn encode_vec(new: &[u8], known: &Known) -> (Vec<u8>, DeltaStats, Vec<BlockHash>) {
        let mut delta = Vec::new();
        let mut hashes = Vec::new();
        let st = encode(new, new.len() as u64, known, &mut delta, &mut hashes).unwrap();
        assert_eq!(st.delta_bytes, delta.len() as u64);
        (delta, st, hashes)
    }

    #[test]
    fn identical_content_is_all_references() {
        let old = noise(64 * BLOCK, 1);
        let (target, known) = Target::holding(&old);
        let (delta, st, _) = encode_vec(&old, &known);
        assert_eq!((st.blocks, st.literal_blocks), (64, 0));
        assert_eq!(delta.len(), 16 + 64 * 17 + 32);
        let (back, dst) = target.decode(&delta).unwrap();
        assert_eq!(back, old);
        assert_eq!(dst, st);
    }

    #[test]
    fn shifted_blocks_are_found_by_content_and_changed_ones_sent() {
        let old = noise(32 * BLOCK, 2);
        let (target, known) = Target::holding(&old);
        // The pages moved by 5 blocks (a VMA grew in front), one block was
        // rewritten, and a short tail follows.
        let mut new = noise(5 * BLOCK, 3);
        new.extend_from_slice(&old);
        new[10 * BLOCK + 7] ^= 0xff;
        new.extend_from_slice(&noise(100, 4));
        let (delta, st, hashes) = encode_vec(&new, &known);
        assert_eq!(st.blocks, 38);
        assert_eq!(st.literal_blocks, 5 + 1 + 1);
        assert_eq!(hashes.len(), 37, "the short tail has no hash");
        let (back, _) = target.decode(&delta).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn all_new_content_is_sent_whole() {
        let (target, known) = Target::holding(&noise(16 * BLOCK, 5));
        let new = noise(16 * BLOCK, 6);
        let (delta, st, _) = encode_vec(&new, &known);
        assert_eq!(st.literal_blocks, 16);
        assert_eq!(delta.len(), 16 + 16 * (BLOCK + 1) + 32);
        assert_eq!(target.decode(&delta).unwrap().0, new);
        // And against nothing at all (the first round).
        let (delta, st, _) = encode_vec(&new, &Known::default());
        assert_eq!(st.literal_blocks, 16);
        assert_eq!(Target::holding(&[]).0.decode(&delta).unwrap().0, new);
    }

    #[test]
    fn empty_content_round_trips() {
        let (delta, st, _) = encode_vec(&[], &Known::default());
        assert_eq!((st.blocks, delta.len()), (0, 48));
        assert_eq!(
            Target::holding(&[]).0.decode(&delta).unwrap().0,
            Vec::<u8>::new()
        );
    }

    #[test]
    fn a_wrong_block_fails_the_checksum() {
        let old = noise(8 * BLOCK, 7);
        let (mut target, known) = Target::holding(&old);
        let (delta, _, _) = encode_vec(&old, &known);
        // The target's copy of block 3 differs from what the hash says.
        target.data[3 * BLOCK] ^= 1;
        let err = target.decode(&delta).unwrap_err();
        assert!(matches!(err, DeltaError::Checksum { .. }), "{err}");
    }

    #[test]
    fn hostile_deltas_are_refused() {
        let old = noise(4 * BLOCK, 8);
        let (target, known) = Target::holding(&old);
        let (delta, _, _) = encode_vec(&old, &known);
        // A reference the target does not have.
        let (other, _) = Target::holding(&noise(4 * BLOCK, 9));
        assert!(matches!(
            other.decode(&delta),
            Err(DeltaError::Unknown { .. })
        ));
        // Bad magic, a bad tag, truncation, trailing bytes, a huge length.
        let mut bad = delta.clone();
        bad[0] = b'X';
        assert!(matches!(target.decode(&bad), Err(DeltaError::Magic)));
        let mut bad = delta.clone();
        bad[16] = 9;
        assert!(matches!(
            target.decode(&bad),
            Err(DeltaError::Tag { record: 0, tag: 9 })
        ));
        assert!(matches!(
            target.decode(&delta[..delta.len() - 1]),
            Err(DeltaError::Io(_))
        ));
        let mut bad = delta.clone();
        bad.push(0);
        assert!(matches!(target.decode(&bad), Err(DeltaError::Trailing)));
        let mut out = Vec::new();
        let err = decode(&delta[..], 100, |_, _| Ok(false), &mut out, &mut Vec::new());
        assert!(
            matches!(err, Err(DeltaError::TooLong { len, max: 100 }) if len == 4 * BLOCK as u64)
        );
        // A reference as the short last block is not a thing.
        let mut short = MAGIC.to_vec();
        short.extend_from_slice(&10u64.to_le_bytes());
        short.push(REFERENCE);
        assert!(matches!(target.decode(&short), Err(DeltaError::Tag { .. })));
    }

    #[test]
    fn a_positional_delta_patches_the_old_file_in_place() {
        let old = noise(16 * BLOCK, 11);
        let (_, known) = Target::holding(&old);
        let hashes: Vec<BlockHash> = old.chunks_exact(BLOCK).map(block_hash).collect();
        let at = |i: u64| hashes.get(i as usize).copied();
        let mut new = old.clone();
        new[3 * BLOCK + 1] ^= 0x80;
        let (delta, _, _) = encode_vec(&new, &known);
        assert!(positional(&delta[..], new.len() as u64, at).unwrap());
        let path = std::env::temp_dir().join(format!("ferry-delta-{}", std::process::id()));
        std::fs::write(&path, &old).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let st = patch(&delta[..], &file, u64::MAX).unwrap();
        assert_eq!(st.literal_blocks, 1);
        assert_eq!(std::fs::read(&path).unwrap(), new);
        // A wrong block on disk fails the checksum.
        std::fs::write(&path, &old).unwrap();
        let mut bad = old.clone();
        bad[9 * BLOCK] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = patch(&delta[..], &file, u64::MAX).unwrap_err();
        assert!(matches!(err, DeltaError::Checksum { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        // Moved blocks or another length are not positional.
        let mut shifted = noise(BLOCK, 12);
        shifted.extend_from_slice(&old[..15 * BLOCK]);
        let (delta, _, _) = encode_vec(&shifted, &known);
        assert!(!positional(&delta[..], shifted.len() as u64, at).unwrap());
        let (delta, _, _) = encode_vec(&old[..8 * BLOCK], &known);
        assert!(!positional(&delta[..], old.len() as u64, at).unwrap());
    }

    #[test]
    fn page_images_are_named_pages_n_img() {
        assert!(is_page_image("pages-1.img"));
        assert!(is_page_image("pages-12.img"));
        for other in [
            "pagemap-1.img",
            "pages-.img",
            "pages-1.img.delta",
            "pages-x.img",
            "core-1.img",
        ] {
            assert!(!is_page_image(other), "{other}");
        }
    }

    #[test]
    fn indexes_for_a_gib_cost_a_few_mib() {
        // 1 GiB of pages: 262,144 blocks.
        let n = 262_144usize;
        let hashes: Vec<BlockHash> = (0..n as u64)
            .map(|i| block_hash(&i.to_le_bytes()))
            .collect();
        let index = BlockIndex::new(hashes.clone());
        let known = Known::new(hashes.clone());
        assert_eq!((index.len(), known.len()), (n, n));
        assert_eq!(index.heap_bytes(), n * 20, "5 MiB on the target");
        assert_eq!(index.hash_at(7), Some(&hashes[7]));
        assert_eq!(known.heap_bytes(), n * 16, "4 MiB on the source");
        assert_eq!(index.lookup(&hashes[123_456]), Some(123_456));
        assert!(known.contains(&hashes[7]));
        assert!(!known.contains(&block_hash(b"elsewhere")));
        assert_eq!(index.lookup(&block_hash(b"elsewhere")), None);
    }
}
