//! Live migration end to end on the bed: real mosquitto, real dockerd per
//! node, real CRIU, real `ferry agent` processes with mutual TLS on the data
//! port. Jobs are published with `mosquitto_pub`, as any fleet manager would.

use std::time::Duration;

use ferry_tests::fleet::{counter_went_on_at_source, start_counter, Fleet, LastLogs};
use ferry_tests::{
    check_counter_resumed, parse_counter, parse_memhog, unique_name, wait_for, Bed, COUNTER_IMAGE,
    MEMHOG_IMAGE,
};
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

fn counter_values(logs: &str) -> Vec<u64> {
    parse_counter(logs).unwrap_or_else(|e| panic!("{e}"))
}

fn exists(node: &ferry_tests::Node, name: &str) -> bool {
    node.docker(&["inspect", name]).status.success()
}

#[test]
fn counter_migrates_through_a_job_published_with_mosquitto_pub() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = start_counter(n1);
    let name = source.name.clone();

    let job = unique_name("job");
    let replies = fleet.record(&format!("{}/node1/jobs/{job}/#", fleet.root));
    let source_logs = LastLogs::follow(n1, &name);
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": name, "target": "node2", "options": {"zstd_level": 3}}),
    );
    let accepted = replies.wait_topic(&format!("/jobs/{job}/accepted"), REPLY_TIMEOUT);
    assert_eq!(accepted["job_id"], job.as_str());

    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "final status: {status}");
    assert_eq!(status["error"], serde_json::Value::Null);
    for phase in ["precheck", "checkpoint", "transfer", "restore", "cleanup"] {
        assert!(
            status["timings_ms"][phase].as_u64().is_some(),
            "no timing for {phase}: {status}"
        );
    }
    let target_view = fleet.final_status("node2", &job, REPLY_TIMEOUT);
    assert_eq!(
        target_view["state"], "succeeded",
        "target's status: {target_view}"
    );
    assert_eq!(target_view["role"], "target");

    // Gone from A, running on B, continuing from A's last value + 1.
    let before = counter_values(&source_logs.finish());
    assert!(!exists(n1, &name), "{name} still exists on node1");
    wait_for("counter on node2", Duration::from_secs(20), || {
        let after = counter_values(&n2.logs(&name));
        check_counter_resumed(&before, &after, 5)
    });
    assert!(n2.is_running(&name));
    println!(
        "counter: node1 stopped at {}, node2 went on; timings {}",
        before.last().unwrap(),
        status["timings_ms"]
    );

    // The same job id again at the same node (a manager's retry, a QoS 1
    // redelivery) is not run twice: no reply at all. The same job under a
    // new id, as the control, is answered (the container left node1).
    let replay = json!({"action": "migrate", "container": name, "target": "node2"});
    let again = fleet.record(&format!("{}/node1/jobs/#", fleet.root));
    fleet.send_job("node1", &job, &replay);
    let fresh = unique_name("job");
    fleet.send_job("node1", &fresh, &replay);
    let control = again.wait_topic(&format!("/jobs/{fresh}/rejected"), REPLY_TIMEOUT);
    assert!(
        control["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not found"),
        "{control}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let replies: Vec<_> = again
        .messages()
        .into_iter()
        .filter(|(t, _)| t.contains(&format!("/jobs/{job}/")) && !t.ends_with("/status"))
        .collect();
    assert!(
        replies.is_empty(),
        "a repeated job id was answered: {replies:?}"
    );
    assert!(n2.is_running(&name), "the counter left node2");
    let _ = n2.docker(&["rm", "-f", &name]);
}

