//! Tar of a checkpoint folder, and an extraction that trusts nothing it reads.
//!
//! A checkpoint is plain files in folders, so that is all either side
//! handles: [`pack_dir`] refuses anything else it finds, and [`unpack_into`]
//! refuses links, devices, fifos, absolute or `..` paths, and anything over
//! [`UnpackLimits`], naming the entry.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::libc;
use tar::{EntryType, Header, HeaderMode};

use super::tarcore::{
    check_end, copy_entry, create_new_file, describe, make_dirs, read_long_name,
    safe_relative_path, CappedReader, CopyError, CountingWriter, MAX_NAME_BYTES, TAKEN,
};
use super::StreamError;

const GIB: u64 = 1 << 30;
/// Mode of the folders an unpack creates.
const DIR_MODE: u32 = 0o755;

/// Writes a tar of the regular files and folders under `dir` to `out`, in
/// sorted order, and returns the number of tar bytes written. Symlinks,
/// devices, fifos and sockets are refused with their path.
pub fn pack_dir(dir: &Path, out: impl Write) -> Result<u64, StreamError> {
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| StreamError::io(format!("reading {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(StreamError::Pack {
            path: dir.to_path_buf(),
            reason: "not a folder".into(),
        });
    }
    let mut builder = tar::Builder::new(CountingWriter::new(out));
    pack_tree(&mut builder, dir, Path::new(""))?;
    let counted = builder
        .into_inner()
        .map_err(|e| StreamError::io("writing the end of the archive", e))?;
    Ok(counted.count())
}

fn pack_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
) -> Result<(), StreamError> {
    let dir = root.join(rel);
    let mut names: Vec<OsString> = fs::read_dir(&dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| StreamError::io(format!("listing {}", dir.display()), e))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| StreamError::io(format!("reading {}", path.display()), e))?;
        let mut header = Header::new_gnu();
        if meta.is_dir() {
            header.set_metadata_in_mode(&meta, HeaderMode::Complete);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(|e| StreamError::io(format!("packing {}", path.display()), e))?;
            pack_tree(builder, root, &rel)?;
        } else if meta.is_file() {
            pack_file(builder, &mut header, &path, &rel)?;
        } else {
            return Err(StreamError::Pack {
                path,
                reason: format!("{} is not a regular file or folder", kind(&meta)),
            });
        }
    }
    Ok(())
}

fn pack_file<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut Header,
    path: &Path,
    rel: &Path,
) -> Result<(), StreamError> {
    // Stat the file actually opened, so a swap for a symlink is noticed.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| StreamError::io(format!("opening {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| StreamError::io(format!("reading {}", path.display()), e))?;
    header.set_metadata_in_mode(&meta, HeaderMode::Complete);
    let size = meta.len();
    let mut data = file.take(size);
    builder
        .append_data(header, rel, &mut data)
        .map_err(|e| StreamError::io(format!("packing {}", path.display()), e))?;
    // A shorter copy than the header says would corrupt the archive.
    if data.limit() != 0 {
        return Err(StreamError::Pack {
            path: path.to_path_buf(),
            reason: "file shrank while it was being packed".into(),
        });
    }
    Ok(())
}

fn kind(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Caps on what [`unpack_into`] accepts. The total cap counts the tar bytes
/// actually read, so it is also the decompression cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackLimits {
    pub max_entry_bytes: u64,
    pub max_total_bytes: u64,
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    /// Checkpoints of big containers are memory-sized: generous caps.
    fn default() -> Self {
        UnpackLimits {
            max_entry_bytes: 64 * GIB,
            max_total_bytes: 64 * GIB,
            max_entries: 100_000,
        }
    }
}

/// Room an incoming checkpoint gets over the source's announced size: CRIU
/// adds metadata images to the memory pages, and the estimate (the
/// container's memory usage) is taken before the checkpoint.
pub const ESTIMATE_HEADROOM: u64 = 256 << 20;

