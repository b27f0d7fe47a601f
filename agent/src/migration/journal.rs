//! The journal of in-flight jobs: what an agent must know after a crash or
//! a restart to drive each job it had under way to a final state (see
//! [`super::recovery`]).
//!
//! One small JSON file per job and role, `<state-dir>/journal/<role>-<job>.json`,
//! replaced as a whole at each phase change: written to a `.tmp` file,
//! fsynced, renamed over the old one, and the folder fsynced. A reader thus
//! sees the old record or the new one, never a mix; concurrent jobs never
//! share a file, and a finished job is one unlink. An append log would need
//! its own torn-tail repair and compaction for no gain: a record is a few
//! hundred bytes and changes a handful of times per job.
//!
//! The caller writes the phase *before* acting on it, so that the journal
//! always names the furthest thing that may have happened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mqtt::contract::Role;

/// The record format this agent writes and reads.
pub const VERSION: u32 = 1;
/// The journal's folder inside the state dir.
pub const DIR_NAME: &str = "journal";
const TMP_SUFFIX: &str = ".tmp";

/// How far a job got, as journaled before acting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    // Source.
    /// Prechecks and `Prepare`: the original runs untouched.
    Started,
    /// The restart policy is set to `no`: the original still runs.
    PolicyPaused,
    /// The checkpoint is under way: the original may have stopped.
    Checkpointing,
    /// The stream is under way: the target may hold a complete copy.
    Transferring,
    /// The stream is done and the target was asked to restore; no decision.
    RestoreRequested,
    // Target.
    /// Prechecks, the image: nothing created yet.
    Preparing,
    /// Creating the volumes and the container.
    Creating,
    /// Receiving the checkpoint into staging.
    Receiving,
    /// Starting the container from the checkpoint.
    Restoring,
    /// Running, `Restored` said; waits for the source's decision.
    Restored,
    // Both.
    /// Decided (source) or learned (target): the target's copy stays.
    Commit,
    /// Decided (source) or learned (target): the original stays.
    Abort,
}

/// One job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub version: u32,
    pub role: Role,
    pub phase: Phase,
    pub job_id: String,
    /// The container's name (the same on both nodes).
    pub container: String,
    /// Its id on this node, once known.
    #[serde(default)]
    pub container_id: Option<String>,
    /// The checkpoint's name in the engine.
    pub checkpoint: String,
    /// The other node of the job, and its data address when known.
    pub peer_node: String,
    #[serde(default)]
    pub peer_addr: Option<String>,
    /// Source: the volumes that move; target: the volumes it created.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Target: its staging folder.
    #[serde(default)]
    pub staging: Option<PathBuf>,
    /// Source: the restart policy to put back (Docker's JSON form).
    #[serde(default)]
    pub restart_policy: Option<serde_json::Value>,
    /// Why the job ended, once decided.
    #[serde(default)]
    pub reason: Option<String>,
    pub updated_ms: u64,
}

impl Entry {
    pub fn new(role: Role, job_id: &str, container: &str, checkpoint: &str, peer: &str) -> Self {
        Entry {
            version: VERSION,
            role,
            phase: match role {
                Role::Source => Phase::Started,
                Role::Target => Phase::Preparing,
            },
            job_id: job_id.to_owned(),
            container: container.to_owned(),
            container_id: None,
            checkpoint: checkpoint.to_owned(),
            peer_node: peer.to_owned(),
            peer_addr: None,
            volumes: Vec::new(),
            staging: None,
            restart_policy: None,
            reason: None,
            updated_ms: super::now_ms(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("journal {path}: not a journal record (torn or corrupt; move it away after checking the job by hand): {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("journal {path}: record version {found}, this agent reads version {VERSION} (written by a newer agent?)")]
    Version { path: PathBuf, found: u64 },
    #[error("journal {path}: holds job {found:?} as {role:?}, its file name says otherwise")]
    Misplaced {
        path: PathBuf,
        found: String,
        role: Role,
    },
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// The journal folder of one agent.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) `<state_dir>/journal`, and drops the `.tmp` files a
    /// crash left mid-write: their record never replaced the previous one,
    /// which is still in place.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join(DIR_NAME);
        fs::create_dir_all(&dir).map_err(io_err(&dir, "creating"))?;
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "listing"))? {
            let path = entry.map_err(io_err(&dir, "listing"))?.path();
            if path.to_string_lossy().ends_with(TMP_SUFFIX) {
                fs::remove_file(&path).map_err(io_err(&path, "removing a torn write"))?;
            }
        }
        Ok(Journal { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, role: Role, job_id: &str) -> PathBuf {
        let role = match role {
            Role::Source => "source",
            Role::Target => "target",
        };
        self.dir.join(format!("{role}-{job_id}.json"))
    }

    /// Replaces the job's record, durably, before the caller acts on it.
    pub fn write(&self, entry: &Entry) -> Result<(), JournalError> {
        let path = self.path(entry.role, &entry.job_id);
        let tmp = PathBuf::from(format!("{}{TMP_SUFFIX}", path.display()));
        let bytes = serde_json::to_vec_pretty(entry).map_err(|e| JournalError::Io {
            path: path.clone(),
            action: "encoding",
            source: io::Error::other(e),
        })?;
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "creating"))?;
        file.write_all(&bytes).map_err(io_err(&tmp, "writing"))?;
        file.sync_all().map_err(io_err(&tmp, "fsyncing"))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path, "renaming into place"))?;
        self.sync_dir()
    }

    /// Forgets a job once it is final and its status published.
    pub fn remove(&self, role: Role, job_id: &str) -> Result<(), JournalError> {
        let path = self.path(role, job_id);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path, "removing")(e)),
        }
    }

    pub fn read(&self, role: Role, job_id: &str) -> Result<Option<Entry>, JournalError> {
        let path = self.path(role, job_id);
        match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, "reading")(e)),
        }
    }

    /// Every record, oldest first; the first unreadable one is an error
    /// that names its file (a job in flight must not be skipped silently).
    pub fn load(&self) -> Result<Vec<Entry>, JournalError> {
        let mut entries = Vec::new();
        for dirent in fs::read_dir(&self.dir).map_err(io_err(&self.dir, "listing"))? {
            let path = dirent.map_err(io_err(&self.dir, "listing"))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !name.ends_with(".json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err(&path, "reading"))?;
            let entry = parse(&path, &bytes)?;
            if self.path(entry.role, &entry.job_id) != path {
                return Err(JournalError::Misplaced {
                    path,
                    found: entry.job_id,
                    role: entry.role,
                });
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.updated_ms);
        Ok(entries)
    }

    fn sync_dir(&self) -> Result<(), JournalError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir, "fsyncing the folder"))
    }
}