#[test]
fn memhog_migrates_compressed_and_rate_limited() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let name = unique_name("memhog");
    let source = n1.run(&name, MEMHOG_IMAGE, &["256"]);
    let ready = wait_for("memhog ready", Duration::from_secs(60), || {
        let log = parse_memhog(&source.logs())?;
        log.ready.clone().ok_or("not ready".to_string())
    });
    let limit: u64 = 20 << 20;
    let job = unique_name("job");
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": name, "target": "node2", "options": {"rate_limit": "20MiB/s"}}),
    );
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "final status: {status}");
    let raw = status["bytes_raw"].as_u64().unwrap();
    let wire = status["bytes_wire"].as_u64().unwrap();
    let rate = status["rate_bps"].as_u64().unwrap();
    println!(
        "memhog 256 MiB: raw {raw} B, wire {wire} B ({:.1}%), measured rate {:.2} MiB/s against a limit of 20 MiB/s ({:+.1}%); timings {}",
        100.0 * wire as f64 / raw as f64,
        rate as f64 / (1 << 20) as f64,
        100.0 * (rate as f64 - limit as f64) / limit as f64,
        status["timings_ms"]
    );
    assert!(
        raw >= 256 << 20,
        "raw bytes {raw} smaller than the workload's memory"
    );
    assert!(
        wire < raw,
        "compression did not shrink the stream: wire {wire} >= raw {raw}"
    );
    // Loose bound only: the machine is shared; the figure is printed above.
    assert!(
        rate <= limit + limit / 10,
        "rate {rate} B/s exceeds the 20 MiB/s limit"
    );

    assert!(!exists(n1, &name), "{name} still exists on node1");
    let after = wait_for("memhog ticking on node2", Duration::from_secs(30), || {
        let log = parse_memhog(&n2.logs(&name))?;
        if log.mismatch.is_some() {
            return Ok(log);
        }
        (log.ticks.len() >= 2)
            .then_some(log)
            .ok_or("fewer than 2 ticks".to_string())
    });
    assert_eq!(after.mismatch, None, "memory corrupted after migration");
    assert_eq!(
        after.ready, None,
        "memhog started over on node2 (printed ready again)"
    );
    for (tick, sum) in &after.ticks {
        assert_eq!(
            sum, &ready.1,
            "tick {tick} checksum differs from the source's"
        );
    }
    assert!(n2.is_running(&name));
    let _ = n2.docker(&["rm", "-f", &name]);
}

#[test]
fn failed_restore_on_the_target_rolls_back_to_the_source() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = start_counter(n1);
    let name = source.name.clone();

    // node2's engine now fails every CRIU call (see tests/bed/bed start_node).
    let flag = n2.dir.join("fail-criu");
    std::fs::write(&flag, "").unwrap();
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _flag = RemoveOnDrop(flag);

    let job = unique_name("job");
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": name, "target": "node2"}),
    );
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "rolled_back", "final status: {status}");
    let error = status["error"].as_str().unwrap_or("");
    assert!(
        error.contains("restore"),
        "error should say the restore failed: {error}"
    );
    let target_view = fleet.final_status("node2", &job, REPLY_TIMEOUT);
    assert_eq!(
        target_view["state"], "failed",
        "target's status: {target_view}"
    );

    // Exactly one node runs it: the source, counting on without a gap.
    assert!(!exists(n2, &name), "{name} was left behind on node2");
    let checkpointed_at = status["timings_ms"]["checkpoint"].as_u64().unwrap_or(0);
    assert!(checkpointed_at > 0, "the job never checkpointed: {status}");
    let values = counter_went_on_at_source(&source, &status);
    println!(
        "rolled back: counter on node1 went on to {} with no gap; error was: {error}",
        values.last().unwrap()
    );
}

