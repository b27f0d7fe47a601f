//! Established TCP connections and what a checkpoint may do with them.
//!
//! CRIU refuses to dump a process holding an established TCP connection
//! unless it is told either to keep it (`tcp-established`, with the TCP
//! state in the images) or to drop it (`tcp-close`). Both choices are
//! recorded in the images, and CRIU demands the same option again at
//! restore (`Need to set the --tcp-close options`, `Connected TCP socket in
//! image`). Docker 20.10's restore cannot pass either: the only way in is
//! the CRIU configuration file that runc hands CRIU on every checkpoint and
//! restore (`/etc/criu/runc.conf`). So a job's `tcp` mode is only carried
//! out where this node's file allows the matching restore; [`plan`] decides
//! that, as a pure function over what the engine saw.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// What a job asks for the container's established TCP connections.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum TcpMode {
    /// Connections are closed at the checkpoint; peers reconnect (MQTT and
    /// HTTP clients do).
    #[default]
    Close,
    /// Connections are kept, TCP state and all (CRIU's repair mode), where
    /// both nodes' CRIU configuration allows it and the addresses match.
    Established,
    /// The precheck refuses a container that holds an established connection.
    Refuse,
}

impl TcpMode {
    pub const ALL: [TcpMode; 3] = [TcpMode::Close, TcpMode::Established, TcpMode::Refuse];

    pub fn as_str(self) -> &'static str {
        match self {
            TcpMode::Close => "close",
            TcpMode::Established => "established",
            TcpMode::Refuse => "refuse",
        }
    }
}

impl fmt::Display for TcpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TcpMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        TcpMode::ALL.into_iter().find(|m| m.as_str() == s).ok_or(())
    }
}

/// One established connection, as `/proc/<pid>/net/tcp{,6}` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl fmt::Display for TcpConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.local, self.remote)
    }
}

/// `st` of an established connection in `/proc/net/tcp`.
const TCP_ESTABLISHED: &str = "01";

/// The established connections in the text of `/proc/<pid>/net/tcp` or
/// `tcp6`: the header line is skipped, and so is any line that does not
/// parse (the kernel's format has not changed since 2.6, but a line we do
/// not understand must not stop a migration).
pub fn parse_proc_net_tcp(text: &str) -> Vec<TcpConn> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = parse_endpoint(fields.next()?)?;
            let remote = parse_endpoint(fields.next()?)?;
            (fields.next()? == TCP_ESTABLISHED).then_some(TcpConn { local, remote })
        })
        .collect()
}

/// `0201CA0A:ED94`: the address as the kernel's 32-bit words printed in
/// host byte order, the port as a number.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(8 * i..8 * i + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The TCP options in a CRIU configuration file: one option per line,
/// written without the leading `--` (the dashes are accepted too), `#`
/// starts a comment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CriuTcpOptions {
    pub tcp_close: bool,
    pub tcp_established: bool,
}

impl CriuTcpOptions {
    pub fn parse(text: &str) -> CriuTcpOptions {
        let mut out = CriuTcpOptions::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let option = line.split_whitespace().next().unwrap_or("");
            match option.trim_start_matches('-') {
                "tcp-close" => out.tcp_close = true,
                "tcp-established" => out.tcp_established = true,
                _ => {}
            }
        }
        out
    }
}

/// What the engine saw of a container's connections, and what its
/// restores on this node will be told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpState {
    pub established: Vec<TcpConn>,
    /// The options in the CRIU configuration file the engine's runc passes
    /// to every restore on this node.
    pub restore: CriuTcpOptions,
    /// That file, for messages.
    pub restore_config: String,
}

/// The CRIU option a checkpoint needs for the container's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpDump {
    /// No established connection: no option, so the images restore
    /// anywhere.
    Plain,
    /// `tcp-close`.
    Close,
    /// `tcp-established`.
    Established,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpRefusal {
    #[error("the container holds {} established TCP connection(s) ({}) and the job says tcp=refuse", .conns.len(), list(.conns))]
    Refused { conns: Vec<TcpConn> },
    #[error("the container holds {} established TCP connection(s) ({}); tcp={mode} needs `{option}` in {config} on every node (runc hands that file to CRIU, and Docker's restore has no other way to pass the option), or use tcp={other}", .conns.len(), list(.conns))]
    RestoreCannot {
        conns: Vec<TcpConn>,
        mode: TcpMode,
        option: &'static str,
        config: String,
        other: &'static str,
    },
}

fn list(conns: &[TcpConn]) -> String {
    const SHOWN: usize = 3;
    let mut s = conns
        .iter()
        .take(SHOWN)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if conns.len() > SHOWN {
        s.push_str(&format!(", and {} more", conns.len() - SHOWN));
    }
    s
}