/// The version is checked before the fields, so a newer agent's record is
/// reported as such rather than as corrupt.
fn parse(path: &Path, bytes: &[u8]) -> Result<Entry, JournalError> {
    let corrupt = |source| JournalError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(corrupt)?;
    let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if found != u64::from(VERSION) {
        return Err(JournalError::Version {
            path: path.to_owned(),
            found,
        });
    }
    serde_json::from_value(value).map_err(corrupt)
}

/// Test hook, inert unless the environment sets it:
/// `FERRY_TEST_PAUSE_AT=<role>:<phase>` (e.g. `source:restore_requested`,
/// `target:restored`) stops the job for good right after that phase is
/// journaled and before it acts, so that a test can SIGKILL the agent at a
/// known point. The agent logs `test pause` when it gets there.
pub async fn test_pause(role: Role, phase: Phase) {
    let Some(want) = std::env::var_os("FERRY_TEST_PAUSE_AT") else {
        return;
    };
    let here = format!(
        "{}:{}",
        serde_json::to_value(role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        serde_json::to_value(phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    if want.to_string_lossy() == here {
        tracing::warn!(at = %here, "test pause (FERRY_TEST_PAUSE_AT): this job stops here");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::TempDir;

    fn entry(role: Role, job: &str) -> Entry {
        let mut e = Entry::new(role, job, "memhog", "ferry-j1", "node-b");
        e.container_id = Some("abc".into());
        e.volumes = vec!["data".into()];
        e
    }

    #[test]
    fn records_replace_survive_reopen_and_go() {
        let dir = TempDir::new("journal");
        let j = Journal::open(dir.path()).unwrap();
        let mut e = entry(Role::Source, "j1");
        j.write(&e).unwrap();
        e.phase = Phase::Transferring;
        j.write(&e).unwrap();
        j.write(&entry(Role::Target, "j2")).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let all = j.load().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            j.read(Role::Source, "j1").unwrap().unwrap().phase,
            Phase::Transferring
        );
        // Same job id, other role: its own file.
        assert_eq!(j.read(Role::Target, "j1").unwrap(), None);
        j.remove(Role::Source, "j1").unwrap();
        j.remove(Role::Source, "j1").unwrap();
        let left = j.load().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].role, left[0].job_id.as_str()),
            (Role::Target, "j2")
        );
    }

    #[test]
    fn a_torn_write_leaves_the_previous_record() {
        let dir = TempDir::new("journal-torn");
        let j = Journal::open(dir.path()).unwrap();
        let e = entry(Role::Target, "j1");
        j.write(&e).unwrap();
        // A crash while the next record was being written: the rename never
        // happened, the .tmp holds half a record.
        let tmp = format!("{}.tmp", j.path(Role::Target, "j1").display());
        fs::write(&tmp, b"{\"version\": 1, \"role\": \"tar").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(!Path::new(&tmp).exists());
        assert_eq!(j.load().unwrap(), vec![e]);
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_its_file() {
        let dir = TempDir::new("journal-corrupt");
        let j = Journal::open(dir.path()).unwrap();
        let path = j.path(Role::Source, "j9");
        fs::write(&path, b"{\"version\": 1, \"role\": \"sou").unwrap();
        let err = j.load().unwrap_err();
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("corrupt"), "{msg}");
        // A valid JSON that is not a record is corrupt too.
        fs::write(&path, b"{\"version\": 1, \"role\": \"source\"}").unwrap();
        let msg = j.read(Role::Source, "j9").unwrap_err().to_string();
        assert!(
            msg.contains("j9.json") && msg.contains("missing field"),
            "{msg}"
        );
        // And a record under another job's file name.
        let mut other = entry(Role::Source, "j8");
        other.job_id = "j8".into();
        fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
        let msg = j.load().unwrap_err().to_string();
        assert!(msg.contains("j9.json") && msg.contains("\"j8\""), "{msg}");
    }

    #[test]
    fn an_unknown_version_is_named_as_such() {
        let dir = TempDir::new("journal-version");
        let j = Journal::open(dir.path()).unwrap();
        let mut value = serde_json::to_value(entry(Role::Source, "j1")).unwrap();
        value["version"] = 7.into();
        value["field_of_the_future"] = true.into();
        let path = j.path(Role::Source, "j1");
        fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        let err = j.load().unwrap_err();
        assert!(
            matches!(err, JournalError::Version { found: 7, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("source-j1.json") && msg.contains("version 7"),
            "{msg}"
        );
    }
}