#[test]
fn bad_jobs_are_rejected_with_their_cause_and_the_agent_keeps_serving() {
    let fleet = Fleet::new(Bed::require());
    let mut agent = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let n1 = fleet.node(1);
    let name = unique_name("counter");
    let _c = n1.run(&name, COUNTER_IMAGE, &[]);
    // A node that was online once and is now gone: its Last Will.
    let ghost = unique_name("ghost");
    fleet.publish(
        &format!("{}/{ghost}/status", fleet.root),
        r#"{"online":false}"#,
        true,
    );

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed json",
            "{\"action\": \"migrate\", ".into(),
            "malformed json",
        ),
        (
            "unknown action",
            json!({"action": "teleport", "container": name}).to_string(),
            "teleport",
        ),
        (
            "unknown container",
            json!({"action": "migrate", "container": "no-such-container", "target": "node2"})
                .to_string(),
            "no-such-container",
        ),
        (
            "unknown target",
            json!({"action": "migrate", "container": name, "target": "node99"}).to_string(),
            "node99",
        ),
        (
            "offline target",
            json!({"action": "migrate", "container": name, "target": ghost}).to_string(),
            "offline",
        ),
        (
            "wildcard in container",
            json!({"action": "migrate", "container": "a/#", "target": "node2"}).to_string(),
            "container",
        ),
        (
            "unknown field",
            json!({"action": "migrate", "container": name, "target": "node2", "colour": "red"})
                .to_string(),
            "colour",
        ),
    ];
    for (what, payload, cause) in cases {
        let job = unique_name("bad");
        let replies = fleet.record(&format!("{}/node1/jobs/{job}/#", fleet.root));
        fleet.publish(&format!("{}/node1/jobs/{job}", fleet.root), &payload, false);
        let rejected = replies.wait_topic(&format!("/jobs/{job}/rejected"), REPLY_TIMEOUT);
        let reason = rejected["reason"].as_str().unwrap_or("");
        assert!(
            reason.to_lowercase().contains(&cause.to_lowercase()),
            "{what}: reason {reason:?} does not name {cause:?}"
        );
        assert!(
            !replies
                .messages()
                .iter()
                .any(|(t, _)| t.ends_with("/accepted")),
            "{what}: accepted"
        );
        println!("{what}: rejected: {reason}");
        assert!(
            agent.is_running(),
            "agent died after {what}: {}",
            agent.log_text()
        );
    }
    // Still serving, and the workload never stopped.
    assert!(n1.is_running(&name));
    let status = fleet
        .retained(&format!("{}/node1/status", fleet.root))
        .unwrap();
    assert_eq!(status["online"], true);
}

#[test]
fn ferry_migrate_shows_progress_and_exits_zero_on_success() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let name = unique_name("counter");
    let _source = n1.run(&name, COUNTER_IMAGE, &[]);
    std::thread::sleep(Duration::from_millis(700));

    let job = unique_name("job");
    let out = fleet.ferry(
        &[
            "migrate", &name, "--from", "node1", "--to", "node2", "--job-id", &job,
        ],
        JOB_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "ferry migrate failed: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("succeeded"), "summary: {}", out.stdout);
    assert!(
        out.stderr.contains("transfer"),
        "no progress shown: {}",
        out.stderr
    );
    assert!(n2.is_running(&name));
    assert!(!exists(n1, &name));

    // `ferry watch JOB` shows the retained view and ends with the job.
    let watch = fleet.ferry(&["watch", &job], Duration::from_secs(30));
    assert!(watch.status.success(), "ferry watch: {}", watch.stderr);
    assert!(
        watch.stdout.contains("@node1 (source) succeeded"),
        "ferry watch printed: {}",
        watch.stdout
    );

    // The container is no longer on node1: the exit code says so.
    let out = fleet.ferry(
        &["migrate", &name, "--from", "node1", "--to", "node2"],
        JOB_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "migrating a container node1 no longer has succeeded"
    );
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    let nodes = fleet.ferry(&["nodes"], Duration::from_secs(30));
    assert!(nodes.status.success());
    for n in ["node1", "node2"] {
        assert!(
            nodes.stdout.contains(n),
            "ferry nodes lacks {n}: {}",
            nodes.stdout
        );
    }
    let _ = n2.docker(&["rm", "-f", &name]);
}

/// Starts memhog on node1 and a slow migration of it, and waits until the
/// job is in its transfer phase. Returns (container name, job id, ready checksum).
fn slow_migration_in_transfer(fleet: &Fleet, source: &ferry_tests::Container) -> (String, String) {
    let ready = wait_for("memhog ready", Duration::from_secs(60), || {
        let log = parse_memhog(&source.logs())?;
        log.ready.clone().ok_or("not ready".to_string())
    });
    let job = unique_name("job");
    // 128 MiB on the wire at 2 MiB/s: about a minute of transfer.
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": source.name, "target": "node2",
                "options": {"rate_limit": "2MiB/s"}}),
    );
    let topic = format!("{}/node1/jobs/{job}/status", fleet.root);
    wait_for("the job's transfer phase", JOB_TIMEOUT, || {
        match fleet.retained(&topic) {
            Some(s) if s["phase"] == "transfer" && s["bytes_wire"].as_u64().unwrap_or(0) > 0 => {
                Ok(())
            }
            Some(s) if s["state"] != "in_progress" => panic!("job ended before the transfer: {s}"),
            other => Err(format!("status {other:?}")),
        }
    });
    (job, ready.1)
}

