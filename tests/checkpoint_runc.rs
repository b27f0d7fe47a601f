//! Checkpoints through runc straight into the engine's checkpoint folder
//! (issue 10 item 2), and the job option `tcp` (issue 9 item 3), on the bed:
//! real `ferry agent`s, real dockerd, runc and CRIU (each node's CRIU
//! wrapper, so `fail-criu` and `criu.conf` apply).
//!
//! Needs the bed: `tests/bed/bed up 2`, or `tests/run` for everything.

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::fleet::{DevFleet as Fleet, LastLogs};
use ferry_tests::{
    check_counter_resumed, counter_values, parse_counter, parse_env, unique_name, wait_for, Bed,
    Node,
};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const MQTTPUB_IMAGE: &str = "ferry-test/mqttpub:latest";

/// Removes a file when dropped: the bed's per-node switches.
struct Switch(PathBuf);

impl Switch {
    fn on(path: PathBuf, text: &str) -> Switch {
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Switch(path)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn assert_via_runc(status: &Value) {
    assert_eq!(
        status["checkpoint_via"], "runc",
        "the checkpoint did not go through runc: {status}"
    );
    assert_eq!(status["checkpoint_fallback"], Value::Null, "{status}");
}

#[test]
fn a_runc_checkpoint_migrates_with_ferry_migrate_and_the_counter_resumes() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = fleet.start_counter(1);
    let name = source.name.clone();
    let logs = LastLogs::follow(n1, &name);

    let job = unique_name("job");
    fleet.cli_migrate_1_to_2(&name, &job);
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_via_runc(&status);

    let before = counter_values(&logs.finish());
    assert!(!n1.exists(&name), "{name} still exists on node1");
    let after = wait_for("the counter on node2", Duration::from_secs(30), || {
        let after = parse_counter(&n2.logs(&name))?;
        check_counter_resumed(&before, &after, 5)?;
        Ok(after)
    });
    println!(
        "runc checkpoint: node1 stopped at {}, node2 went on with {:?}; timings {}",
        before.last().unwrap_or(&0),
        &after[..5],
        status["timings_ms"]
    );
}

#[test]
fn rollbacks_after_runc_checkpoints_restore_the_original_three_times_in_a_row() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let source = fleet.start_counter(1);
    // node2's engine fails every CRIU call: each restore there fails.
    let _fail = Switch::on(fleet.node(2).dir.join("fail-criu"), "");

    for round in 1..=3 {
        let job = fleet.send_migrate(&source, 2, None);
        let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
        assert_via_runc(&status);
        // Restored on node1 from the runc images by the engine's
        // start?checkpoint=, counting on without a gap ("already exists"
        // would fail this restore and leave the job failed).
        let (_, values) = fleet.assert_rolled_back(&source, 2, &job, &status, "restore");
        println!(
            "round {round}: rolled back, counter at {}",
            values.last().unwrap_or(&0)
        );
    }
}

/// The broker as containers on the bed's bridges reach it.
fn broker_for_containers(bed: &Bed) -> (String, String) {
    let text = std::fs::read_to_string(bed.state.join("bed.env")).expect("read bed.env");
    let env = parse_env(&text).expect("parse bed.env");
    let host = env
        .get("FERRY_BED_MQTT_BRIDGE_HOST")
        .expect("bed.env has FERRY_BED_MQTT_BRIDGE_HOST (bed up from this branch)");
    let port = env.get("FERRY_BED_MQTT_PORT").expect("FERRY_BED_MQTT_PORT");
    (host.clone(), port.clone())
}

/// Starts mqttpub on `node` (default bridge network) publishing to `topic`;
/// waits until it has published a few values.
fn start_mqttpub(fleet: &Fleet, node: &Node, topic: &str) -> String {
    let (host, port) = broker_for_containers(&Bed::require());
    let name = unique_name("mqttpub");
    fleet.track(&name);
    let client = format!("mp{}", &name[name.len().saturating_sub(12)..]);
    node.docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "-e",
        &format!("MQTT_HOST={host}"),
        "-e",
        &format!("MQTT_PORT={port}"),
        "-e",
        &format!("MQTT_TOPIC={topic}"),
        "-e",
        &format!("MQTT_CLIENT_ID={client}"),
        MQTTPUB_IMAGE,
    ]);
    wait_for("mqttpub publishing", Duration::from_secs(30), || {
        let n = published(&node.logs(&name)).len();
        (n >= 3).then_some(()).ok_or(format!("{n} published"))
    });
    name
}

