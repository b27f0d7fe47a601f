//! The MQTT contract on a second broker implementation: aedes (npm), not
//! mosquitto. Each test's fleet runs an aedes of its own
//! ([`AedesBroker`], plain TCP on a free loopback port) with real `ferry
//! agent` processes, real dockerd and real CRIU from the bed; jobs are
//! published with Debian's `mosquitto_pub`, as any fleet manager would.
//!
//! What the contract asks of a broker, each shown here: QoS 1 requests and
//! replies (accepted, rejected with the reason), retained statuses that a
//! subscriber arriving later still reads, a last will the broker publishes
//! for an agent that died, and a persistent session (clean_session=false)
//! that holds a QoS 1 job published while the agent was away.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_tests::broker::{AedesBroker, Broker};
use ferry_tests::{run_with_timeout, unique_name, wait_for, Bed, COUNTER_IMAGE};
use serde_json::{json, Value};

type Fleet = ferry_tests::fleet::Fleet<AedesBroker>;

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// Every retained message under `filters`, as a subscriber connecting
/// now receives it: (topic, JSON payload).
fn late_subscriber(fleet: &Fleet, filters: &[&str]) -> Vec<(String, Value)> {
    let mut sub = fleet.broker.client("mosquitto_sub");
    sub.args(["-v", "-q", "1", "--retained-only", "-W", "2"]);
    for f in filters {
        sub.args(["-t", f]);
    }
    let out = run_with_timeout(&mut sub, Duration::from_secs(10)).expect("run mosquitto_sub");
    out.stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| {
            let v = serde_json::from_str(p).unwrap_or_else(|_| Value::String(p.into()));
            (t.to_string(), v)
        })
        .collect()
}

fn payload_on<'a>(msgs: &'a [(String, Value)], topic: &str) -> &'a Value {
    msgs.iter()
        .find(|(t, _)| t == topic)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("nothing retained on {topic}; a late subscriber got {msgs:?}"))
}

/// The agents really talked to this aedes: it logged their client ids.
fn assert_connected_to_aedes(fleet: &Fleet, nodes: &[&str]) {
    let log = fleet.broker.log_text();
    for node in nodes {
        assert!(
            log.contains(&format!(" connect {node}\n")),
            "aedes never saw client {node}:\n{log}"
        );
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[test]
fn jobs_are_rejected_with_their_reason_or_accepted_and_a_counter_migrates_over_aedes() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    assert_connected_to_aedes(&fleet, &["node1", "node2"]);
    let source = fleet.start_counter(1);

    // Rejected, with the reason: a target no node answers for, and a
    // payload that is no JSON at all.
    let cases = [
        (
            json!({"action": "migrate", "container": source.name, "target": "node99"}).to_string(),
            "node99",
        ),
        ("{\"action\": ".to_string(), "malformed json"),
    ];
    for (payload, cause) in cases {
        let job = unique_name("bad");
        let replies = fleet.subscribe(&fleet.topic(&format!("node1/jobs/{job}/#")));
        fleet.publish(&fleet.topic(&format!("node1/jobs/{job}")), &payload, false);
        let rejected = replies.wait_topic(&format!("/jobs/{job}/rejected"), REPLY_TIMEOUT);
        let reason = rejected["reason"].as_str().unwrap_or("");
        assert!(
            reason.to_lowercase().contains(cause),
            "the reason {reason:?} should name {cause:?}: {rejected}"
        );
        assert!(
            !replies
                .messages()
                .iter()
                .any(|(t, _)| t.ends_with("/accepted")),
            "{payload} was also accepted: {:?}",
            replies.messages()
        );
        println!("rejected over aedes: {reason}");
    }
    assert!(fleet.node(1).is_running(&source.name));

    // Accepted, and the counter goes on on node2 from where it stopped.
    let migrated = fleet.migrate_counter(&source, 2, None);

    // A manager that subscribes only now still reads every node's status and
    // both sides' final job status: all retained by aedes.
    let msgs = late_subscriber(
        &fleet,
        &[&fleet.topic("+/status"), &fleet.topic("+/jobs/+/status")],
    );
    for node in ["node1", "node2"] {
        let status = payload_on(&msgs, &fleet.topic(&format!("{node}/status")));
        assert_eq!(status["online"], true, "{node}'s retained status: {status}");
        let job = payload_on(
            &msgs,
            &fleet.topic(&format!("{node}/jobs/{}/status", migrated.job)),
        );
        assert_eq!(job["state"], "succeeded", "{node}'s job status: {job}");
    }
    println!(
        "a late subscriber read {} retained statuses: {:?}",
        msgs.len(),
        msgs.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
}

#[test]
fn aedes_publishes_the_last_will_of_a_killed_agent_retained() {
    let fleet = Fleet::new(Bed::require());
    let mut agent = fleet.start_agent(1);
    assert_connected_to_aedes(&fleet, &["node1"]);
    assert_eq!(fleet.node_status("node1")["online"], true);

    let out = run_with_timeout(
        Command::new("kill").args(["-KILL", &agent.pid().to_string()]),
        Duration::from_secs(5),
    )
    .expect("run kill");
    assert!(out.status.success(), "kill -KILL: {}", out.stderr);
    wait_for("the agent to die", REPLY_TIMEOUT, || {
        (!agent.is_running())
            .then_some(())
            .ok_or("still running".to_string())
    });
    let killed = std::time::Instant::now();
    // The agent is gone and cannot have said so itself: only the broker
    // publishes its will, and keeps it for managers that come later.
    let status = wait_for("node1's will, retained", REPLY_TIMEOUT, || {
        match fleet.retained(&fleet.topic("node1/status")) {
            Some(s) if s["online"] == false => Ok(s),
            other => Err(format!("status {other:?}")),
        }
    });
    assert_eq!(status, json!({"online": false}), "the will's payload");
    println!(
        "will {status} retained {:.1} s after SIGKILL",
        killed.elapsed().as_secs_f64()
    );
}

#[test]
fn a_job_published_while_the_agent_was_offline_runs_when_it_returns_over_aedes() {
    let fleet = Fleet::new(Bed::require());
    let mut a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = fleet.run(1, "counter", COUNTER_IMAGE, &[]);
    let name = source.name.clone();

    // Stopped by its pid (SIGTERM, its drain); its session stays on aedes.
    assert_eq!(a1.terminate(), Some(0), "{}", a1.log_text());
    let replies = fleet.subscribe(&fleet.topic("node1/jobs/+/accepted"));
    let job = fleet.send_migrate(&source, 2, None);
    let back_ms = now_ms();
    let _a1 = fleet.start_agent(1);

    let accepted = replies.wait_topic(&format!("/jobs/{job}/accepted"), REPLY_TIMEOUT);
    assert_eq!(accepted["job_id"], job.as_str());
    let at = replies
        .payloads_at()
        .into_iter()
        .zip(replies.messages())
        .find(|(_, (t, _))| t.ends_with(&format!("/jobs/{job}/accepted")))
        .map(|((at, _), _)| at)
        .expect("the accepted reply's arrival");
    assert!(
        at >= back_ms,
        "the job was accepted {} ms before the agent came back",
        back_ms - at
    );
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "final status: {status}");
    assert!(n2.is_running(&name), "{name} is not running on node2");
    assert!(!n1.exists(&name), "{name} is still on node1");
    println!(
        "the job held by aedes ran after the agent came back: accepted {} ms after the restart, timings {}",
        at - back_ms,
        status["timings_ms"]
    );
}