/// The source's memhog runs again with its memory intact, and node2 has no copy.
fn memhog_back_on_source(fleet: &Fleet, source: &ferry_tests::Container, checksum: &str) {
    let log = wait_for(
        "memhog ticking again on node1",
        Duration::from_secs(60),
        || {
            let log = parse_memhog(&source.logs())?;
            if log.mismatch.is_some() || !source.is_running() {
                return Ok(log);
            }
            (log.ticks.len() >= 2 && source.is_running())
                .then_some(log)
                .ok_or("not ticking".to_string())
        },
    );
    assert_eq!(log.mismatch, None, "memory corrupted after the rollback");
    assert!(source.is_running(), "memhog is not running on node1");
    for (tick, sum) in &log.ticks {
        assert_eq!(sum, checksum, "tick {tick} checksum changed");
    }
    assert!(
        !exists(fleet.node(2), &source.name),
        "a copy was left on node2"
    );
}

#[test]
fn cancel_during_the_transfer_leaves_the_workload_on_the_source() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let source = fleet
        .node(1)
        .run(&unique_name("memhog"), MEMHOG_IMAGE, &["256"]);
    let (job, checksum) = slow_migration_in_transfer(&fleet, &source);

    let cancel = unique_name("cancel");
    let replies = fleet.record(&format!("{}/node1/jobs/{cancel}/#", fleet.root));
    fleet.send_job("node1", &cancel, &json!({"action": "cancel", "job": job}));
    replies.wait_topic(&format!("/jobs/{cancel}/accepted"), REPLY_TIMEOUT);

    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "canceled", "final status: {status}");
    memhog_back_on_source(&fleet, &source, &checksum);

    // A cancel for a job that is not running is rejected with the reason.
    let late = unique_name("cancel");
    let replies = fleet.record(&format!("{}/node1/jobs/{late}/#", fleet.root));
    fleet.send_job("node1", &late, &json!({"action": "cancel", "job": job}));
    let rejected = replies.wait_topic(&format!("/jobs/{late}/rejected"), REPLY_TIMEOUT);
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not running"),
        "{rejected}"
    );
}

#[test]
fn sigterm_during_a_transfer_drains_to_a_final_state_on_one_node() {
    let fleet = Fleet::new(Bed::require());
    // A short drain: the running migration is canceled (rolled back) when it
    // does not finish in time.
    let mut a1 = fleet.start_agent_with(1, &["--drain-timeout-secs", "2"]);
    let _a2 = fleet.start_agent(2);
    let source = fleet
        .node(1)
        .run(&unique_name("memhog"), MEMHOG_IMAGE, &["256"]);
    let (job, checksum) = slow_migration_in_transfer(&fleet, &source);

    let code = a1.terminate();
    assert_eq!(code, Some(0), "agent exit after SIGTERM: {}", a1.log_text());
    let status = fleet.final_status("node1", &job, REPLY_TIMEOUT);
    assert_eq!(status["state"], "canceled", "final status: {status}");
    let node = fleet
        .retained(&format!("{}/node1/status", fleet.root))
        .unwrap();
    assert_eq!(node["online"], false, "node status after the drain: {node}");
    memhog_back_on_source(&fleet, &source, &checksum);
}

#[test]
fn a_job_published_while_the_agent_was_offline_still_runs() {
    let fleet = Fleet::new(Bed::require());
    let mut a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let name = unique_name("counter");
    let _source = n1.run(&name, COUNTER_IMAGE, &[]);

    assert_eq!(a1.terminate(), Some(0), "{}", a1.log_text());
    let job = unique_name("job");
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": name, "target": "node2"}),
    );
    // The broker holds it in node1's persistent session until it is back.
    let _a1 = fleet.start_agent(1);
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "final status: {status}");
    assert!(n2.is_running(&name));
    assert!(!exists(n1, &name));
    let _ = n2.docker(&["rm", "-f", &name]);
}
