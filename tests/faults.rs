//! The non-crash fault suite (issue 11): real agents, real dockerd, real
//! CRIU, real mosquitto on the bed. Each case migrates memhog from node1 to
//! node2, injects one fault, and checks what a user sees: exactly one copy
//! runs, its memory is intact (memhog's checksum), the job has a final state
//! whose reason names the fault, and nothing is left behind (checkpoint,
//! staging, created container, volumes) within 60 s.
//!
//! Every job runs with `precopy: off`: the faults aim at the stop-and-copy
//! checkpoint and transfer (tests/precopy.rs covers the pre-copy path).
//!
//! One test runs every case in turn and prints a table fault x phase ->
//! outcome at the end. `FERRY_FAULTS=a,b` runs only the cases named.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_tests::fleet::{AgentOptions, DevFleet as Fleet};
use ferry_tests::{
    free_port, memhog_ready, parse_memhog, wait_for, Bed, Container, Node, MEMHOG_IMAGE,
};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const CLEAN_WITHIN: Duration = Duration::from_secs(60);

/// One row of the table.
struct Row {
    fault: &'static str,
    phase: &'static str,
    outcome: String,
}

type Case = fn(&Fleet) -> Row;

#[test]
fn fault_suite() {
    let cases: [(&str, Case); 6] = [
        ("target_sigterm", target_sigterm_mid_transfer),
        ("restore_failure", restore_failure),
        ("staging_full", staging_full),
        ("link_cut_5s", |f| link_cut(f, 5)),
        ("slow_checkpoint", slow_checkpoint),
        ("link_cut_65s", |f| link_cut(f, 65)),
    ];
    let only: Option<Vec<String>> = std::env::var("FERRY_FAULTS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let fleet = Fleet::new(Bed::require());
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (name, case) in cases {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        let start = Instant::now();
        println!("---- case {name}");
        match catch_unwind(AssertUnwindSafe(|| case(&fleet))) {
            Ok(mut row) => {
                row.outcome = format!("{} ({:.0} s)", row.outcome, start.elapsed().as_secs_f64());
                rows.push(row);
            }
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                rows.push(Row {
                    fault: name,
                    phase: "?",
                    outcome: format!("CASE FAILED: {why}"),
                });
                failed.push(name);
            }
        }
    }
    println!("\nfault x phase -> outcome");
    println!("{:<28} {:<12} outcome", "fault", "phase");
    for r in &rows {
        println!("{:<28} {:<12} {}", r.fault, r.phase, r.outcome);
    }
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

/// memhog of `mib` MiB on node `n`, ready; returns it and its checksum.
fn memhog(fleet: &Fleet, n: usize, mib: u32) -> (Container, String) {
    let c = fleet.run(n, "memhog", MEMHOG_IMAGE, &[&mib.to_string()]);
    let sum = memhog_ready(&c);
    (c, sum)
}

/// memhog `name` runs on `node` with its memory intact: no mismatch, at
/// least two ticks after `after_tick`, every checksum `sum`; `fresh` says
/// whether it printed `ready` there (the original did, a restored copy
/// must not).
fn assert_memhog_intact(node: &Node, name: &str, sum: &str, after_tick: u64, fresh: bool) {
    let log = wait_for(
        &format!("{name} ticking on {}", node.name),
        Duration::from_secs(60),
        || {
            let log = parse_memhog(&node.logs(name))?;
            if log.mismatch.is_some() {
                return Ok(log);
            }
            let new = log.ticks.iter().filter(|(t, _)| *t > after_tick).count();
            (new >= 2)
                .then_some(log)
                .ok_or(format!("{new} ticks after {after_tick}"))
        },
    );
    assert_eq!(
        log.mismatch, None,
        "{name}: memory corrupted on {}",
        node.name
    );
    assert_eq!(
        log.ready.is_some(),
        fresh,
        "{name} on {}: ready line",
        node.name
    );
    for (tick, s) in &log.ticks {
        assert_eq!(s, sum, "{name} on {}: tick {tick} checksum", node.name);
    }
    assert!(node.is_running(name), "{name} not running on {}", node.name);
}

fn last_tick(node: &Node, name: &str) -> u64 {
    parse_memhog(&node.logs(name))
        .ok()
        .and_then(|l| l.ticks.last().map(|(t, _)| *t))
        .unwrap_or(0)
}

fn container_id(node: &Node, name: &str) -> String {
    node.docker_ok(&["inspect", "-f", "{{.Id}}", name])
        .trim()
        .to_owned()
}

fn volumes(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = node
        .docker_ok(&["volume", "ls", "-q"])
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// Nothing of job `job` left within 60 s: no checkpoint of the container
/// `id` on `kept` (the node that runs it), no copy of `name` on `other`, no
/// staging for the job in either work dir, no volume created on `other`
/// since `volumes_before`.
#[allow(clippy::too_many_arguments)]
fn assert_nothing_left(
    kept: &Node,
    id: &str,
    other: &Node,
    name: &str,
    job: &str,
    work_dirs: &[&Path],
    volumes_before: &[String],
) {
    let checkpoint = kept.checkpoint_dir(id, &format!("ferry-{job}"));
    wait_for("nothing left behind", CLEAN_WITHIN, || {
        if checkpoint.exists() {
            return Err(format!("checkpoint left: {}", checkpoint.display()));
        }
        if other.exists(name) {
            return Err(format!("{name} left on {}", other.name));
        }
        for w in work_dirs {
            let s = w.join("staging").join(job);
            if s.exists() {
                return Err(format!("staging left: {}", s.display()));
            }
        }
        let now = volumes(other);
        if now != volumes_before {
            return Err(format!(
                "volumes on {}: {now:?} != {volumes_before:?}",
                other.name
            ));
        }
        Ok(())
    });
}

/// Polls the source's retained status of `job` until `pred` holds.
fn wait_status(fleet: &Fleet, job: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let topic = fleet.topic(&format!("node1/jobs/{job}/status"));
    wait_for(what, JOB_TIMEOUT, || match fleet.retained(&topic) {
        Some(s) if pred(&s) => Ok(s),
        Some(s)
            if ["succeeded", "failed", "rolled_back", "canceled"]
                .contains(&s["state"].as_str().unwrap_or("")) =>
        {
            panic!("job ended before {what}: {s}")
        }
        other => Err(format!("status {other:?}")),
    })
}

fn in_transfer(s: &Value) -> bool {
    s["phase"] == "transfer" && s["bytes_wire"].as_u64().unwrap_or(0) > 0
}

fn error_of(s: &Value) -> String {
    s["error"].as_str().unwrap_or("").to_owned()
}

/// The job rolled back on the source with an error naming `cause`; the
/// target's own status failed.
fn assert_rolled_back(fleet: &Fleet, job: &str, status: &Value, cause: &str) -> Value {
    assert_eq!(status["state"], "rolled_back", "source status {status}");
    let error = error_of(status);
    assert!(
        error.contains(cause),
        "source error should name {cause:?}: {error}"
    );
    let target = fleet.final_status("node2", job, Duration::from_secs(30));
    assert_eq!(target["state"], "failed", "target status {target}");
    target
}

/// SIGTERM of the target's agent while the checkpoint streams: the target
/// tells the source, which rolls back; the target removes its copy.
fn target_sigterm_mid_transfer(fleet: &Fleet) -> Row {
    let _a1 = fleet.start_agent(1);
    let mut a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let (src, sum) = memhog(fleet, 1, 128);
    let id = container_id(n1, &src.name);
    let vols = volumes(n2);
    let job = fleet.send_migrate(
        &src,
        2,
        Some(json!({"rate_limit": "4MiB/s", "precopy": "off"})),
    );
    wait_status(fleet, &job, "the transfer under way", in_transfer);
    let tick = last_tick(n1, &src.name);
    let code = a2.terminate();
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    let target = assert_rolled_back(fleet, &job, &status, "target agent stopping");
    assert!(
        error_of(&target).contains("target agent stopping"),
        "target error: {target}"
    );
    assert_eq!(code, Some(0), "the target's agent drained and exited 0");
    assert_memhog_intact(n1, &src.name, &sum, tick, true);
    let w2 = fleet.dir.join("node2-work");
    assert_nothing_left(n1, &id, n2, &src.name, &job, &[&w2], &vols);
    Row {
        fault: "SIGTERM target agent",
        phase: "transfer",
        outcome: format!("rolled back: {}", error_of(&status)),
    }
}

/// The target's CRIU fails (the bed's wrapper while `fail-criu` exists).
fn restore_failure(fleet: &Fleet) -> Row {
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let (src, sum) = memhog(fleet, 1, 32);
    let id = container_id(n1, &src.name);
    let vols = volumes(n2);
    let switch = n2.dir.join("fail-criu");
    std::fs::write(&switch, "").expect("write fail-criu");
    let job = fleet.send_migrate(&src, 2, Some(json!({"precopy": "off"})));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    let _ = std::fs::remove_file(&switch);
    assert_rolled_back(fleet, &job, &status, "restore");
    assert_memhog_intact(n1, &src.name, &sum, 0, true);
    let w2 = fleet.dir.join("node2-work");
    assert_nothing_left(n1, &id, n2, &src.name, &job, &[&w2], &vols);
    Row {
        fault: "CRIU restore fails",
        phase: "restore",
        outcome: format!("rolled back: {}", error_of(&status)),
    }
}

/// A tmpfs mount, unmounted (and its folder removed) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).expect("tmpfs mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            ok.success(),
            "mount tmpfs on {} (needs root)",
            dir.display()
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The target's work dir is a tmpfs too small for the checkpoint: refused
/// before anything stops.
fn staging_full(fleet: &Fleet) -> Row {
    let small = Tmpfs::mount(fleet.dir.join("node2-small-work"), "8m");
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent_with(
        2,
        AgentOptions {
            work_dir: Some(&small.0),
            ..Default::default()
        },
    );
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let (src, sum) = memhog(fleet, 1, 64);
    let id = container_id(n1, &src.name);
    let vols = volumes(n2);
    let job = fleet.send_migrate(&src, 2, Some(json!({"precopy": "off"})));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(
        status["state"], "failed",
        "refused before the checkpoint: {status}"
    );
    let error = error_of(&status);
    assert!(
        error.contains("work dir"),
        "the error should name the work dir: {error}"
    );
    assert!(
        status["timings_ms"]["checkpoint"].as_u64().is_none(),
        "nothing should have been checkpointed: {status}"
    );
    assert_memhog_intact(n1, &src.name, &sum, 0, true);
    assert_nothing_left(n1, &id, n2, &src.name, &job, &[&small.0], &vols);
    drop(_a2);
    Row {
        fault: "target staging full",
        phase: "precheck",
        outcome: format!("failed, original untouched: {error}"),
    }
}

/// A TCP proxy between the source and the target's data port that can stop
/// forwarding (both ways) for a while: a link cut without a reset.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(bind: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(bind).expect("bind the proxy");
        listener.set_nonblocking(true).expect("nonblocking proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cut.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        down.set_nonblocking(false).ok();
                        for (from, to) in [
                            (down.try_clone(), up.try_clone()),
                            (up.try_clone(), down.try_clone()),
                        ] {
                            let (Ok(from), Ok(to)) = (from, to) else {
                                continue;
                            };
                            let (c, s) = (c.clone(), s.clone());
                            thread::spawn(move || pump(from, to, &c, &s));
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Proxy { addr, cut, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, stop: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(100))).ok();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if cut.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The link between the nodes cut for `secs` during the transfer (the
/// source dials a proxy that the target advertises as its data address).
/// A short cut is a stall the transfer rides out; one past the data
/// connection's 60 s I/O timeout rolls back.
fn link_cut(fleet: &Fleet, secs: u64) -> Row {
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let port = free_port(&[n2.addr]);
    let listen = SocketAddr::new(n2.addr.into(), port);
    let proxy = Proxy::start(SocketAddr::new(n2.addr.into(), 0), listen);
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent_with(
        2,
        AgentOptions {
            listen: Some(listen),
            advertise: Some(proxy.addr),
            ..Default::default()
        },
    );
    assert_eq!(
        fleet.data_addr("node2"),
        proxy.addr,
        "node2 advertises the proxy"
    );
    let (src, sum) = memhog(fleet, 1, if secs > 60 { 64 } else { 128 });
    let id = container_id(n1, &src.name);
    let vols = volumes(n2);
    let job = fleet.send_migrate(
        &src,
        2,
        Some(json!({"rate_limit": "4MiB/s", "precopy": "off"})),
    );
    wait_status(fleet, &job, "the transfer under way", in_transfer);
    proxy.cut.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_secs(secs));
    proxy.cut.store(false, Ordering::Relaxed);
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    let w2 = fleet.dir.join("node2-work");
    let fault = if secs > 60 {
        "link cut 65 s"
    } else {
        "link cut 5 s"
    };
    if secs <= 60 {
        assert_eq!(
            status["state"], "succeeded",
            "a {secs} s cut is ridden out: {status}"
        );
        assert_memhog_intact(n2, &src.name, &sum, 0, false);
        assert!(!n1.exists(&src.name), "the original is left on node1");
        let target_id = container_id(n2, &src.name);
        assert_nothing_left(n2, &target_id, n1, &src.name, &job, &[&w2], &volumes(n1));
        Row {
            fault,
            phase: "transfer",
            outcome: format!(
                "succeeded after the stall; timings {}",
                status["timings_ms"]
            ),
        }
    } else {
        assert_rolled_back(fleet, &job, &status, "timed out");
        let tick = 0;
        assert_memhog_intact(n1, &src.name, &sum, tick, true);
        assert_nothing_left(n1, &id, n2, &src.name, &job, &[&w2], &vols);
        Row {
            fault,
            phase: "transfer",
            outcome: format!("rolled back: {}", error_of(&status)),
        }
    }
}

/// The agent's runc checkpoint runs a CRIU that sleeps 70 s first: longer
/// than the target's old 60 s wait for the stream. The source's `Progress`
/// keepalives hold the target; the migration succeeds.
fn slow_checkpoint(fleet: &Fleet) -> Row {
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let wrapper = fleet.dir.join("slow-criu");
    let slept = fleet.dir.join("slow-criu.slept");
    // runc talks to CRIU as `criu swrk FD`; sleep once, before the first.
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = swrk ] && [ ! -e {slept} ]; then touch {slept}; sleep 70; fi\nexec {real} \"$@\"\n",
            slept = slept.display(),
            real = n1.dir.join("bin/criu").display()
        ),
    )
    .expect("write the slow CRIU");
    Command::new("chmod")
        .arg("0755")
        .arg(&wrapper)
        .status()
        .expect("chmod");
    let _a1 = fleet.start_agent_with(
        1,
        AgentOptions {
            criu_path: Some(&wrapper),
            ..Default::default()
        },
    );
    let _a2 = fleet.start_agent(2);
    let (src, sum) = memhog(fleet, 1, 16);
    let job = fleet.send_migrate(&src, 2, Some(json!({"precopy": "off"})));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert!(slept.exists(), "the slow CRIU never ran");
    assert_eq!(status["state"], "succeeded", "final status {status}");
    let checkpoint_ms = status["timings_ms"]["checkpoint"].as_u64().unwrap_or(0);
    assert!(
        checkpoint_ms >= 60_000,
        "the checkpoint took {checkpoint_ms} ms, not over 60 s: {status}"
    );
    assert_memhog_intact(n2, &src.name, &sum, 0, false);
    assert!(!n1.exists(&src.name), "the original is left on node1");
    let id = container_id(n2, &src.name);
    let w = [fleet.dir.join("node1-work"), fleet.dir.join("node2-work")];
    assert_nothing_left(n2, &id, n1, &src.name, &job, &[&w[0], &w[1]], &volumes(n1));
    Row {
        fault: "checkpoint > 60 s",
        phase: "checkpoint",
        outcome: format!("succeeded; checkpoint {checkpoint_ms} ms"),
    }
}
