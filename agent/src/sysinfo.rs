//! Facts about this host that the node status and the precheck report.

use std::path::Path;
use std::process::Command;

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`
/// (or its nearest existing parent).
pub fn free_disk(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

pub fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

/// The kernel's page size; CRIU images only restore on the same page size.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(4096)
}

/// CRIU's version if `criu check` passes on this host, else why not.
pub fn criu_status() -> Result<String, String> {
    let version = Command::new("criu")
        .arg("--version")
        .output()
        .map_err(|e| format!("criu not runnable: {e}"))?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .ok_or("criu --version printed no version")?;
    let check = Command::new("criu")
        .arg("check")
        .output()
        .map_err(|e| format!("criu check not runnable: {e}"))?;
    if check.status.success() {
        Ok(version)
    } else {
        let err = String::from_utf8_lossy(&check.stderr);
        Err(format!(
            "criu {version} fails 'criu check': {}",
            err.lines().last().unwrap_or("no output")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_facts_are_plausible() {
        assert!(mem_available().unwrap() > 0);
        assert!(free_disk(Path::new("/tmp/does/not/exist")).is_some());
        assert!(page_size().is_power_of_two());
    }
}
