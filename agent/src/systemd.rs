//! The service manager's side of `ferry agent`: sd_notify(3) datagrams over
//! `$NOTIFY_SOCKET` (READY, STOPPING, WATCHDOG, STATUS) and the watchdog
//! interval from `$WATCHDOG_USEC`. Outside systemd (no `$NOTIFY_SOCKET`)
//! every call is a no-op.
//!
//! A few lines over `UnixDatagram` instead of libsystemd or a crate: the
//! protocol is one `KEY=VALUE` line per state in one datagram to a path or
//! an abstract (`@`-prefixed) socket name. The `sd-notify` crate (0.5) was
//! weighed and is less: it reads `$NOTIFY_SOCKET` on every call (so a test
//! of it must change the process environment under other threads), sends
//! `@name` to a file path instead of the abstract name, blocks on a full
//! socket queue, and reports `WATCHDOG_USEC=0` as a zero interval.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

/// One state change told to the service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify<'a> {
    /// Startup finished: `systemctl start` returns, dependents may start.
    Ready,
    /// Shutdown has begun (a drain); systemd stops expecting watchdog pings.
    Stopping,
    /// The main loop is alive.
    Watchdog,
    /// Free text for `systemctl status`; line breaks become spaces.
    Status(&'a str),
}

/// The datagram for `states`: one `KEY=VALUE` line each.
pub fn message(states: &[Notify<'_>]) -> String {
    let mut out = String::new();
    for state in states {
        match state {
            Notify::Ready => out.push_str("READY=1"),
            Notify::Stopping => out.push_str("STOPPING=1"),
            Notify::Watchdog => out.push_str("WATCHDOG=1"),
            Notify::Status(text) => {
                out.push_str("STATUS=");
                out.extend(text.chars().map(|c| if c == '\n' { ' ' } else { c }));
            }
        }
        out.push('\n');
    }
    out
}

/// Sends one datagram to `socket`: a path, or an abstract name written with
/// a leading `@` (systemd's spelling).
pub fn send_to(socket: &OsStr, datagram: &[u8]) -> io::Result<()> {
    let addr = socket_addr(socket)?;
    let sock = UnixDatagram::unbound()?;
    // Never block the caller (an async runtime thread) on a full queue.
    sock.set_nonblocking(true)?;
    let sent = sock.send_to_addr(datagram, &addr)?;
    if sent != datagram.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sd_notify: sent {sent} of {} bytes", datagram.len()),
        ));
    }
    Ok(())
}

fn socket_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    match socket.as_bytes() {
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        [b'/', ..] => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET={} is neither a path nor an @abstract name",
                socket.to_string_lossy()
            ),
        )),
    }
}

/// How often systemd expects WATCHDOG=1 (the unit's `WatchdogSec`), if it
/// expects it from this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// `$WATCHDOG_USEC` and `$WATCHDOG_PID` as sd_watchdog_enabled(3) reads
/// them: a positive number of microseconds, meant for `my_pid` when the pid
/// is given.
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The agent's link to the service manager, owned by its main loop:
/// READY once, watchdog pings at half the interval systemd asks for (and no
/// timer at all when it asks for none), STOPPING when the drain starts.
pub struct Service {
    socket: Option<OsString>,
    ready_sent: bool,
    watchdog: Option<tokio::time::Interval>,
}

