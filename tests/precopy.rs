//! Pre-copy by page content on the bed (issue 10): real mosquitto, dockerd,
//! runc and CRIU, real agents. A pre-copied migration must end with memory
//! byte-identical to the source's, which memhog proves by verifying every
//! page each second (and, in its rewrite mode, that no page is older than
//! its own count of rewrites says).

use std::time::Duration;

use ferry_tests::fleet::DevFleet as Fleet;
use ferry_tests::{memhog_ready, parse_memhog, wait_for, Bed, MemhogLog, Node, MEMHOG_IMAGE};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// Runs memhog with `args` on node1, migrates it to node2 with `options`
/// and returns the source's final status, the memhog's checksum when it
/// was ready, and its log on node2 once it ticked twice there.
fn migrate_memhog(args: &[&str], options: Value) -> (Value, String, MemhogLog) {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = fleet.run(1, "memhog", MEMHOG_IMAGE, args);
    let name = source.name.clone();
    let checksum = memhog_ready(&source);
    let job = fleet.send_migrate(&source, 2, Some(options));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    println!("memhog {args:?}: final status {status}");
    assert_eq!(status["state"], "succeeded", "final status: {status}");
    assert!(!n1.exists(&name), "{name} still exists on node1");
    let after = ticking(n2, &name);
    assert!(n2.is_running(&name));
    (status, checksum, after)
}

/// memhog's log on `node` once it ticked twice there (or failed).
fn ticking(node: &Node, name: &str) -> MemhogLog {
    let log = wait_for("memhog ticking on node2", Duration::from_secs(30), || {
        let log = parse_memhog(&node.logs(name))?;
        if log.mismatch.is_some() || log.ticks.len() >= 2 {
            return Ok(log);
        }
        Err("fewer than 2 ticks".to_string())
    });
    assert_eq!(log.mismatch, None, "memory corrupted after migration");
    assert_eq!(
        log.ready, None,
        "memhog started over on node2 (printed ready again)"
    );
    log
}

fn rounds(status: &Value) -> Vec<Value> {
    status["precopy"]["rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no pre-copy rounds in the status: {status}"))
        .clone()
}