impl UnpackLimits {
    /// Limits for a checkpoint whose source announced about `estimate` bytes,
    /// when the staging filesystem has `free` bytes: at most twice the
    /// estimate plus [`ESTIMATE_HEADROOM`], and never more than `free`, for
    /// one entry and in total. A peer that lies about the size, or sends a
    /// zstd bomb, is stopped there instead of filling the disk.
    pub fn for_checkpoint(estimate: u64, free: u64) -> UnpackLimits {
        let cap = estimate
            .saturating_mul(2)
            .saturating_add(ESTIMATE_HEADROOM)
            .min(free);
        UnpackLimits {
            max_entry_bytes: cap,
            max_total_bytes: cap,
            ..UnpackLimits::default()
        }
    }
}

/// What [`unpack_into`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar headers read, long-name headers included.
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    /// Bytes of file contents written.
    pub file_bytes: u64,
    /// Tar bytes read, up to the end of the input.
    pub bytes_read: u64,
}

/// Extracts a tar stream into `dest` (created if missing), reading the input
/// to its end. Only regular files and folders are created, never outside
/// `dest`, never over an existing file.
pub fn unpack_into(
    input: impl Read,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, StreamError> {
    fs::create_dir_all(dest)
        .map_err(|e| StreamError::io(format!("creating {}", dest.display()), e))?;
    let meta = fs::symlink_metadata(dest)
        .map_err(|e| StreamError::io(format!("reading {}", dest.display()), e))?;
    if !meta.is_dir() {
        return Err(StreamError::Staging {
            path: dest.to_path_buf(),
            reason: "not a folder".into(),
        });
    }
    let mut input = CappedReader::new(input, limits.max_total_bytes);
    let mut stats = UnpackStats::default();
    let mut current = None;
    let result = unpack_entries(&mut input, dest, limits, &mut stats, &mut current)
        .and_then(|()| check_end(&mut input).map_err(StreamError::Archive));
    if input.exceeded() {
        let at = current.map_or(String::new(), |e| format!(" (at entry {e:?})"));
        return Err(StreamError::Archive(format!(
            "more than the total cap of {} bytes{at}",
            limits.max_total_bytes
        )));
    }
    result?;
    stats.bytes_read = input.count();
    Ok(stats)
}

fn unpack_entries<R: Read>(
    input: &mut CappedReader<R>,
    dest: &Path,
    limits: &UnpackLimits,
    stats: &mut UnpackStats,
    current: &mut Option<String>,
) -> Result<(), StreamError> {
    let mut archive = tar::Archive::new(input);
    // Raw: the tar crate would read a GNU long name of any size into memory.
    let entries = archive
        .entries()
        .map_err(|e| StreamError::Archive(format!("reading the archive: {e}")))?
        .raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            let after = current
                .as_ref()
                .map_or(String::new(), |c| format!(" after entry {c:?}"));
            StreamError::Archive(format!("bad tar header{after}: {e}"))
        })?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(StreamError::Archive(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let etype = entry.header().entry_type();
        let size = entry.size();
        if etype.is_gnu_longname() {
            if long_name.is_some() || size > MAX_NAME_BYTES {
                return Err(StreamError::Archive(format!(
                    "bad long-name header of {size} bytes"
                )));
            }
            let name = read_long_name(&mut entry, size)
                .map_err(|e| StreamError::Archive(format!("reading a long name: {e}")))?;
            long_name = Some(name);
            continue;
        }
        let name_bytes = long_name
            .take()
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        *current = Some(name.clone());
        let reject = |reason: String| StreamError::Entry {
            entry: name.clone(),
            reason,
        };
        let rel = safe_relative_path(&name_bytes).map_err(reject)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match etype {
            EntryType::Directory => {
                make_dirs(dest, &rel, DIR_MODE).map_err(reject)?;
                stats.dirs += 1;
            }
            t if t.is_file() => {
                if size > limits.max_entry_bytes {
                    return Err(reject(format!(
                        "{size} bytes is over the per-entry limit of {}",
                        limits.max_entry_bytes
                    )));
                }
                if rel.as_os_str().is_empty() {
                    return Err(reject("a file needs a name".into()));
                }
                if let Some(parent) = rel.parent() {
                    make_dirs(dest, parent, DIR_MODE).map_err(reject)?;
                }
                let path = dest.join(&rel);
                let file = create_new_file(&path, mode | 0o600).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => reject(TAKEN.into()),
                    _ => StreamError::io(format!("creating {}", path.display()), e),
                })?;
                let written = copy_entry(&mut entry, &file).map_err(|e| match e {
                    CopyError::Read(e) => reject(format!("reading its data: {e}")),
                    CopyError::Write(e) => {
                        StreamError::io(format!("writing {}", path.display()), e)
                    }
                })?;
                if written != size {
                    return Err(reject(format!("truncated: {written} of {size} bytes")));
                }
                stats.files += 1;
                stats.file_bytes += written;
            }
            other => {
                return Err(reject(format!(
                    "{} entries are not allowed",
                    describe(other)
                )))
            }
        }
    }
    if long_name.is_some() {
        return Err(StreamError::Archive(
            "a long-name header ends the archive".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::{end_archive, noise, raw_entry, tree, TempDir};
    use std::os::unix::fs::symlink;

    const MIB: u64 = 1 << 20;

    fn sample_dir(root: &Path) {
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("core-1.img"), b"core").unwrap();
        fs::write(root.join("sub/pages-1.img"), noise(300_000, 7)).unwrap();
        fs::write(root.join("sub/deeper/zero.img"), b"").unwrap();
        let long = "n".repeat(150);
        fs::write(root.join(&long), b"long name").unwrap();
    }

    fn read_all(root: &Path) -> Vec<(String, Vec<u8>)> {
        tree(root)
            .into_iter()
            .map(|rel| {
                let path = root.join(&rel);
                let data = if path.is_file() {
                    fs::read(&path).unwrap()
                } else {
                    Vec::new()
                };
                (rel, data)
            })
            .collect()
    }

    #[test]
    fn pack_then_unpack_round_trips() {
        let src = TempDir::new("pack-src");
        sample_dir(src.path());
        let mut tar_bytes = Vec::new();
        let written = pack_dir(src.path(), &mut tar_bytes).unwrap();
        assert_eq!(written, tar_bytes.len() as u64);

        let dest = TempDir::new("pack-dest");
        let stats =
            unpack_into(&tar_bytes[..], &dest.join("out"), &UnpackLimits::default()).unwrap();
        assert_eq!(read_all(src.path()), read_all(&dest.join("out")));
        assert_eq!(stats.bytes_read, written);
        assert_eq!(stats.files, 4);
        assert_eq!(stats.dirs, 3);
        assert_eq!(stats.file_bytes, 300_000 + 4 + 9);
    }

    #[test]
    fn pack_is_deterministic() {
        let src = TempDir::new("pack-det");
        sample_dir(src.path());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pack_dir(src.path(), &mut a).unwrap();
        pack_dir(src.path(), &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn pack_refuses_a_symlink_naming_it() {
        let src = TempDir::new("pack-link");
        fs::write(src.join("a.img"), b"a").unwrap();
        symlink("/etc/passwd", src.join("passwd")).unwrap();
        let err = pack_dir(src.path(), io::sink()).unwrap_err().to_string();
        assert!(err.contains("passwd") && err.contains("symlink"), "{err}");
    }

    #[test]
    fn pack_refuses_a_fifo_naming_it() {
        let src = TempDir::new("pack-fifo");
        let fifo = src.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = pack_dir(src.path(), io::sink()).unwrap_err().to_string();
        assert!(err.contains("pipe") && err.contains("fifo"), "{err}");
    }

    #[test]
    fn rejects_parent_components() {
        for name in ["../escaped", "a/../../escaped", "../../etc/x"] {
            let mut t = Vec::new();
            raw_entry(&mut t, b"ok.img", EntryType::Regular, b"", b"fine");
            raw_entry(&mut t, name.as_bytes(), EntryType::Regular, b"", b"evil");
            end_archive(&mut t);
            let err = rejected(&t[..], &UnpackLimits::default(), &["dest/ok.img"]);
            assert!(
                err.contains(&format!("{name:?}")) && err.contains(".."),
                "{err}"
            );
        }
    }

    #[test]
    fn rejects_absolute_paths() {
        let mut t = Vec::new();
        raw_entry(&mut t, b"/etc/x", EntryType::Regular, b"", b"evil");
        end_archive(&mut t);
        let err = rejected(&t[..], &UnpackLimits::default(), &[]);
        assert!(
            err.contains("\"/etc/x\"") && err.contains("absolute"),
            "{err}"
        );
    }

    #[test]
    fn rejects_links_devices_and_fifos() {
        let cases: [(EntryType, &[u8], &str); 5] = [
            (EntryType::Symlink, b"/", "symlink"),
            (EntryType::Link, b"/etc/passwd", "hard link"),
            (EntryType::Char, b"", "character device"),
            (EntryType::Block, b"", "block device"),
            (EntryType::Fifo, b"", "fifo"),
        ];
        for (etype, link, what) in cases {
            let mut t = Vec::new();
            raw_entry(&mut t, b"thing", etype, link, b"");
            raw_entry(
                &mut t,
                b"thing/x",
                EntryType::Regular,
                b"",
                b"through the link",
            );
            end_archive(&mut t);
            let err = rejected(&t[..], &UnpackLimits::default(), &[]);
            assert!(
                err.contains("\"thing\"") && err.contains(what),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn never_follows_a_symlink_already_in_dest() {
        let root = TempDir::new("unpack-prelink");
        let outside = root.join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = root.join("dest");
        fs::create_dir(&dest).unwrap();
        symlink(&outside, dest.join("dir")).unwrap();
        symlink(outside.join("file"), dest.join("file")).unwrap();
        for name in [&b"dir/x"[..], b"file"] {
            let mut t = Vec::new();
            raw_entry(&mut t, name, EntryType::Regular, b"", b"evil");
            end_archive(&mut t);
            let err = unpack_into(&t[..], &dest, &UnpackLimits::default()).unwrap_err();
            let err = err.to_string();
            assert!(err.contains(&*String::from_utf8_lossy(name)), "{err}");
        }
        assert!(tree(&outside).is_empty());
    }

    #[test]
    fn rejects_an_oversize_entry_before_writing_it() {
        let mut t = Vec::new();
        raw_entry(&mut t, b"big.img", EntryType::Regular, b"", &[7u8; 5000]);
        end_archive(&mut t);
        let limits = UnpackLimits {
            max_entry_bytes: 4096,
            ..UnpackLimits::default()
        };
        let err = rejected(&t[..], &limits, &[]);
        assert!(err.contains("\"big.img\"") && err.contains("4096"), "{err}");
    }

    #[test]
    fn rejects_too_many_entries() {
        let mut t = Vec::new();
        for i in 0..5 {
            raw_entry(
                &mut t,
                format!("f{i}").as_bytes(),
                EntryType::Regular,
                b"",
                b"x",
            );
        }
        end_archive(&mut t);
        let limits = UnpackLimits {
            max_entries: 3,
            ..UnpackLimits::default()
        };
        let err = rejected(&t[..], &limits, &["dest/f0", "dest/f1", "dest/f2"]);
        assert!(err.contains("more than 3 entries"), "{err}");
    }

    #[test]
    fn rejects_duplicates_truncation_and_trailing_data() {
        let mut dup = Vec::new();
        raw_entry(&mut dup, b"a", EntryType::Regular, b"", b"one");
        raw_entry(&mut dup, b"a", EntryType::Regular, b"", b"two");
        end_archive(&mut dup);
        let err = rejected(&dup[..], &UnpackLimits::default(), &["dest/a"]);
        assert!(err.contains("\"a\"") && err.contains("duplicate"), "{err}");

        let mut whole = Vec::new();
        raw_entry(&mut whole, b"a", EntryType::Regular, b"", &[1u8; 2000]);
        end_archive(&mut whole);
        let err = rejected(&whole[..1000], &UnpackLimits::default(), &["dest/a"]);
        assert!(err.contains("\"a\"") && err.contains("truncated"), "{err}");
        let err = rejected(&whole[..2048], &UnpackLimits::default(), &["dest/a"]);
        assert!(err.contains("truncated"), "{err}");

        let mut twice = whole.clone();
        twice.extend_from_slice(&whole);
        let err = rejected(&twice[..], &UnpackLimits::default(), &["dest/a"]);
        assert!(err.contains("after the end"), "{err}");
    }

    /// zstd of `n_mib` MiB of `body` produced block by block: no large buffer.
    /// The tar header of a regular file of `size` bytes, with no data.
    fn file_header(path: &str, size: u64) -> Vec<u8> {
        let mut header = Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_size(size);
        header.set_entry_type(EntryType::Regular);
        header.set_cksum();
        header.as_bytes().to_vec()
    }

    fn zstd_stream(head: &[u8], n_mib: u64) -> Vec<u8> {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.write_all(head).unwrap();
        let zeros = vec![0u8; MIB as usize];
        for _ in 0..n_mib {
            enc.write_all(&zeros).unwrap();
        }
        enc.finish().unwrap()
    }

    #[test]
    fn zero_bomb_stops_at_the_total_cap() {
        let limits = UnpackLimits {
            max_total_bytes: 16 * MIB,
            ..UnpackLimits::default()
        };
        // 1 GiB of zeros: the tar ends at the first block, the rest is
        // "padding" that the drain must still count.
        let bomb = zstd_stream(b"", 1024);
        assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());
        let decoder = zstd::stream::read::Decoder::new(&bomb[..]).unwrap();
        let root = TempDir::new("unpack-bomb");
        let err = unpack_into(decoder, &root.join("dest"), &limits).unwrap_err();
        assert!(err.to_string().contains("total cap of 16777216"), "{err}");

        // A file whose header claims 512 MiB, under the entry limit.
        let bomb = zstd_stream(&file_header("huge.img", 512 * MIB), 512);
        let decoder = zstd::stream::read::Decoder::new(&bomb[..]).unwrap();
        let err = rejected(decoder, &limits, &["dest/huge.img"]);
        assert!(
            err.contains("total cap") && err.contains("huge.img"),
            "{err}"
        );
    }

    /// Unpacks `input` into `root/dest`, expecting an error; checks that
    /// nothing but `dest` and what the good entries made appear under
    /// `root`, and that no file outgrew the total cap.
    fn rejected(input: impl Read, limits: &UnpackLimits, allowed: &[&str]) -> String {
        let root = TempDir::new("unpack-bad");
        let err = unpack_into(input, &root.join("dest"), limits)
            .expect_err("archive should be rejected")
            .to_string();
        let mut expected: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        expected.push("dest".into());
        expected.sort();
        assert_eq!(tree(root.path()), expected);
        let written = fs::metadata(root.join("dest/huge.img")).map(|m| m.len());
        assert!(written.map_or(true, |n| n <= limits.max_total_bytes));
        err
    }

    #[test]
    fn checkpoint_limits_follow_the_estimate_and_the_free_space() {
        let l = UnpackLimits::for_checkpoint(100 * MIB, u64::MAX);
        assert_eq!(l.max_total_bytes, 200 * MIB + ESTIMATE_HEADROOM);
        assert_eq!(l.max_entry_bytes, l.max_total_bytes);
        assert_eq!(l.max_entries, UnpackLimits::default().max_entries);
        // Unknown estimate (0): the headroom only.
        assert_eq!(
            UnpackLimits::for_checkpoint(0, u64::MAX).max_total_bytes,
            ESTIMATE_HEADROOM
        );
        // Never over the free space, and no overflow on absurd estimates.
        assert_eq!(
            UnpackLimits::for_checkpoint(u64::MAX, 5 * GIB).max_total_bytes,
            5 * GIB
        );
    }

    #[test]
    fn ten_gib_bomb_stops_at_the_checkpoint_limits() {
        // A source that announced 1 MiB: a 10 GiB file is refused at its
        // header, before any of it is written (files under the entry cap
        // stop at the total cap: `zero_bomb_stops_at_the_total_cap`).
        let limits = UnpackLimits::for_checkpoint(MIB, u64::MAX);
        let bomb = zstd_stream(&file_header("pages-1.img", 10 * GIB), 64);
        let decoder = zstd::stream::read::Decoder::new(&bomb[..]).unwrap();
        let err = rejected(decoder, &limits, &[]);
        assert!(
            err.contains("pages-1.img") && err.contains("per-entry limit"),
            "{err}"
        );
    }

    #[test]
    fn safe_paths() {
        assert_eq!(safe_relative_path(b"./a/b").unwrap(), Path::new("a/b"));
        assert_eq!(safe_relative_path(b"a//b/").unwrap(), Path::new("a/b"));
        assert!(safe_relative_path(b"a/../b").is_err());
        assert!(safe_relative_path(b"/a").is_err());
    }
}