impl Service {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        Self::new(socket, watchdog_interval())
    }

    /// `socket`: where to send notifications (none: not under systemd);
    /// `watchdog`: the interval systemd expects pings within.
    pub fn new(socket: Option<OsString>, watchdog: Option<Duration>) -> Self {
        let watchdog = watchdog.filter(|_| socket.is_some()).map(|every| {
            let mut tick = tokio::time::interval(every / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            debug!(
                every_ms = (every / 2).as_millis() as u64,
                "systemd watchdog enabled"
            );
            tick
        });
        Service {
            socket,
            ready_sent: false,
            watchdog,
        }
    }

    fn send(&self, states: &[Notify<'_>]) {
        let Some(socket) = &self.socket else { return };
        match send_to(socket, message(states).as_bytes()) {
            Ok(()) => debug!(?states, "service manager notified"),
            // Under systemd this means a start timeout or a watchdog kill
            // later; say why now.
            Err(e) => warn!(error = %e, ?states, "cannot notify the service manager"),
        }
    }

    /// READY=1 the first time only (later reconnects are not news).
    pub fn ready(&mut self, status: &str) {
        if !self.ready_sent {
            self.ready_sent = true;
            self.send(&[Notify::Ready, Notify::Status(status)]);
        }
    }

    /// Completes when the next watchdog ping is due; never when the
    /// watchdog is off. For a `select!` arm in the main loop.
    pub async fn watchdog_due(&mut self) {
        match &mut self.watchdog {
            Some(tick) => {
                tick.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// WATCHDOG=1.
    pub fn watchdog(&self) {
        self.send(&[Notify::Watchdog]);
    }

    /// STOPPING=1, with a status line. systemd stops watching the watchdog.
    pub fn stopping(&self, status: &str) {
        self.send(&[Notify::Stopping, Notify::Status(status)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_per_state() {
        assert_eq!(message(&[Notify::Ready]), "READY=1\n");
        assert_eq!(
            message(&[Notify::Stopping, Notify::Status("draining 2 jobs")]),
            "STOPPING=1\nSTATUS=draining 2 jobs\n"
        );
        assert_eq!(message(&[Notify::Watchdog]), "WATCHDOG=1\n");
        assert_eq!(
            message(&[Notify::Status("a\nb")]),
            "STATUS=a b\n",
            "a line break would start a bogus assignment"
        );
    }

    #[test]
    fn watchdog_interval_follows_sd_watchdog_enabled() {
        let thirty = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), thirty);
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), thirty);
        assert_eq!(
            parse_watchdog(Some("30000000"), Some("8"), 7),
            None,
            "meant for another process"
        );
        assert_eq!(parse_watchdog(Some("30000000"), Some("x"), 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("-5"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
    }

    #[test]
    fn sends_the_datagram_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ferry-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let msg = message(&[Notify::Ready, Notify::Status("connected")]);
        send_to(path.as_os_str(), msg.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=connected\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_the_datagram_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ferry-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send_to(OsStr::new(&format!("@{name}")), b"WATCHDOG=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }

    #[test]
    fn rejects_a_relative_socket_name() {
        let err = send_to(OsStr::new("notify.sock"), b"READY=1\n").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("notify.sock"), "{err}");
    }

    fn bound_socket(tag: &str) -> (std::path::PathBuf, UnixDatagram) {
        let dir = std::env::temp_dir().join(format!("ferry-notify-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        (dir, server)
    }

    fn received(server: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = server.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    // Paused time: the clock moves only when every task waits, so the ping
    // interval is checked exactly, however loaded the machine (or qemu) is.
    #[tokio::test(start_paused = true)]
    async fn service_sends_ready_once_pings_at_half_the_interval_and_stops() {
        let (dir, server) = bound_socket("service");
        let mut service = Service::new(
            Some(dir.join("notify.sock").into_os_string()),
            Some(Duration::from_millis(400)),
        );
        service.ready("connected to the broker");
        service.ready("connected to the broker");
        assert_eq!(
            received(&server),
            ["READY=1\nSTATUS=connected to the broker\n"],
            "a reconnect must not send READY again"
        );

        let start = tokio::time::Instant::now();
        service.watchdog_due().await; // an interval's first tick is immediate
        service.watchdog_due().await;
        let waited = start.elapsed();
        assert_eq!(
            waited,
            Duration::from_millis(200),
            "pings are due every half interval"
        );
        service.watchdog();
        service.stopping("draining");
        assert_eq!(
            received(&server),
            ["WATCHDOG=1\n", "STOPPING=1\nSTATUS=draining\n"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn no_watchdog_means_no_timer() {
        let (dir, _server) = bound_socket("nowd");
        let mut with_socket = Service::new(Some(dir.join("notify.sock").into_os_string()), None);
        let mut outside_systemd = Service::new(None, Some(Duration::from_millis(10)));
        for service in [&mut with_socket, &mut outside_systemd] {
            let due = tokio::time::timeout(Duration::from_millis(200), service.watchdog_due());
            assert!(
                due.await.is_err(),
                "watchdog_due completed without a watchdog"
            );
            // Outside systemd nothing is sent and nothing fails.
            service.ready("x");
            service.stopping("x");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
