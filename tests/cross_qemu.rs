//! The aarch64 `ferry` under `qemu-aarch64` as the agent of one bed node,
//! migrating `counter` to and from an x86-64 agent. The containers stay
//! x86-64: arch checks compare what the engines report, not what the agents
//! were built for.

use std::path::PathBuf;

use ferry_tests::fleet::{ferry_bin, AgentOptions, DevFleet as Fleet};
use ferry_tests::Bed;

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
    let _arm = fleet.start_agent_with(
        1,
        AgentOptions {
            bin: Some(&bin),
            wrapper: &QEMU,
            ..AgentOptions::default()
        },
    );
    let _x86 = fleet.start_agent(2);
    let status = fleet.node_status("node1");
    // The engine's arch, although this agent is an aarch64 program.
    assert_eq!(status["arch"], "x86_64", "{status}");
    fleet.migrate_counter(&fleet.start_counter(1), 2, None);
    fleet.migrate_counter(&fleet.start_counter(2), 1, None);
}