fn field(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn memhog_256_is_pre_copied_and_its_memory_intact() {
    let (status, checksum, after) = migrate_memhog(&["256"], json!({"rate_limit": "20MiB/s"}));
    for (tick, sum) in &after.ticks {
        assert_eq!(
            sum, &checksum,
            "tick {tick} checksum differs from the source's"
        );
    }
    let rounds = rounds(&status);
    assert!(!rounds.is_empty() && rounds.len() <= 3, "{rounds:?}");
    // The first round sends all of memory while the container runs.
    let first = &rounds[0];
    assert!(field(first, "bytes_pages") >= 256 * MIB, "{first}");
    assert!(field(first, "bytes_new") >= 256 * MIB, "{first}");
    // memhog does not write after filling: the final dump is references.
    let last = &status["precopy"]["final_round"];
    let (pages, new, wire) = (
        field(last, "bytes_pages"),
        field(last, "bytes_new"),
        field(last, "bytes_wire"),
    );
    assert!(pages >= 256 * MIB, "{last}");
    assert!(
        new < MIB,
        "the final dump sent {new} B of pages whole; memhog changed none: {status}"
    );
    assert!(
        wire * 20 < field(first, "bytes_wire"),
        "the final transfer ({wire} B) is not much smaller than the first round's: {status}"
    );
    assert_eq!(field(&status, "bytes_wire"), wire, "{status}");
    println!(
        "pre-copy: rounds {rounds:?}; final: pages {pages} B, new {new} B, wire {wire} B; timings {}",
        status["timings_ms"]
    );
}

#[test]
fn memhog_rewriting_a_few_pages_a_second_is_pre_copied_intact() {
    // 2% of 256 MiB a second: the final dump carries those pages whole.
    let (status, _, after) = migrate_memhog(&["256", "2"], json!({"rate_limit": "20MiB/s"}));
    assert!(
        after.rewrites.first().is_some_and(|r| *r > 0),
        "memhog's rewrite count did not carry over: {:?}",
        after.rewrites
    );
    let rounds = rounds(&status);
    assert!(!rounds.is_empty(), "{status}");
    let last = &status["precopy"]["final_round"];
    let (pages, new) = (field(last, "bytes_pages"), field(last, "bytes_new"));
    assert!(
        new > 0 && new < pages / 2,
        "the final dump should carry the rewritten pages only: {status}"
    );
    println!("pre-copy with 2%/s rewritten: rounds {rounds:?}; final {last}");
}

#[test]
fn memhog_rewriting_all_its_memory_falls_back_to_stop_and_copy() {
    let (status, _, after) = migrate_memhog(&["256", "100"], json!({"rate_limit": "20MiB/s"}));
    assert!(
        after.rewrites.first().is_some_and(|r| *r > 0),
        "memhog's rewrite count did not carry over: {:?}",
        after.rewrites
    );
    let precopy = &status["precopy"];
    let rounds = rounds(&status);
    assert_eq!(rounds.len(), 2, "one round to learn it, no more: {status}");
    assert!(
        precopy["note"]
            .as_str()
            .unwrap_or("")
            .contains("stop and copy"),
        "{status}"
    );
    assert!(precopy.get("final_round").is_none(), "{status}");
    // The final dump went whole.
    assert!(field(&status, "bytes_raw") >= 256 * MIB, "{status}");
}

#[test]
fn precopy_off_is_stop_and_copy() {
    let (status, checksum, after) = migrate_memhog(&["64"], json!({"precopy": "off"}));
    assert_eq!(after.ticks[0].1, checksum);
    let precopy = &status["precopy"];
    assert!(rounds(&status).is_empty(), "{status}");
    assert!(
        precopy["note"].as_str().unwrap_or("").contains("off"),
        "{status}"
    );
    assert!(field(&status, "bytes_raw") >= 64 * MIB, "{status}");
}

/// The final dump refers to blocks the target staged in an earlier round;
/// if one of them changed on the target's disk, the assembled image fails
/// its checksum, the job rolls back, and the original runs on with its
/// memory intact.
#[test]
fn a_staged_block_changed_on_the_target_fails_the_checksum_and_rolls_back() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = fleet.run(1, "memhog", MEMHOG_IMAGE, &["256"]);
    let name = source.name.clone();
    let checksum = memhog_ready(&source);
    let job = fleet.send_migrate(&source, 2, Some(json!({"rate_limit": "20MiB/s"})));
    // memhog writes nothing after filling: round 2 is tiny, and the final
    // dump (seconds for 256 MiB) follows it. Its staged images are in
    // `<job>@pre0` (rounds alternate between two folders).
    let staged = a2.work.join("staging").join(format!("{job}@pre0"));
    wait_for(
        "node2 to stage pre-copy round 2",
        Duration::from_secs(180),
        || {
            a2.log_text()
                .lines()
                .any(|l| l.contains("pre-copy round staged") && l.contains("round=2"))
                .then_some(())
                .ok_or_else(|| "no \"pre-copy round staged ... round=2\" line yet".to_string())
        },
    );
    let largest = std::fs::read_dir(&staged)
        .unwrap_or_else(|e| panic!("{}: {e}", staged.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a staged page image")
        .path();
    let len = std::fs::metadata(&largest).unwrap().len();
    assert!(len >= 128 * MIB, "{} is {len} B", largest.display());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&largest)
            .unwrap();
        let at = len / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    }
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    println!("corrupted staged block: final status {status}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    let error = status["error"].as_str().unwrap_or("");
    assert!(error.contains("checksum"), "{status}");
    assert!(!n2.exists(&name), "node2 kept a copy: {name}");
    // The original runs again from its own checkpoint, memory intact: two
    // more verified ticks than it had printed when the job ended.
    let before = parse_memhog(&n1.logs(&name)).map_or(0, |l| l.ticks.len());
    let log = wait_for(
        "memhog ticking again on node1",
        Duration::from_secs(60),
        || {
            let logs = n1.logs(&name);
            let log = parse_memhog(&logs)?;
            let ready = logs.lines().filter(|l| l.starts_with("ready")).count();
            if log.mismatch.is_some() || ready != 1 {
                return Ok(log);
            }
            let restored = n1.is_running(&name) && log.ticks.len() >= before + 2;
            restored
                .then_some(log)
                .ok_or_else(|| "not running and ticking".to_string())
        },
    );
    assert_eq!(log.mismatch, None, "memory corrupted after the rollback");
    for (tick, sum) in &log.ticks {
        assert_eq!(sum, &checksum, "tick {tick} after the rollback");
    }
    assert!(n1.is_running(&name));
}

/// A cancel while pre-copy rounds run: the container never stopped, it
/// keeps running on the source, and the target keeps nothing, its staged
/// rounds included.
#[test]
fn cancel_during_pre_copy_leaves_the_workload_running_on_the_source() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = fleet.run(1, "memhog", MEMHOG_IMAGE, &["256"]);
    let name = source.name.clone();
    let checksum = memhog_ready(&source);
    // 128 MiB at 4 MiB/s: the first round takes about half a minute.
    let job = fleet.send_migrate(&source, 2, Some(json!({"rate_limit": "4MiB/s"})));
    let topic = fleet.topic(&format!("node1/jobs/{job}/status"));
    let staging = a2.work.join("staging");
    wait_for(
        "the first round on its way to node2",
        Duration::from_secs(120),
        || match fleet.retained(&topic) {
            Some(s) if s["state"] != "in_progress" && s["state"] != "queued" => {
                panic!("job ended before the cancel: {s}")
            }
            Some(s)
                if s["phase"] == "precopy" && staging.join(format!("{job}@pre1-recv")).exists() =>
            {
                Ok(())
            }
            other => Err(format!("status {other:?}")),
        },
    );
    let cancel = ferry_tests::unique_name("cancel");
    let replies = fleet.subscribe(&fleet.topic(&format!("node1/jobs/{cancel}/#")));
    fleet.send_job("node1", &cancel, &json!({"action": "cancel", "job": job}));
    replies.wait_topic(&format!("/jobs/{cancel}/accepted"), Duration::from_secs(20));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "canceled", "{status}");
    assert_eq!(
        status.get("checkpoint_via"),
        None,
        "it was never checkpointed: {status}"
    );
    let target = fleet.final_status("node2", &job, JOB_TIMEOUT);
    assert_ne!(target["state"], "succeeded", "{target}");
    assert!(!n2.exists(&name), "node2 kept a copy");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().contains(&job)),
        "node2's staging still holds {left:?}"
    );
    // The same process, never stopped: memory intact, ticking on.
    let before = parse_memhog(&n1.logs(&name)).map_or(0, |l| l.ticks.len());
    let log = wait_for("memhog ticking on node1", Duration::from_secs(30), || {
        let log = parse_memhog(&n1.logs(&name))?;
        (log.mismatch.is_some() || log.ticks.len() >= before + 2)
            .then_some(log)
            .ok_or_else(|| "no new ticks".to_string())
    });
    assert_eq!(log.mismatch, None);
    assert!(
        log.ticks.iter().all(|(_, s)| s == &checksum),
        "{:?}",
        log.ticks
    );
    assert!(n1.is_running(&name));
}
