//! The aarch64 `ferry` under `qemu-aarch64` as the agent of one bed node,
//! migrating `counter` to and from an x86-64 agent. The containers stay
//! x86-64: arch checks compare what the engines report, not what the agents
//! were built for.

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::fleet::{ferry_bin, start_counter, Fleet, LastLogs};
use ferry_tests::{check_counter_resumed, parse_counter, unique_name, wait_for, Bed};
use serde_json::json;

const AARCH64: &str = "aarch64-unknown-linux-gnu";
const QEMU: [&str; 3] = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"];

/// `FERRY_BIN_AARCH64`, else the cross build next to the native one.
fn aarch64_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN_AARCH64") {
        return PathBuf::from(p);
    }
    let native = ferry_bin();
    // .../target/{profile}/ferry -> .../target/cross/aarch64-unknown-linux-gnu/release/ferry (cross/build)
    let target_dir = native
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir");
    let p = target_dir
        .join("cross")
        .join(AARCH64)
        .join("release")
        .join("ferry");
    assert!(
        p.exists(),
        "no aarch64 ferry at {}: build it with cross/build (or set FERRY_BIN_AARCH64)",
        p.display()
    );
    p
}

fn migrate_counter(fleet: &Fleet, from: usize, to: usize) {
    let (src, dst) = (fleet.node(from), fleet.node(to));
    let source = start_counter(src);
    let name = source.name.clone();
    let logs = LastLogs::follow(src, &name);
    let job = unique_name("job");
    fleet.send_job(
        &src.name,
        &job,
        &json!({"action": "migrate", "container": name, "target": dst.name}),
    );
    let status = fleet.final_status(&src.name, &job, Duration::from_secs(300));
    assert_eq!(
        status["state"], "succeeded",
        "{} -> {}: {status}",
        src.name, dst.name
    );
    for phase in ["precheck", "checkpoint", "transfer", "restore", "cleanup"] {
        assert!(
            status["timings_ms"][phase].as_u64().is_some(),
            "no timing for {phase}: {status}"
        );
    }
    let before = parse_counter(&logs.finish()).unwrap();
    assert!(
        !src.docker(&["inspect", &name]).status.success(),
        "{name} still on {}",
        src.name
    );
    wait_for(
        &format!("counter on {}", dst.name),
        Duration::from_secs(20),
        || check_counter_resumed(&before, &parse_counter(&dst.logs(&name))?, 5),
    );
    println!(
        "{} -> {}: stopped at {}, went on; timings {}",
        src.name,
        dst.name,
        before.last().unwrap(),
        status["timings_ms"]
    );
    let _ = dst.docker(&["rm", "-f", &name]);
}

#[test]
fn aarch64_agent_under_qemu_migrates_to_and_from_an_x86_64_agent() {
    let bin = aarch64_bin();
    let file = std::process::Command::new("file")
        .arg(&bin)
        .output()
        .expect("run file");
    let kind = String::from_utf8_lossy(&file.stdout);
    assert!(
        kind.contains("ARM aarch64"),
        "{} is not an aarch64 binary: {kind}",
        bin.display()
    );

    let fleet = Fleet::new(Bed::require());
    let _arm = fleet.start_agent_bin(1, &bin, &QEMU, &[]);
    let _x86 = fleet.start_agent(2);
    let status = fleet
        .retained(&format!("{}/node1/status", fleet.root))
        .unwrap();
    // The engine's arch, although this agent is an aarch64 program.
    assert_eq!(status["arch"], "x86_64", "{status}");
    migrate_counter(&fleet, 1, 2);
    migrate_counter(&fleet, 2, 1);
}
