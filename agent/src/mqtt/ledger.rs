//! Remembers the job ids an agent has seen, so that a job is never run twice
//! (QoS 1 redelivery, a manager's retry, an agent restart in between).
//!
//! The file is one id per line, append-only, fsynced per id: jobs are rare
//! and a lost line would mean a migration run twice. Only the last
//! `capacity` ids are remembered; the file is compacted when it holds twice
//! that many lines.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::contract::validate_id;

pub struct JobLedger {
    path: PathBuf,
    file: File,
    /// Length of the file up to its last complete line.
    good_len: u64,
    lines_in_file: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
    capacity: usize,
}

impl JobLedger {
    pub const DEFAULT_CAPACITY: usize = 10_000;
    /// The ledger's file name inside the agent's work dir.
    pub const FILE_NAME: &'static str = "jobs-seen";

    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        Self::open_with_capacity(path, Self::DEFAULT_CAPACITY)
    }

    /// Loads the ledger, creating it if needed. A torn last line (a crash
    /// mid-append) is cut off: its id was never confirmed, so its job never
    /// started.
    pub fn open_with_capacity(path: impl Into<PathBuf>, capacity: usize) -> io::Result<Self> {
        let path = path.into();
        let capacity = capacity.max(1);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let parsed = parse_ledger(&bytes);

        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let good_len = parsed.complete_len as u64;
        if good_len < bytes.len() as u64 {
            file.set_len(good_len)?;
            file.sync_data()?;
        }

        let mut ledger = JobLedger {
            path,
            file,
            good_len,
            lines_in_file: parsed.lines,
            order: VecDeque::new(),
            seen: HashSet::new(),
            capacity,
        };
        for id in parsed.ids {
            ledger.remember(id);
        }
        if ledger.lines_in_file > 2 * capacity {
            ledger.compact()?;
        }
        Ok(ledger)
    }

    /// Records `id` and returns true the first time it is seen, false after.
    /// True is only returned once the id is durably on disk; on an error the
    /// caller must not run the job.
    pub fn first_seen(&mut self, id: &str) -> io::Result<bool> {
        validate_id("job id", id).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if self.seen.contains(id) {
            return Ok(false);
        }
        let line = format!("{id}\n");
        if let Err(e) = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
        {
            // Cut a partial line so the next append does not glue onto it.
            let _ = self.file.set_len(self.good_len);
            return Err(e);
        }
        self.good_len += line.len() as u64;
        self.lines_in_file += 1;
        self.remember(id.to_owned());
        if self.lines_in_file > 2 * self.capacity {
            self.compact()?;
        }
        Ok(true)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn remember(&mut self, id: String) {
        if !self.seen.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Rewrites the file with the remembered ids: temp file, fsync, rename.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("compact");
        let mut body = String::with_capacity(self.order.len() * 16);
        for id in &self.order {
            body.push_str(id);
            body.push('\n');
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Makes the rename itself durable; not all filesystems allow it.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.good_len = body.len() as u64;
        self.lines_in_file = self.order.len();
        Ok(())
    }
}

struct ParsedLedger {
    ids: Vec<String>,
    /// Bytes up to and including the last newline.
    complete_len: usize,
    /// Complete lines, valid or not (they all count towards compaction).
    lines: usize,
}

/// Reads a ledger's bytes: complete lines only, invalid ids skipped.
fn parse_ledger(bytes: &[u8]) -> ParsedLedger {
    let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut ids = Vec::new();
    let mut lines = 0;
    for line in bytes[..complete_len].split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        lines += 1;
        if let Ok(id) = std::str::from_utf8(line) {
            if validate_id("job id", id).is_ok() {
                ids.push(id.to_owned());
            }
        }
    }
    ParsedLedger {
        ids,
        complete_len,
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferry-ledger-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn file(&self) -> PathBuf {
            self.0.join(JobLedger::FILE_NAME)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_job_id_is_new_once() {
        let dir = TempDir::new();
        let mut l = JobLedger::open(dir.file()).unwrap();
        assert!(l.is_empty());
        assert!(l.first_seen("job-1").unwrap());
        assert!(!l.first_seen("job-1").unwrap());
        assert!(l.first_seen("job-2").unwrap());
        assert_eq!(l.len(), 2);
        assert_eq!(fs::read_to_string(dir.file()).unwrap(), "job-1\njob-2\n");
    }

    #[test]
    fn survives_reload() {
        let dir = TempDir::new();
        {
            let mut l = JobLedger::open(dir.file()).unwrap();
            assert!(l.first_seen("a").unwrap());
            assert!(l.first_seen("b").unwrap());
        }
        let mut l = JobLedger::open(dir.file()).unwrap();
        assert!(l.contains("a") && l.contains("b"));
        assert!(!l.first_seen("a").unwrap());
        assert!(!l.first_seen("b").unwrap());
        assert!(l.first_seen("c").unwrap());
    }

    #[test]
    fn torn_last_line_is_dropped_and_cut() {
        let dir = TempDir::new();
        fs::write(dir.file(), "a\nb\nhalf-writ").unwrap();
        let mut l = JobLedger::open(dir.file()).unwrap();
        assert!(l.contains("a") && l.contains("b"));
        assert!(!l.contains("half-writ"));
        assert_eq!(fs::read_to_string(dir.file()).unwrap(), "a\nb\n");
        // The next append starts on a fresh line and reloads as itself.
        assert!(l.first_seen("half-written").unwrap());
        drop(l);
        let l = JobLedger::open(dir.file()).unwrap();
        assert!(l.contains("half-written"));
        assert_eq!(l.len(), 3);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let dir = TempDir::new();
        fs::write(dir.file(), b"ok-1\n\xff\xfe\n\nbad/id\nok-2\n").unwrap();
        let l = JobLedger::open(dir.file()).unwrap();
        assert!(l.contains("ok-1") && l.contains("ok-2"));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn bounded_and_compacted() {
        let dir = TempDir::new();
        let mut l = JobLedger::open_with_capacity(dir.file(), 3).unwrap();
        for i in 0..7 {
            assert!(l.first_seen(&format!("j{i}")).unwrap());
        }
        // Only the last three are remembered; the oldest is forgotten.
        assert_eq!(l.len(), 3);
        assert!(!l.contains("j3"));
        assert!(l.contains("j4") && l.contains("j6"));
        // Seventh line crossed 2 x capacity: the file was rewritten.
        assert_eq!(fs::read_to_string(dir.file()).unwrap(), "j4\nj5\nj6\n");
        assert!(l.first_seen("j7").unwrap());
        drop(l);
        let l = JobLedger::open_with_capacity(dir.file(), 3).unwrap();
        assert!(l.contains("j5") && l.contains("j7") && !l.contains("j4"));
    }

    #[test]
    fn rejects_ids_that_would_break_the_file() {
        let dir = TempDir::new();
        let mut l = JobLedger::open(dir.file()).unwrap();
        let err = l.first_seen("a\nb").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("invalid job id"), "{err}");
        assert_eq!(fs::read_to_string(dir.file()).unwrap(), "");
    }

    #[test]
    fn parse_counts_complete_lines_only() {
        let p = parse_ledger(b"a\nb\nc");
        assert_eq!(p.ids, ["a", "b"]);
        assert_eq!(p.complete_len, 4);
        assert_eq!(p.lines, 2);
        let p = parse_ledger(b"no-newline");
        assert!(p.ids.is_empty());
        assert_eq!(p.complete_len, 0);
    }
}
