//! The tar core that both tar users share, checkpoints
//! ([`super::archive`]) and container layers and volumes
//! (`runtime::rootfs`): a writer that counts the tar bytes of a pack, and
//! the safe-extraction core of an unpack.
//!
//! Each unpack keeps its own allow-list of entry kinds; what is here is the
//! part that does not depend on it: paths that never leave the
//! destination, folders that are never symlinks, files created new and
//! never through a link, a cap on the bytes read, and an end-of-archive
//! check. Errors are reasons (`String`) or plain `io::Error`s that the
//! caller wraps in its own error type, naming the entry.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::libc;
use tar::EntryType;

/// Longest GNU long name or link accepted; Linux's PATH_MAX.
pub(crate) const MAX_NAME_BYTES: u64 = 4096;
const COPY_BUF: usize = 64 * 1024;
/// Why an entry whose path is taken is refused.
pub(crate) const TAKEN: &str = "duplicate entry, or the path already exists";

/// The entry's path as a relative path of plain components, or why not.
pub(crate) fn safe_relative_path(name: &[u8]) -> Result<PathBuf, String> {
    if name.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    let mut rel = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(name)).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    Ok(rel)
}

/// Creates each folder of `rel` under `dest` with `mode`; an existing one
/// must be a real folder, never a symlink, a file or a device.
pub(crate) fn make_dirs(dest: &Path, rel: &Path, mode: u32) -> Result<(), String> {
    let mut path = dest.to_path_buf();
    for part in rel.components() {
        path.push(part);
        match DirBuilder::new().mode(mode).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = fs::symlink_metadata(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                if !meta.is_dir() {
                    return Err(format!("{} exists and is not a folder", path.display()));
                }
            }
            Err(e) => return Err(format!("creating {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Creates the regular file `path`, which must not exist yet, without
/// following a symlink in its last component.
pub(crate) fn create_new_file(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// A refused entry kind, as a user would name it.
pub(crate) fn describe(t: EntryType) -> String {
    match t {
        EntryType::Symlink => "symlink".into(),
        EntryType::Link => "hard link".into(),
        EntryType::Char => "character device".into(),
        EntryType::Block => "block device".into(),
        EntryType::Fifo => "fifo".into(),
        EntryType::XHeader => "pax header".into(),
        EntryType::XGlobalHeader => "global pax header".into(),
        EntryType::GNUSparse => "sparse file".into(),
        other => format!("type {:?}", other.as_byte() as char),
    }
}

/// Why copying an entry's data failed: reading the tar (the peer's fault)
/// or writing the file (ours).
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies an entry's data to `file`, returning the bytes written.
pub(crate) fn copy_entry(entry: &mut impl Read, mut file: &File) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut written = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        file.write_all(&buf[..n]).map_err(CopyError::Write)?;
        written += n as u64;
    }
    Ok(written)
}

/// Reads a GNU long-name or long-link entry's data (the caller checked its
/// size), without its trailing NULs.
pub(crate) fn read_long_name(entry: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    let mut name = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut name)?;
    while name.last() == Some(&0) {
        name.pop();
    }
    Ok(name)
}

/// After the tar crate stops at the first zero block, the rest of the input
/// must be zeros (the second end block, maybe padding): anything else would
/// be a second archive silently ignored. Fewer than 512 more zero bytes
/// means the input lacked the end-of-archive marker: it was truncated.
pub(crate) fn check_end(input: &mut impl Read) -> Result<(), String> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut zeros = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| format!("reading the end of the archive: {e}"))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err("data after the end of the archive".into());
        }
        zeros += n as u64;
    }
    if zeros < 512 {
        return Err("no end-of-archive marker: the archive is truncated".into());
    }
    Ok(())
}

/// Counts the bytes written through it: the size of a tar being packed.
pub(crate) struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W> CountingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        CountingWriter { inner, count: 0 }
    }

    /// Bytes written so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts the bytes read, and fails once more than `cap` were available
/// (and on every read after that).
pub(crate) struct CappedReader<R> {
    inner: R,
    count: u64,
    cap: u64,
    exceeded: bool,
}

impl<R> CappedReader<R> {
    pub(crate) fn new(inner: R, cap: u64) -> Self {
        CappedReader {
            inner,
            count: 0,
            cap,
            exceeded: false,
        }
    }

    /// Bytes read so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Whether the input held more than the cap.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.exceeded {
            // Ask for at most one byte past the cap: enough to see it crossed.
            let room = self.cap.saturating_sub(self.count).saturating_add(1);
            let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let n = self.inner.read(&mut buf[..want])?;
            self.count += n as u64;
            self.exceeded = self.count > self.cap;
            if !self.exceeded {
                return Ok(n);
            }
        }
        Err(io::Error::other(format!(
            "more than the cap of {} bytes",
            self.cap
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fails_the_read_that_crosses_it_and_every_one_after() {
        let mut r = CappedReader::new(&[7u8; 10][..], 4);
        let mut buf = [0u8; 3];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        let err = r.read(&mut buf).unwrap_err();
        assert!(err.to_string().contains("cap of 4 bytes"), "{err}");
        assert!(r.exceeded());
        assert_eq!(r.count(), 5);
        assert!(r.read(&mut buf).is_err());
    }
}