/// Publishes a job that migrates `name` from node1 to node2 with `options`.
fn migrate_job(fleet: &Fleet, name: &str, options: Value) -> String {
    let job = unique_name("job");
    let order =
        json!({"action": "migrate", "container": name, "target": "node2", "options": options});
    fleet.send_job("node1", &job, &order);
    job
}

/// The values of mqttpub's `published N` lines.
fn published(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter_map(|l| l.strip_prefix("published ")?.trim().parse().ok())
        .collect()
}

#[test]
fn mqttpub_migrates_with_tcp_close_and_reconnects() {
    let fleet = Fleet::new(Bed::require());
    // Each node's stand-in for /etc/criu/runc.conf allows restoring a
    // closed connection: the only way to tell Docker's restore.
    let _conf: Vec<Switch> = [1, 2]
        .map(|n| Switch::on(fleet.node(n).dir.join("criu.conf"), "tcp-close\n"))
        .into();
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let topic = format!("ferry-test/{}", unique_name("mqttpub"));
    let name = start_mqttpub(&fleet, n1, &topic);
    let logs = LastLogs::follow(n1, &name);

    let job = migrate_job(&fleet, &name, json!({"tcp": "close"}));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_via_runc(&status);
    let before = published(&logs.finish());
    let last = *before.last().expect("mqttpub published on node1");

    // On node2 the same process goes on counting: it notices the closed
    // connection, reconnects, and its next values reach the broker.
    let messages = fleet.subscribe(&topic);
    let after = wait_for(
        "mqttpub on node2 to publish again",
        Duration::from_secs(30),
        || {
            let logs = n2.logs(&name);
            let after = published(&logs);
            match after.iter().find(|v| **v > last + 2) {
                Some(_) => Ok((logs, after)),
                None => Err(format!("node2 logs: {logs}")),
            }
        },
    );
    let (logs2, values) = after;
    assert!(
        !logs2.lines().any(|l| l.starts_with("published 0")),
        "mqttpub started over on node2: {logs2}"
    );
    assert!(
        values.iter().all(|v| *v > last),
        "node2 repeated a value of node1's (last {last}): {values:?}"
    );
    assert!(
        logs2.contains("lost") && logs2.contains("connected"),
        "no reconnect in node2's log: {logs2}"
    );
    let received = wait_for(
        "its messages at the broker",
        Duration::from_secs(30),
        || {
            let got: Vec<u64> = messages
                .messages()
                .into_iter()
                .filter_map(|(t, p)| (t == topic).then(|| p.trim().parse().ok()).flatten())
                .collect();
            got.iter()
                .any(|v| *v > last)
                .then_some(got.clone())
                .ok_or(format!("received {got:?}"))
        },
    );
    println!(
        "mqttpub: node1 published up to {last}, node2 went on with {:?}; the broker got {:?}; timings {}",
        &values[..values.len().min(5)],
        &received[..received.len().min(5)],
        status["timings_ms"]
    );
}

#[test]
fn connections_a_restore_cannot_take_stop_the_job_before_the_checkpoint() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let n1 = fleet.node(1);
    let topic = format!("ferry-test/{}", unique_name("mqttpub"));
    let name = start_mqttpub(&fleet, n1, &topic);

    // No criu.conf: restores here are not told tcp-close, so tcp=close
    // cannot carry the connection; tcp=refuse refuses it outright.
    for (tcp, why) in [
        ("close", "needs `tcp-close` in"),
        ("refuse", "the job says tcp=refuse"),
    ] {
        let job = migrate_job(&fleet, &name, json!({ "tcp": tcp }));
        let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
        let error = status["error"].as_str().unwrap_or("");
        assert_eq!(status["state"], "failed", "{tcp}: {status}");
        assert!(
            error.contains("established TCP connection") && error.contains(why),
            "tcp={tcp}: {error}"
        );
        assert_eq!(
            status["timings_ms"]["checkpoint"],
            Value::Null,
            "tcp={tcp}: {status}"
        );
        assert!(n1.is_running(&name), "tcp={tcp}: mqttpub stopped");
        println!("tcp={tcp}: {error}");
    }
    let before = published(&n1.logs(&name)).len();
    wait_for("mqttpub still publishing", Duration::from_secs(10), || {
        let now = published(&n1.logs(&name)).len();
        (now > before).then_some(()).ok_or(format!("{now} values"))
    });
}
