//! A container's own filesystem changes (its overlay2 upper folder) and a
//! volume's contents as a tar, and an apply that trusts nothing it reads.
//!
//! The upper folder holds what the container wrote since it was created:
//! new and changed files, folders, symlinks, and its deletions in overlayfs'
//! own notation: a whiteout is a character device 0:0 named like the deleted
//! entry, and a folder whose lower contents are hidden carries the xattr
//! `trusted.overlay.opaque=y`. [`pack_tree`] keeps all of that with mode,
//! owner and mtime; [`apply_tree`] recreates it in the upper folder of a
//! created, not yet started container, where overlayfs reads it exactly as
//! on the source.
//!
//! What may be created is listed, everything else is refused with the entry
//! named: folders, regular files, symlinks (created, never followed), fifos,
//! and in an upper folder whiteouts (only as 0:0 character devices). No path
//! leaves the destination, nothing existing is overwritten, and no entry is
//! written through a symlink.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::libc;
use nix::sys::stat::{utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use tar::{EntryType, Header, HeaderMode};

use super::state::StateError;
use crate::stream::tarcore::{
    check_end, copy_entry, create_new_file, describe, make_dirs, read_long_name,
    safe_relative_path, CappedReader, CopyError, CountingWriter, MAX_NAME_BYTES, TAKEN,
};

/// Largest pax extension header accepted (xattrs of one entry).
const MAX_PAX_BYTES: u64 = 64 * 1024;
const PAX_XATTR: &str = "SCHILY.xattr.";
const OPAQUE: &str = "trusted.overlay.opaque";
/// overlayfs bookkeeping that means nothing in another upper folder.
const OVERLAY_SKIPPED: [&str; 4] = [
    "trusted.overlay.origin",
    "trusted.overlay.impure",
    "trusted.overlay.uuid",
    "trusted.overlay.nlink",
];
/// Mode of the folders an apply creates before their own entry sets it.
const DIR_MODE: u32 = 0o700;

/// Which tree a tar describes; decides which entry kinds it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    /// An overlayfs upper folder: whiteouts and opaque folders belong to it.
    Upper,
    /// A volume's folder: plain files, folders, symlinks and fifos.
    Volume,
}

/// What [`pack_tree`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub fifos: u64,
    /// Unix sockets are left out: a socket file cannot travel, its owner
    /// binds it again.
    pub sockets_skipped: u64,
    pub file_bytes: u64,
    pub tar_bytes: u64,
}

/// Caps on what [`apply_tree`] accepts; the total counts tar bytes read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyLimits {
    pub max_total_bytes: u64,
    pub max_entries: u64,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        ApplyLimits {
            max_total_bytes: 64 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// What [`apply_tree`] created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub fifos: u64,
    pub file_bytes: u64,
}

/// Writes a tar of everything under `dir` (the folder itself first, as
/// `./`) to `out`, in sorted order. Hard links become separate files.
pub fn pack_tree(dir: &Path, kind: TreeKind, out: impl Write) -> Result<PackStats, StateError> {
    let meta = fs::symlink_metadata(dir).map_err(|e| StateError::io(dir, "reading", e))?;
    if !meta.is_dir() {
        return Err(StateError::Pack {
            path: dir.to_path_buf(),
            reason: "not a folder".into(),
        });
    }
    let mut packer = Packer {
        builder: tar::Builder::new(CountingWriter::new(out)),
        root: dir,
        kind,
        stats: PackStats::default(),
    };
    packer.dir(Path::new("."), dir, &meta)?;
    packer.tree(Path::new(""))?;
    let mut stats = packer.stats;
    let counted = packer
        .builder
        .into_inner()
        .map_err(|e| StateError::io(dir, "finishing the tar of", e))?;
    stats.tar_bytes = counted.count();
    Ok(stats)
}

/// [`pack_tree`] into the file `out` (its folder created if missing),
/// synced to disk before it returns.
pub fn pack_tree_to_file(dir: &Path, kind: TreeKind, out: &Path) -> Result<PackStats, StateError> {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).map_err(|e| StateError::io(parent, "creating", e))?;
    }
    let file = File::create(out).map_err(|e| StateError::io(out, "creating", e))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, file);
    let stats = pack_tree(dir, kind, &mut w)?;
    let file = w
        .into_inner()
        .map_err(|e| StateError::io(out, "writing", e.into_error()))?;
    file.sync_all()
        .map_err(|e| StateError::io(out, "syncing", e))?;
    Ok(stats)
}

/// About the tar bytes [`pack_tree`] would write for `dir` now (each entry's
/// data rounded up to tar blocks, plus headers): what the source announces
/// before the checkpoint so the target's size caps leave room for it.
/// Symlinks are not followed; unreadable entries count as nothing.
pub fn tree_tar_estimate(dir: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0u64;
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            // Header, and a long-name or pax header to be safe.
            total += 1024;
            if meta.is_dir() {
                total += walk(&entry.path());
            } else if meta.is_file() {
                total += meta.len().div_ceil(512) * 512;
            }
        }
        total
    }
    // The root entry and the end-of-archive blocks.
    2048 + walk(dir)
}

struct Packer<'a, W: Write> {
    builder: tar::Builder<CountingWriter<W>>,
    root: &'a Path,
    kind: TreeKind,
    stats: PackStats,
}

