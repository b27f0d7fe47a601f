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

/// Bytes in the files under `dir`, recursively (0 where it cannot be read).
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
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

/// The IPv4 subnets this host routes (`10.200.1.0/24`), but not its
/// default route: what a network created here must not overlap.
pub fn ipv4_routes() -> Vec<String> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_routes(&t))
        .unwrap_or_default()
}

/// The routes of a `/proc/net/route` text. Its addresses are the kernel's
/// big-endian words printed as native integers.
pub fn parse_routes(text: &str) -> Vec<String> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let mut out: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dest = std::net::Ipv4Addr::from(word(fields.get(1)?)?);
            let mask = u32::from_be_bytes(word(fields.get(7)?)?);
            (mask != 0).then(|| format!("{dest}/{}", mask.count_ones()))
        })
        .collect();
    out.dedup();
    out
}

/// The first three numbers of a version or kernel release: `4.2.1`,
/// `4.2` (patch 0), `6.16.3-1-amd64` (the suffix ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// `None` unless the text starts with at least `MAJOR.MINOR`.
    pub fn parse(text: &str) -> Option<Version> {
        let numeric = text
            .trim()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?;
        let mut parts = numeric.split('.').map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().and_then(Result::ok).unwrap_or(0);
        Some(Version(major, minor, patch))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// From this kernel on, `SO_PASSCRED` and `SO_PASSSEC` exist only on unix
/// and netlink sockets.
pub const SOCKET_OPTS_KERNEL: Version = Version(6, 16, 0);
/// The first CRIU that dumps TCP and UDP sockets on such kernels (CRIU
/// issues 2705 and 2718): older ones fail on any process holding one with
/// `Can't get 1:16 opt: Operation not supported`.
pub const SOCKET_OPTS_CRIU: Version = Version(4, 2, 0);

/// Whether CRIU version `criu` can dump a process holding a TCP or UDP
/// socket on kernel release `kernel`. A version that does not parse is
/// given the benefit of the doubt: `criu check` already passed.
pub fn criu_dumps_sockets(kernel: &str, criu: &str) -> bool {
    match (Version::parse(kernel), Version::parse(criu)) {
        (Some(k), Some(c)) => k < SOCKET_OPTS_KERNEL || c >= SOCKET_OPTS_CRIU,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            fb0n1\t0001C80A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            br-1\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(parse_routes(text), ["10.200.1.0/24", "172.17.0.0/16"]);
        }
        assert!(parse_routes("").is_empty());
    }

    #[test]
    fn versions_parse_from_criu_and_kernel_text() {
        assert_eq!(Version::parse("4.2.1"), Some(Version(4, 2, 1)));
        assert_eq!(Version::parse("4.2"), Some(Version(4, 2, 0)));
        assert_eq!(Version::parse("6.16.3-1-amd64"), Some(Version(6, 16, 3)));
        assert_eq!(Version::parse("6.18.44-fc-v782"), Some(Version(6, 18, 44)));
        assert_eq!(
            Version::parse("6.12.34+rpt-rpi-v8"),
            Some(Version(6, 12, 34))
        );
        assert_eq!(Version::parse("6.16-rc1"), Some(Version(6, 16, 0)));
        for bad in ["", "4", "v4.2", "x.y", "4.x"] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn kernels_from_6_16_need_criu_4_2_for_sockets() {
        // Raspberry Pi kernels today: any CRIU that passes `criu check`.
        assert!(criu_dumps_sockets("6.12.34+rpt-rpi-v8", "4.1.1"));
        assert!(criu_dumps_sockets("6.15.9", "3.17.1"));
        // The bed's kernel and later.
        assert!(!criu_dumps_sockets("6.16.0", "4.1.1"));
        assert!(!criu_dumps_sockets("6.18.44-fc-v782", "4.1"));
        assert!(!criu_dumps_sockets("7.0.1", "3.19"));
        assert!(criu_dumps_sockets("6.16.0", "4.2"));
        assert!(criu_dumps_sockets("6.18.44-fc-v782", "4.2.1"));
        assert!(criu_dumps_sockets("6.18.44-fc-v782", "5.0"));
        // Unknown text is not a refusal.
        assert!(criu_dumps_sockets("", "4.1.1"));
        assert!(criu_dumps_sockets("6.18.0", "git-abcdef"));
    }

    #[test]
    fn host_facts_are_plausible() {
        assert!(mem_available().unwrap() > 0);
        assert!(free_disk(Path::new("/tmp/does/not/exist")).is_some());
        assert!(page_size().is_power_of_two());
    }
}