/// How to checkpoint a container in `state` for a job that says `mode`, or
/// why not. Called at the precheck and again right before the dump, so a
/// connection opened in between is seen.
pub fn plan(mode: TcpMode, state: &TcpState) -> Result<TcpDump, TcpRefusal> {
    if state.established.is_empty() {
        return Ok(TcpDump::Plain);
    }
    let conns = state.established.clone();
    let cannot = |option, other| TcpRefusal::RestoreCannot {
        conns: conns.clone(),
        mode,
        option,
        config: state.restore_config.clone(),
        other,
    };
    match mode {
        TcpMode::Refuse => Err(TcpRefusal::Refused { conns }),
        TcpMode::Close if state.restore.tcp_close => Ok(TcpDump::Close),
        TcpMode::Close => Err(cannot("tcp-close", "refuse")),
        TcpMode::Established if state.restore.tcp_established => Ok(TcpDump::Established),
        TcpMode::Established => Err(cannot("tcp-established", "close")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read on the bed from mqttpub's init pid: one connection to the
    /// broker on the node's bridge, one listener.
    const TCP: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0201CA0A:ED94 0100CA0A:5682 01 00000000:00000000 00:00000000 00000000     0        0 345929 2 00000000b449ff3c 20 4 31 27 -1
   2: 0201CA0A:ED95 0100CA0A:5682 06 00000000:00000000 03:00000A1B 00000000     0        0 0 3 0
";

    #[test]
    fn only_established_connections_are_listed_with_their_addresses() {
        let conns = parse_proc_net_tcp(TCP);
        assert_eq!(
            conns,
            [TcpConn {
                local: "10.202.1.2:60820".parse().unwrap(),
                remote: "10.202.0.1:22146".parse().unwrap(),
            }]
        );
        assert_eq!(conns[0].to_string(), "10.202.1.2:60820 -> 10.202.0.1:22146");
    }

    #[test]
    fn ipv6_words_are_in_host_order() {
        // ::1 port 8080 talking to ::ffff:127.0.0.1 port 443, as an x86 kernel prints them.
        let text = "header\n   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:01BB 01 0:0 0:0 0 0 0 1\n";
        let conns = parse_proc_net_tcp(text);
        if cfg!(target_endian = "little") {
            assert_eq!(conns[0].local, "[::1]:8080".parse().unwrap());
            assert_eq!(conns[0].remote, "[::ffff:127.0.0.1]:443".parse().unwrap());
        }
        assert_eq!(conns.len(), 1);
    }

    #[test]
    fn lines_that_do_not_parse_are_skipped() {
        let text = "header\n0: zz:1 00000000:0000 01\n1: 0100007F:0050\n\n2: 0100007F:0050 0100007F:C000 01 x\n";
        assert_eq!(parse_proc_net_tcp(text).len(), 1);
        assert!(parse_proc_net_tcp("").is_empty());
    }

    #[test]
    fn criu_config_options_are_found_with_or_without_dashes() {
        let text = "# ferry\nlog-file /tmp/x.log\n  tcp-close  # drop connections\n";
        assert_eq!(
            CriuTcpOptions::parse(text),
            CriuTcpOptions {
                tcp_close: true,
                tcp_established: false
            }
        );
        let text = "--tcp-established\n# tcp-close\ntcp-closed\n";
        assert_eq!(
            CriuTcpOptions::parse(text),
            CriuTcpOptions {
                tcp_close: false,
                tcp_established: true
            }
        );
    }

    #[test]
    fn modes_parse_and_print() {
        for m in TcpMode::ALL {
            assert_eq!(m.as_str().parse::<TcpMode>(), Ok(m));
        }
        assert!("CLOSE".parse::<TcpMode>().is_err());
        assert_eq!(TcpMode::default(), TcpMode::Close);
    }

    fn state(conns: usize, close: bool, established: bool) -> TcpState {
        TcpState {
            established: parse_proc_net_tcp(TCP).repeat(conns),
            restore: CriuTcpOptions {
                tcp_close: close,
                tcp_established: established,
            },
            restore_config: "/etc/criu/runc.conf".into(),
        }
    }

    #[test]
    fn without_connections_every_mode_dumps_plain() {
        for m in TcpMode::ALL {
            assert_eq!(plan(m, &state(0, false, false)), Ok(TcpDump::Plain));
        }
    }

    #[test]
    fn connections_need_the_matching_restore_option() {
        use TcpDump::*;
        assert_eq!(plan(TcpMode::Close, &state(1, true, false)), Ok(Close));
        assert_eq!(
            plan(TcpMode::Established, &state(1, false, true)),
            Ok(Established)
        );
        let err = plan(TcpMode::Close, &state(1, false, true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tcp-close` in /etc/criu/runc.conf"), "{err}");
        assert!(
            err.contains("10.202.1.2:60820 -> 10.202.0.1:22146"),
            "{err}"
        );
        let err = plan(TcpMode::Established, &state(1, true, false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`tcp-established`"), "{err}");
    }

    #[test]
    fn refuse_refuses_any_connection_and_lists_a_few() {
        let err = plan(TcpMode::Refuse, &state(5, true, true))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the container holds 5 established"),
            "{err}"
        );
        assert!(err.contains("and 2 more"), "{err}");
        assert!(err.contains("tcp=refuse"), "{err}");
    }
}