impl<W: Write> Packer<'_, W> {
    fn tree(&mut self, rel: &Path) -> Result<(), StateError> {
        let dir = self.root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| StateError::io(&dir, "listing", e))?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let path = self.root.join(&rel);
            let meta =
                fs::symlink_metadata(&path).map_err(|e| StateError::io(&path, "reading", e))?;
            let t = meta.file_type();
            if t.is_dir() {
                self.dir(&rel, &path, &meta)?;
                self.tree(&rel)?;
            } else if t.is_file() {
                self.file(&rel, &path)?;
            } else if t.is_symlink() {
                let target =
                    fs::read_link(&path).map_err(|e| StateError::io(&path, "reading", e))?;
                let mut header = header_for(&meta);
                self.builder
                    .append_link(&mut header, &rel, &target)
                    .map_err(|e| StateError::io(&path, "packing", e))?;
                self.stats.symlinks += 1;
            } else if t.is_char_device() && is_whiteout(&meta) && self.kind == TreeKind::Upper {
                self.special(&rel, &path, &meta)?;
                self.stats.whiteouts += 1;
            } else if t.is_fifo() {
                self.special(&rel, &path, &meta)?;
                self.stats.fifos += 1;
            } else if t.is_socket() {
                self.stats.sockets_skipped += 1;
            } else {
                let what = if t.is_char_device() {
                    "a character device (only 0:0 whiteouts in a container's layer travel)"
                } else if t.is_block_device() {
                    "a block device"
                } else {
                    "a special file"
                };
                return Err(StateError::Pack {
                    path,
                    reason: format!("{what} cannot travel"),
                });
            }
        }
        Ok(())
    }

    fn dir(&mut self, rel: &Path, path: &Path, meta: &fs::Metadata) -> Result<(), StateError> {
        let xattrs = carried_xattrs(path, self.kind, true)?;
        if xattrs.contains_key(OPAQUE) {
            self.stats.opaque_dirs += 1;
        }
        self.pax(&xattrs, path)?;
        let mut header = header_for(meta);
        header.set_size(0);
        // The root goes in as `./`: the tar crate refuses an empty name.
        let name = if rel == Path::new(".") {
            Path::new("./")
        } else {
            rel
        };
        self.builder
            .append_data(&mut header, name, io::empty())
            .map_err(|e| StateError::io(path, "packing", e))?;
        self.stats.dirs += 1;
        Ok(())
    }

    fn file(&mut self, rel: &Path, path: &Path) -> Result<(), StateError> {
        // Stat the file actually opened, so a swap for a symlink is noticed.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| StateError::io(path, "opening", e))?;
        let meta = file
            .metadata()
            .map_err(|e| StateError::io(path, "reading", e))?;
        let xattrs = carried_xattrs(path, self.kind, false)?;
        self.pax(&xattrs, path)?;
        let mut header = header_for(&meta);
        let size = meta.len();
        let mut data = file.take(size);
        self.builder
            .append_data(&mut header, rel, &mut data)
            .map_err(|e| StateError::io(path, "packing", e))?;
        if data.limit() != 0 {
            return Err(StateError::Pack {
                path: path.to_path_buf(),
                reason: "file shrank while it was being packed".into(),
            });
        }
        self.stats.files += 1;
        self.stats.file_bytes += size;
        Ok(())
    }

    /// A whiteout or a fifo: a header without data.
    fn special(&mut self, rel: &Path, path: &Path, meta: &fs::Metadata) -> Result<(), StateError> {
        let mut header = header_for(meta);
        header.set_size(0);
        self.builder
            .append_data(&mut header, rel, io::empty())
            .map_err(|e| StateError::io(path, "packing", e))
    }

    /// One pax header of `SCHILY.xattr.*` records before the entry it
    /// describes (the tar crate's builder has no xattr support without its
    /// `xattr` feature).
    fn pax(&mut self, xattrs: &BTreeMap<String, Vec<u8>>, path: &Path) -> Result<(), StateError> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let mut data = Vec::new();
        for (name, value) in xattrs {
            pax_record(&mut data, &format!("{PAX_XATTR}{name}"), value);
        }
        let mut header = Header::new_ustar();
        header
            .set_path("././@PaxHeader")
            .map_err(|e| StateError::io(path, "packing xattrs of", e))?;
        header.set_entry_type(EntryType::XHeader);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder
            .append(&header, &data[..])
            .map_err(|e| StateError::io(path, "packing xattrs of", e))
    }
}

fn header_for(meta: &fs::Metadata) -> Header {
    let mut header = Header::new_gnu();
    header.set_metadata_in_mode(meta, HeaderMode::Complete);
    header
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// `"LEN key=value\n"`, where LEN counts the whole record, its own digits too.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while len != base + len.to_string().len() {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The xattrs of `path` that travel. overlayfs' own bookkeeping is dropped,
/// SELinux labels are the target's business; an opaque marker travels on
/// folders of an upper tree; `user.*` and `security.capability` travel.
/// Anything else (redirects, metacopy, ACLs, ...) is refused: the copy
/// would not be what the container saw.
fn carried_xattrs(
    path: &Path,
    kind: TreeKind,
    is_dir: bool,
) -> Result<BTreeMap<String, Vec<u8>>, StateError> {
    let mut out = BTreeMap::new();
    for name in xattr::list(path).map_err(|e| StateError::io(path, "listing xattrs of", e))? {
        if OVERLAY_SKIPPED.contains(&name.as_str()) || name == "security.selinux" {
            continue;
        }
        let value = xattr::get(path, &name)
            .map_err(|e| StateError::io(path, &format!("reading xattr {name} of"), e))?;
        xattr_allowed(&name, &value, kind, is_dir).map_err(|reason| StateError::Pack {
            path: path.to_path_buf(),
            reason,
        })?;
        out.insert(name, value);
    }
    Ok(out)
}

/// Whether an xattr may travel (pack) or be set (apply), or why not.
fn xattr_allowed(name: &str, value: &[u8], kind: TreeKind, is_dir: bool) -> Result<(), String> {
    if name == OPAQUE {
        return if kind == TreeKind::Upper && is_dir && value == b"y" {
            Ok(())
        } else {
            Err(format!(
                "xattr {name}={:?} is only carried as \"y\" on a folder of a container's layer",
                String::from_utf8_lossy(value)
            ))
        };
    }
    if name.starts_with("user.") || (name == "security.capability" && !is_dir) {
        return Ok(());
    }
    Err(format!("xattr {name} cannot travel"))
}

/// Applies a tar made by [`pack_tree`] onto `dest`, an existing folder (an
/// empty upper folder, or an emptied volume). The input is read to its end.
pub fn apply_tree(
    input: impl Read,
    dest: &Path,
    kind: TreeKind,
    limits: &ApplyLimits,
) -> Result<ApplyStats, StateError> {
    let meta = fs::symlink_metadata(dest).map_err(|e| StateError::io(dest, "reading", e))?;
    if !meta.is_dir() {
        return Err(StateError::Pack {
            path: dest.to_path_buf(),
            reason: "the destination is not a folder".into(),
        });
    }
    let mut input = CappedReader::new(input, limits.max_total_bytes);
    let mut applier = Applier {
        dest,
        kind,
        stats: ApplyStats::default(),
        dirs: Vec::new(),
    };
    let mut archive = tar::Archive::new(&mut input);
    // Raw: the tar crate would read a long name or pax header of any size.
    let entries = archive
        .entries()
        .map_err(|e| StateError::Archive(format!("reading the archive: {e}")))?
        .raw(true);
    let mut pending = Pending::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| StateError::Archive(format!("bad tar header: {e}")))?;
        applier.stats.entries += 1;
        if applier.stats.entries > limits.max_entries {
            return Err(StateError::Archive(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let etype = entry.header().entry_type();
        if etype.is_gnu_longname() || etype.is_gnu_longlink() || etype.is_pax_local_extensions() {
            pending.read_extension(&mut entry, etype)?;
            continue;
        }
        let ext = std::mem::take(&mut pending);
        let name = ext.name.unwrap_or_else(|| entry.path_bytes().into_owned());
        let link = ext
            .link
            .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
        let shown = String::from_utf8_lossy(&name).into_owned();
        applier
            .entry(&mut entry, etype, &name, link, ext.xattrs)
            .map_err(|e| e.at_entry(&shown))?;
    }
    if pending != Pending::default() {
        return Err(StateError::Archive(
            "an extension header ends the archive".into(),
        ));
    }
    check_end(&mut input).map_err(StateError::Archive)?;
    applier.finish_dirs()?;
    Ok(applier.stats)
}

/// Extension headers seen before the entry they describe.
#[derive(Default, PartialEq, Eq)]
struct Pending {
    name: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl Pending {
    fn read_extension<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        etype: EntryType,
    ) -> Result<(), StateError> {
        let size = entry.size();
        let (cap, what) = if etype.is_pax_local_extensions() {
            (MAX_PAX_BYTES, "pax")
        } else {
            (MAX_NAME_BYTES, "long-name")
        };
        if size > cap {
            return Err(StateError::Archive(format!(
                "{what} header of {size} bytes is over {cap}"
            )));
        }
        let data = read_long_name(entry, size)
            .map_err(|e| StateError::Archive(format!("reading a {what} header: {e}")))?;
        if etype.is_pax_local_extensions() {
            return self.pax(&data);
        }
        let slot = if etype.is_gnu_longname() {
            &mut self.name
        } else {
            &mut self.link
        };
        if slot.replace(data).is_some() {
            return Err(StateError::Archive(format!("two {what} headers in a row")));
        }
        Ok(())
    }

    /// Only the records [`pack_tree`] writes: `SCHILY.xattr.*`.
    fn pax(&mut self, mut data: &[u8]) -> Result<(), StateError> {
        let bad = |why: &str| StateError::Archive(format!("bad pax header: {why}"));
        while !data.is_empty() {
            let space = data
                .iter()
                .position(|b| *b == b' ')
                .ok_or_else(|| bad("no length"))?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad length"))?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(bad("record length does not fit"));
            }
            let record = &data[space + 1..len - 1];
            let eq = record
                .iter()
                .position(|b| *b == b'=')
                .ok_or_else(|| bad("record without '='"))?;
            let key = std::str::from_utf8(&record[..eq]).map_err(|_| bad("key is not UTF-8"))?;
            let name = key
                .strip_prefix(PAX_XATTR)
                .ok_or_else(|| bad(&format!("record {key:?} is not an xattr")))?;
            if self
                .xattrs
                .insert(name.to_string(), record[eq + 1..].to_vec())
                .is_some()
            {
                return Err(bad(&format!("xattr {name} twice")));
            }
            data = &data[len..];
        }
        Ok(())
    }
}

struct Applier<'a> {
    dest: &'a Path,
    kind: TreeKind,
    stats: ApplyStats,
    /// Folders whose mode and mtime are set last, deepest first: a read-only
    /// folder must still take its children, and each child touches its mtime.
    dirs: Vec<(PathBuf, u32, TimeSpec)>,
}

/// Why one entry failed, before the entry's name is attached.
enum EntryError {
    Refused(String),
    State(StateError),
}

impl EntryError {
    fn at_entry(self, entry: &str) -> StateError {
        match self {
            EntryError::Refused(reason) => StateError::Entry {
                entry: entry.to_string(),
                reason,
            },
            EntryError::State(e) => e,
        }
    }
}

impl From<StateError> for EntryError {
    fn from(e: StateError) -> Self {
        EntryError::State(e)
    }
}

impl Applier<'_> {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        etype: EntryType,
        name: &[u8],
        link: Option<Vec<u8>>,
        xattrs: BTreeMap<String, Vec<u8>>,
    ) -> Result<(), EntryError> {
        let refuse = |reason: String| EntryError::Refused(reason);
        let rel = safe_relative_path(name).map_err(refuse)?;
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| refuse(format!("bad mode: {e}")))?
            & 0o7777;
        let uid = header.uid().map_err(|e| refuse(format!("bad uid: {e}")))?;
        let gid = header.gid().map_err(|e| refuse(format!("bad gid: {e}")))?;
        let mtime = header
            .mtime()
            .map_err(|e| refuse(format!("bad mtime: {e}")))?;
        let owner = (
            Uid::from_raw(u32::try_from(uid).map_err(|_| refuse(format!("uid {uid}")))?),
            Gid::from_raw(u32::try_from(gid).map_err(|_| refuse(format!("gid {gid}")))?),
        );
        let mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        let is_dir = etype == EntryType::Directory;
        for (k, v) in &xattrs {
            xattr_allowed(k, v, self.kind, is_dir).map_err(refuse)?;
            if k == OPAQUE {
                self.stats.opaque_dirs += 1;
            }
        }
        if rel.as_os_str().is_empty() && !is_dir {
            return Err(refuse("only a folder may name the root".into()));
        }
        if let Some(parent) = rel.parent() {
            make_dirs(self.dest, parent, DIR_MODE).map_err(refuse)?;
        }
        let path = self.dest.join(&rel);
        match etype {
            EntryType::Directory => {
                make_dirs(self.dest, &rel, DIR_MODE).map_err(refuse)?;
                self.finish(&path, owner, &xattrs, None)?;
                self.dirs.push((path, mode, mtime));
                self.stats.dirs += 1;
            }
            t if t.is_file() => {
                let file = create_new_file(&path, 0o600).map_err(|e| created_err(&path, e))?;
                let size = entry.size();
                let written = copy_entry(entry, &file).map_err(|e| match e {
                    CopyError::Read(e) => refuse(format!("reading its data: {e}")),
                    CopyError::Write(e) => EntryError::State(StateError::io(&path, "writing", e)),
                })?;
                if written != size {
                    return Err(refuse(format!("truncated: {written} of {size} bytes")));
                }
                self.finish(&path, owner, &xattrs, Some((mode, mtime)))?;
                self.stats.files += 1;
                self.stats.file_bytes += written;
            }
            EntryType::Symlink => {
                let target = link.ok_or_else(|| refuse("a symlink without a target".into()))?;
                if target.is_empty() || target.contains(&0) {
                    return Err(refuse("bad symlink target".into()));
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| created_err(&path, e))?;
                self.finish(&path, owner, &xattrs, None)?;
                set_mtime(&path, mtime)?;
                self.stats.symlinks += 1;
            }
            EntryType::Char => {
                let dev = (header.device_major(), header.device_minor());
                let whiteout = matches!(dev, (Ok(Some(0)), Ok(Some(0))));
                if self.kind != TreeKind::Upper || !whiteout {
                    return Err(refuse(
                        "character devices are not allowed (only 0:0 whiteouts in a container's layer)"
                            .into(),
                    ));
                }
                nix::sys::stat::mknod(&path, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| mknod_err(&path, e))?;
                self.finish(&path, owner, &xattrs, Some((0, mtime)))?;
                self.stats.whiteouts += 1;
            }
            EntryType::Fifo => {
                nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600))
                    .map_err(|e| mknod_err(&path, e))?;
                self.finish(&path, owner, &xattrs, Some((mode, mtime)))?;
                self.stats.fifos += 1;
            }
            other => {
                return Err(refuse(format!(
                    "{} entries are not allowed",
                    describe(other)
                )))
            }
        }
        Ok(())
    }

    /// Owner first (chown clears set-id bits), then xattrs, then the mode
    /// and mtime when given. Never follows a symlink.
    fn finish(
        &self,
        path: &Path,
        (uid, gid): (Uid, Gid),
        xattrs: &BTreeMap<String, Vec<u8>>,
        mode_time: Option<(u32, TimeSpec)>,
    ) -> Result<(), StateError> {
        fchownat(
            AT_FDCWD,
            path,
            Some(uid),
            Some(gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| StateError::io(path, "setting the owner of", e.into()))?;
        for (name, value) in xattrs {
            xattr::set(path, name, value)
                .map_err(|e| StateError::io(path, &format!("setting xattr {name} on"), e))?;
        }
        if let Some((mode, mtime)) = mode_time {
            set_mode(path, mode)?;
            set_mtime(path, mtime)?;
        }
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<(), StateError> {
        // Deepest first: sorting by path puts children after their parent.
        self.dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, mode, mtime) in &self.dirs {
            set_mode(path, *mode)?;
            set_mtime(path, *mtime)?;
        }
        Ok(())
    }
}

/// A failed create: a refusal when the path is taken, else our own error.
fn created_err(path: &Path, e: io::Error) -> EntryError {
    match e.kind() {
        io::ErrorKind::AlreadyExists => EntryError::Refused(TAKEN.into()),
        _ => EntryError::State(StateError::io(path, "creating", e)),
    }
}

fn mknod_err(path: &Path, e: nix::Error) -> EntryError {
    created_err(path, e.into())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StateError> {
    // fchmodat cannot refuse to follow on Linux; the path was just checked
    // to be what this apply created, and symlinks never get here.
    nix::sys::stat::fchmodat(
        AT_FDCWD,
        path,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| StateError::io(path, "setting the mode of", e.into()))
}

fn set_mtime(path: &Path, mtime: TimeSpec) -> Result<(), StateError> {
    utimensat(
        AT_FDCWD,
        path,
        &mtime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| StateError::io(path, "setting the mtime of", e.into()))
}

/// The few xattr calls needed, on paths, never following a symlink (nix has
/// no xattr wrappers).
mod xattr {
    use super::*;

    fn cpath(path: &Path) -> io::Result<CString> {
        CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
    }

    pub(super) fn list(path: &Path) -> io::Result<Vec<String>> {
        let p = cpath(path)?;
        let mut buf = vec![0u8; 1024];
        loop {
            // SAFETY: `p` is a NUL-terminated path and `buf` is writable for
            // `buf.len()` bytes; the kernel writes at most that many.
            let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                buf.truncate(n as usize);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
                Some(libc::ENOTSUP) => return Ok(Vec::new()),
                _ => return Err(e),
            }
            if buf.len() > 1 << 20 {
                return Err(io::Error::other("xattr list over 1 MiB"));
            }
        }
        Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect())
    }

    pub(super) fn get(path: &Path, name: &str) -> io::Result<Vec<u8>> {
        let p = cpath(path)?;
        let n = CString::new(name).map_err(io::Error::other)?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: as in `list`; `n` is a NUL-terminated xattr name.
            let len = unsafe {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if len >= 0 {
                buf.truncate(len as usize);
                return Ok(buf);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ERANGE) || buf.len() > 1 << 16 {
                return Err(e);
            }
            buf.resize(buf.len() * 4, 0);
        }
    }

    pub(super) fn set(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let p = cpath(path)?;
        let n = CString::new(name).map_err(io::Error::other)?;
        // SAFETY: `p` and `n` are NUL-terminated; `value` is readable for
        // its length.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl super::Docker {
    /// About the tar bytes of the container's layer and copied volumes
    /// ([`tree_tar_estimate`]), for the size the source announces.
    pub async fn estimate_state_bytes(
        &self,
        id: &str,
        volumes: &[super::volumes::VolumeSpec],
    ) -> Result<u64, StateError> {
        let mut dirs = vec![self.upper_dir(id).await?];
        for v in volumes.iter().filter(|v| v.copy) {
            dirs.push(self.volume_dir(&v.name).await?);
        }
        super::volumes::blocking(move || Ok(dirs.iter().map(|d| tree_tar_estimate(d)).sum())).await
    }

    /// The container's writable layer: overlay2's `UpperDir`.
    pub async fn upper_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let c = self
            .api()
            .inspect_container(id, None)
            .await
            .map_err(super::docker::engine_err("inspect", id))?;
        let driver = c.graph_driver.unwrap_or_default();
        if driver.name != "overlay2" {
            return Err(StateError::Unsupported(format!(
                "container {id} uses storage driver {:?}; only overlay2 layers can travel",
                driver.name
            )));
        }
        driver
            .data
            .get("UpperDir")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                StateError::Unsupported(format!("container {id} has no overlay2 UpperDir"))
            })
    }

    /// Source, after the checkpoint: packs the stopped container's layer to `out`.
    pub async fn pack_rootfs(&self, id: &str, out: &Path) -> Result<PackStats, StateError> {
        let upper = self.upper_dir(id).await?;
        let out = out.to_path_buf();
        super::volumes::blocking(move || pack_tree_to_file(&upper, TreeKind::Upper, &out)).await
    }

    /// Target, before the restore: applies a [`Docker::pack_rootfs`] tar to
    /// a created, never started container's layer.
    pub async fn apply_rootfs(&self, id: &str, tar: &Path) -> Result<ApplyStats, StateError> {
        let upper = self.upper_dir(id).await?;
        let tar = tar.to_path_buf();
        super::volumes::blocking(move || {
            let file = File::open(&tar).map_err(|e| StateError::io(&tar, "opening", e))?;
            let limits = ApplyLimits {
                max_total_bytes: file.metadata().map(|m| m.len()).unwrap_or(0),
                ..ApplyLimits::default()
            };
            apply_tree(
                io::BufReader::with_capacity(1 << 20, file),
                &upper,
                TreeKind::Upper,
                &limits,
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::{end_archive, noise, raw_entry, TempDir};
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Whiteouts, trusted xattrs and foreign owners need root (the agent
    /// runs as root; so do this project's test machines).
    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Everything about each entry that must survive, as comparable text.
    fn describe_tree(root: &Path) -> Vec<String> {
        fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
            let path = root.join(rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            let t = meta.file_type();
            let mut xs = xattr::list(&path).unwrap();
            xs.retain(|x| !OVERLAY_SKIPPED.contains(&x.as_str()));
            xs.sort();
            let xs: Vec<String> = xs
                .iter()
                .map(|x| format!("{x}={:?}", xattr::get(&path, x).unwrap()))
                .collect();
            let what = if t.is_dir() {
                "dir".to_string()
            } else if t.is_file() {
                format!("file {:x?}", Sha256Lite::of(&fs::read(&path).unwrap()))
            } else if t.is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if t.is_char_device() {
                format!("char {}", meta.rdev())
            } else if t.is_fifo() {
                "fifo".into()
            } else {
                "other".into()
            };
            // A symlink's mode is always 0777 and not settable.
            let mode = if t.is_symlink() {
                0
            } else {
                meta.mode() & 0o7777
            };
            out.push(format!(
                "{} {what} mode={mode:o} {}:{} mtime={} {xs:?}",
                rel.display(),
                meta.uid(),
                meta.gid(),
                meta.mtime()
            ));
            if t.is_dir() {
                let mut names: Vec<_> = fs::read_dir(&path)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                for n in names {
                    walk(root, &rel.join(n), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(root, Path::new(""), &mut out);
        out
    }

    /// A cheap content fingerprint for the comparison above.
    struct Sha256Lite;
    impl Sha256Lite {
        fn of(data: &[u8]) -> (usize, u64) {
            let mut h = 0xcbf29ce484222325u64;
            for b in data {
                h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
            }
            (data.len(), h)
        }
    }

    fn set_time(path: &Path, secs: i64) {
        let t = TimeSpec::new(secs, 0);
        utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn chown(path: &Path, uid: u32, gid: u32) {
        fchownat(
            AT_FDCWD,
            path,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    /// An upper folder as overlayfs leaves it after a container wrote,
    /// changed, deleted and replaced files.
    fn upper_sample(root: &Path) {
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("opt/keep")).unwrap();
        fs::create_dir_all(root.join("data/ro")).unwrap();
        fs::write(root.join("etc/newfile"), b"new\n").unwrap();
        fs::write(root.join("data/big.bin"), noise(200_000, 3)).unwrap();
        fs::write(root.join("data/empty"), b"").unwrap();
        fs::write(root.join("data/ro/inside"), b"x").unwrap();
        fs::write(root.join("usr-bin-tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(
            root.join("usr-bin-tool"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::write(root.join("secret"), b"s").unwrap();
        fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("/etc/newfile", root.join("etc/link")).unwrap();
        symlink("../nowhere/at/all", root.join("data/dangling")).unwrap();
        let long = "l".repeat(180);
        fs::write(root.join("data").join(&long), b"long name").unwrap();
        symlink(format!("/{}", "t".repeat(150)), root.join("data/longlink")).unwrap();
        nix::unistd::mkfifo(&root.join("data/fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        nix::sys::stat::mknod(&root.join("etc/motd"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        xattr::set(&root.join("opt/keep"), OPAQUE, b"y").unwrap();
        fs::write(root.join("opt/keep/c"), b"c").unwrap();
        xattr::set(&root.join("data/big.bin"), "user.origin", b"test").unwrap();
        xattr::set(&root.join("etc"), "trusted.overlay.origin", b"\0\x01").unwrap();
        chown(&root.join("data/big.bin"), 999, 998);
        chown(&root.join("data/dangling"), 1000, 1000);
        chown(&root.join("opt"), 5, 6);
        fs::set_permissions(root.join("data/ro"), fs::Permissions::from_mode(0o555)).unwrap();
        for (i, rel) in [
            "etc/newfile",
            "data/big.bin",
            "etc/link",
            "etc/motd",
            "data/fifo",
            "opt/keep/c",
            "opt/keep",
            "data/ro",
            "etc",
            "opt",
            "data",
            "",
        ]
        .iter()
        .enumerate()
        {
            set_time(&root.join(rel), 1_600_000_000 + i as i64 * 1000);
        }
    }

    fn pack_to_vec(dir: &Path, kind: TreeKind) -> Result<(Vec<u8>, PackStats), StateError> {
        let mut out = Vec::new();
        let stats = pack_tree(dir, kind, &mut out)?;
        Ok((out, stats))
    }

    #[test]
    fn upper_folder_round_trips_with_deletions_owners_modes_and_times() {
        if !is_root() {
            eprintln!("skipped: whiteouts and trusted xattrs need root");
            return;
        }
        let src = TempDir::new("rootfs-src");
        upper_sample(src.path());
        let (tar_bytes, stats) = pack_to_vec(src.path(), TreeKind::Upper).unwrap();
        assert_eq!(stats.tar_bytes, tar_bytes.len() as u64);
        assert_eq!(stats.whiteouts, 1);
        assert_eq!(stats.opaque_dirs, 1);
        assert_eq!(stats.fifos, 1);
        assert_eq!(stats.symlinks, 3);

        let dest = TempDir::new("rootfs-dest");
        let applied = apply_tree(
            &tar_bytes[..],
            dest.path(),
            TreeKind::Upper,
            &ApplyLimits::default(),
        )
        .unwrap();
        assert_eq!(applied.whiteouts, 1);
        assert_eq!(applied.opaque_dirs, 1);
        assert_eq!(applied.files, stats.files);
        assert_eq!(applied.file_bytes, stats.file_bytes);
        assert_eq!(describe_tree(dest.path()), describe_tree(src.path()));
        // overlayfs bookkeeping stays behind.
        assert!(xattr::list(&dest.join("etc")).unwrap().is_empty());
    }

    #[test]
    fn the_estimate_covers_the_tar() {
        let src = TempDir::new("estimate");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), noise(70_001, 4)).unwrap();
        fs::write(src.join("n".repeat(200)), b"x").unwrap();
        symlink("a", src.join("l")).unwrap();
        let (tar_bytes, _) = pack_to_vec(src.path(), TreeKind::Volume).unwrap();
        let estimate = tree_tar_estimate(src.path());
        assert!(
            estimate >= tar_bytes.len() as u64,
            "{estimate} < {}",
            tar_bytes.len()
        );
        assert!(
            estimate < tar_bytes.len() as u64 + 8192,
            "{estimate} is far off"
        );
    }

    #[test]
    fn volume_trees_round_trip_without_root_features() {
        let src = TempDir::new("vol-src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), noise(70_000, 9)).unwrap();
        symlink("b/f", src.join("a/l")).unwrap();
        set_time(&src.join("a/b"), 1_500_000_000);
        fs::set_permissions(src.path(), fs::Permissions::from_mode(0o750)).unwrap();
        let (tar_bytes, _) = pack_to_vec(src.path(), TreeKind::Volume).unwrap();
        let dest = TempDir::new("vol-dest");
        apply_tree(
            &tar_bytes[..],
            dest.path(),
            TreeKind::Volume,
            &ApplyLimits::default(),
        )
        .unwrap();
        assert_eq!(describe_tree(dest.path()), describe_tree(src.path()));
    }

    fn pack_refusal(dir: &Path, kind: TreeKind) -> String {
        pack_to_vec(dir, kind)
            .expect_err("the tree should be refused")
            .to_string()
    }

    #[test]
    fn pack_refuses_what_cannot_travel_naming_it() {
        if !is_root() {
            eprintln!("skipped: devices and trusted xattrs need root");
            return;
        }
        let src = TempDir::new("rootfs-refuse");
        nix::sys::stat::mknod(&src.join("wh"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        let err = pack_refusal(src.path(), TreeKind::Volume);
        assert!(
            err.contains("wh") && err.contains("character device"),
            "{err}"
        );

        let src = TempDir::new("rootfs-refuse-dev");
        let null = nix::sys::stat::makedev(1, 3);
        nix::sys::stat::mknod(&src.join("null"), SFlag::S_IFCHR, Mode::empty(), null).unwrap();
        let err = pack_refusal(src.path(), TreeKind::Upper);
        assert!(
            err.contains("null") && err.contains("character device"),
            "{err}"
        );

        let src = TempDir::new("rootfs-refuse-redirect");
        fs::create_dir(src.join("moved")).unwrap();
        xattr::set(&src.join("moved"), "trusted.overlay.redirect", b"/old").unwrap();
        let err = pack_refusal(src.path(), TreeKind::Upper);
        assert!(
            err.contains("moved") && err.contains("trusted.overlay.redirect"),
            "{err}"
        );
    }

    // Hostile archives ------------------------------------------------------

    fn device(out: &mut Vec<u8>, name: &[u8], etype: EntryType, major: u32, minor: u32) {
        let mut header = Header::new_gnu();
        header.set_path(OsStr::from_bytes(name)).unwrap();
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        header.set_entry_type(etype);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
    }

    fn pax(out: &mut Vec<u8>, records: &[(&str, &[u8])]) {
        let mut data = Vec::new();
        for (k, v) in records {
            pax_record(&mut data, k, v);
        }
        raw_entry(out, b"././@PaxHeader", EntryType::XHeader, b"", &data);
    }

    /// Applies into a fresh `root/dest`, expecting a refusal; returns it and
    /// what exists under `root` afterwards (nothing may escape `dest`).
    fn refused(t: &[u8], kind: TreeKind) -> (String, Vec<String>) {
        let root = TempDir::new("rootfs-hostile");
        fs::create_dir(root.join("dest")).unwrap();
        let err = apply_tree(t, &root.join("dest"), kind, &ApplyLimits::default())
            .expect_err("archive should be refused")
            .to_string();
        (err, crate::stream::testutil::tree(root.path()))
    }

    #[test]
    fn refuses_paths_out_of_the_destination() {
        for name in [&b"../escaped"[..], b"a/../../escaped", b"/etc/x"] {
            let mut t = Vec::new();
            raw_entry(&mut t, name, EntryType::Regular, b"", b"evil");
            end_archive(&mut t);
            let (err, left) = refused(&t, TreeKind::Upper);
            assert!(err.contains(&*String::from_utf8_lossy(name)), "{err}");
            assert_eq!(left, vec!["dest".to_string()]);
        }
    }

    #[test]
    fn never_writes_through_a_symlink_it_created() {
        for second in [&b"l/x"[..], b"l"] {
            let mut t = Vec::new();
            raw_entry(&mut t, b"l", EntryType::Symlink, b"/tmp", b"");
            raw_entry(&mut t, second, EntryType::Regular, b"", b"through the link");
            end_archive(&mut t);
            let (err, left) = refused(&t, TreeKind::Upper);
            assert!(err.contains(&*String::from_utf8_lossy(second)), "{err}");
            assert_eq!(left, vec!["dest".to_string(), "dest/l".to_string()]);
        }
        // A folder entry over the symlink is refused too.
        let mut t = Vec::new();
        raw_entry(&mut t, b"l", EntryType::Symlink, b"/tmp", b"");
        raw_entry(&mut t, b"l", EntryType::Directory, b"", b"");
        end_archive(&mut t);
        let (err, _) = refused(&t, TreeKind::Upper);
        assert!(err.contains("not a folder"), "{err}");
    }

    #[test]
    fn refuses_links_devices_and_non_whiteout_char_devices() {
        type AddEntry = fn(&mut Vec<u8>);
        let cases: [(AddEntry, TreeKind, &str); 4] = [
            (
                |t| raw_entry(t, b"h", EntryType::Link, b"/etc/passwd", b""),
                TreeKind::Upper,
                "hard link",
            ),
            (
                |t| device(t, b"null", EntryType::Char, 1, 3),
                TreeKind::Upper,
                "character devices",
            ),
            (
                |t| device(t, b"sda", EntryType::Block, 8, 0),
                TreeKind::Upper,
                "block device",
            ),
            (
                |t| device(t, b"wh", EntryType::Char, 0, 0),
                TreeKind::Volume,
                "character devices",
            ),
        ];
        for (entry, kind, what) in cases {
            let mut t = Vec::new();
            entry(&mut t);
            end_archive(&mut t);
            let (err, left) = refused(&t, kind);
            assert!(err.contains(what), "{what}: {err}");
            assert_eq!(left, vec!["dest".to_string()], "{what}");
        }
    }

    #[test]
    fn refuses_xattrs_that_are_not_listed() {
        let cases: [(&str, &[u8], EntryType, TreeKind); 5] = [
            (
                "trusted.overlay.redirect",
                b"/x",
                EntryType::Directory,
                TreeKind::Upper,
            ),
            (
                "trusted.overlay.opaque",
                b"y",
                EntryType::Regular,
                TreeKind::Upper,
            ),
            (
                "trusted.overlay.opaque",
                b"y",
                EntryType::Directory,
                TreeKind::Volume,
            ),
            (
                "trusted.overlay.opaque",
                b"x",
                EntryType::Directory,
                TreeKind::Upper,
            ),
            (
                "security.selinux",
                b"label",
                EntryType::Regular,
                TreeKind::Upper,
            ),
        ];
        for (name, value, etype, kind) in cases {
            let mut t = Vec::new();
            pax(&mut t, &[(&format!("{PAX_XATTR}{name}"), value)]);
            raw_entry(&mut t, b"thing", etype, b"", b"");
            end_archive(&mut t);
            let (err, left) = refused(&t, kind);
            assert!(err.contains(name) && err.contains("thing"), "{name}: {err}");
            assert_eq!(left, vec!["dest".to_string()], "{name}");
        }
        // Pax records other than xattrs, and oversized pax headers.
        let mut t = Vec::new();
        pax(&mut t, &[("path", b"../../etc/passwd")]);
        raw_entry(&mut t, b"thing", EntryType::Regular, b"", b"");
        end_archive(&mut t);
        assert!(refused(&t, TreeKind::Upper).0.contains("not an xattr"));
        let mut t = Vec::new();
        raw_entry(
            &mut t,
            b"././@PaxHeader",
            EntryType::XHeader,
            b"",
            &vec![b'1'; 70_000],
        );
        end_archive(&mut t);
        assert!(refused(&t, TreeKind::Upper).0.contains("pax header"));
    }

    #[test]
    fn refuses_duplicates_truncation_trailing_data_and_the_cap() {
        let mut t = Vec::new();
        raw_entry(&mut t, b"a", EntryType::Regular, b"", b"one");
        raw_entry(&mut t, b"a", EntryType::Regular, b"", b"two");
        end_archive(&mut t);
        let (err, _) = refused(&t, TreeKind::Upper);
        assert!(err.contains("\"a\"") && err.contains("duplicate"), "{err}");

        let mut whole = Vec::new();
        raw_entry(&mut whole, b"a", EntryType::Regular, b"", &[1u8; 2000]);
        end_archive(&mut whole);
        assert!(refused(&whole[..1000], TreeKind::Upper)
            .0
            .contains("truncated"));
        let mut twice = whole.clone();
        twice.extend_from_slice(&whole);
        assert!(refused(&twice, TreeKind::Upper).0.contains("after the end"));

        let root = TempDir::new("rootfs-cap");
        let limits = ApplyLimits {
            max_total_bytes: 1024,
            ..ApplyLimits::default()
        };
        let err = apply_tree(&whole[..], root.path(), TreeKind::Upper, &limits).unwrap_err();
        assert!(err.to_string().contains("cap of 1024"), "{err}");
    }

    #[test]
    fn pax_records_count_their_own_length() {
        let mut out = Vec::new();
        pax_record(&mut out, "SCHILY.xattr.user.a", b"v");
        assert_eq!(out, b"25 SCHILY.xattr.user.a=v\n");
        // 98 bytes without the length: the length itself needs 3 digits.
        let mut out = Vec::new();
        pax_record(&mut out, "SCHILY.xattr.user.k", &[b'v'; 76]);
        assert_eq!(out.len(), 101);
        assert!(out.starts_with(b"101 SCHILY"));
        let mut p = Pending::default();
        p.pax(&out).unwrap();
        assert_eq!(p.xattrs["user.k"], vec![b'v'; 76]);
    }
}
