//! Fleet operations on the bed (issue 12): automatic placement and
//! evacuating a node. Real mosquitto, one real dockerd per node, real CRIU,
//! real `ferry agent` processes; needs a bed of 4 nodes
//! (`tests/bed/bed up 4`).
//!
//! The node "with too little free memory" is made real with the agent's
//! `--offer-memory` cap: its status offers 4096 bytes, less than any
//! container uses, while the machine keeps its memory (a memhog filling the
//! host would starve the other nodes of the same machine too).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_tests::fleet::{AgentOptions, DevFleet as Fleet, LastLogs};
use ferry_tests::{
    check_counter_resumed, counter_values, free_port, memhog_ready, parse_counter, parse_memhog,
    run_with_timeout, unique_name, wait_for, Bed, Node, COUNTER_IMAGE, MEMHOG_IMAGE,
};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const REDIS_IMAGE: &str = "ferry-test/redis:latest";
const LABEL: &str = "ferry.migrate=true";

fn bed_of_four() -> Bed {
    let bed = Bed::require();
    assert!(
        bed.nodes.len() >= 4,
        "these tests need 4 nodes: tests/bed/bed down; tests/bed/bed up 4 (the bed has {})",
        bed.nodes.len()
    );
    bed
}

#[test]
fn auto_picks_the_only_compatible_node_and_names_why_the_others_were_excluded() {
    let fleet = Fleet::new(bed_of_four());
    let _a1 = fleet.start_agent(1);
    // node2: offline (its agent stopped; the retained status says so).
    let mut a2 = fleet.start_agent(2);
    a2.terminate();
    assert_eq!(fleet.node_status("node2")["online"], false);
    // node3: online and compatible, but offers 4096 bytes of memory.
    let _a3 = fleet.start_agent_with(
        3,
        AgentOptions {
            extra: &["--offer-memory", "4096"],
            ..Default::default()
        },
    );
    assert_eq!(fleet.node_status("node3")["free_mem"], 4096);
    let _a4 = fleet.start_agent(4);
    let n4 = fleet.node(4);

    let source = fleet.start_counter(1);
    let name = source.name.clone();
    let replies = fleet.subscribe(&fleet.topic("node1/jobs/+/accepted"));
    let logs = LastLogs::follow(&source.node, &name);
    let job = unique_name("auto");
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": name, "target": "auto"}),
    );
    let accepted = replies.wait_topic(&format!("/jobs/{job}/accepted"), REPLY_TIMEOUT);
    assert_eq!(accepted["target"], "node4", "accepted: {accepted}");
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["target"], "node4", "{status}");
    let excluded = &status["excluded"];
    assert_eq!(
        excluded["node2"], "target node node2 is offline",
        "{status}"
    );
    let small = excluded["node3"].as_str().unwrap_or("");
    assert!(
        small.starts_with("node3 offers 4096 bytes of memory for a container using "),
        "{status}"
    );
    let before = counter_values(&logs.finish());
    wait_for("counter on node4", REPLY_TIMEOUT, || {
        check_counter_resumed(&before, &parse_counter(&n4.logs(&name))?, 3)
    });
    println!(
        "auto placed {name} on node4; excluded: {excluded}; timings {}",
        status["timings_ms"]
    );

    // The two others as a list: nothing fits, and the rejection says why
    // for each; the container stays where it is.
    let other = fleet.start_counter(1);
    let rejected = fleet.subscribe(&fleet.topic("node1/jobs/+/rejected"));
    let job = unique_name("among");
    fleet.send_job(
        "node1",
        &job,
        &json!({"action": "migrate", "container": other.name, "target": ["node2", "node3"]}),
    );
    let reply = rejected.wait_topic(&format!("/jobs/{job}/rejected"), REPLY_TIMEOUT);
    let reason = reply["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("precheck: no candidate node fits: node2: target node node2 is offline; node3: node3 offers 4096 bytes of memory"),
        "{reply}"
    );
    assert!(other.is_running(), "{} stopped on node1", other.name);
    println!("rejected as a list: {reason}");
}

#[test]
fn evacuate_moves_the_labelled_containers_and_reports_the_one_that_cannot_move() {
    let fleet = Fleet::new(bed_of_four());
    let _agents: Vec<_> = (1..=3).map(|n| fleet.start_agent(n)).collect();
    let n1 = fleet.node(1);
    let label = ["--label", LABEL];

    let counter = fleet.run_opts(1, "counter", COUNTER_IMAGE, &label, &[]);
    counter.wait_counting(REPLY_TIMEOUT);
    let memhog = fleet.run_opts(1, "memhog", MEMHOG_IMAGE, &label, &["64"]);
    let checksum = memhog_ready(&memhog);
    let addrs: Vec<Ipv4Addr> = fleet.bed.nodes.iter().map(|n| n.addr).collect();
    let port = free_port(&addrs);
    let publish = format!("{}:{port}:6379", n1.addr);
    let redis = fleet.run_with(
        1,
        "redis",
        &["--label", LABEL, "-p", &publish],
        REDIS_IMAGE,
        &[],
    );
    wait_for("redis on node1", REPLY_TIMEOUT, || {
        redis_cli(n1.addr, port, &["PING"]).and_then(|r| (r == "PONG").then_some(()).ok_or(r))
    });
    assert_eq!(
        redis_cli(n1.addr, port, &["SET", "ferry", "evacuated"]).unwrap(),
        "OK"
    );
    let digest = redis_cli(n1.addr, port, &["DEBUG", "DIGEST"]).unwrap();
    let run_id = info_field(
        &redis_cli(n1.addr, port, &["INFO", "server"]).unwrap(),
        "run_id",
    );
    let unlabelled = fleet.start_counter(1);

    // 1. node1's CRIU fails for the memhog only (tests/bed/bed: fail-criu
    //    holding its id): the memhog stays and is reported, the rest move.
    let fail = Flag::set(n1.dir.join("fail-criu"), &memhog.id);
    let counter_logs = LastLogs::follow(n1, &counter.name);
    let first = unique_name("evac");
    // Pre-copy off: the forced CRIU failure then hits the stopping
    // checkpoint, and the memhog must be rolled back (with pre-copy it
    // fails at the first leave-running dump, before anything stopped).
    let out = fleet.ferry(
        &["evacuate", "node1", "--job-id", &first, "--precopy", "off"],
        JOB_TIMEOUT,
    );
    drop(fail);
    println!(
        "ferry evacuate (with a failure):\n{}{}",
        out.stdout, out.stderr
    );
    assert!(!out.status.success(), "the evacuation should fail");
    let status = fleet.final_status("node1", &first, REPLY_TIMEOUT);
    assert_eq!(status["action"], "evacuate", "{status}");
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["selector"], LABEL, "{status}");
    let children = status["children"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<&str> = children
        .iter()
        .filter_map(|c| c["container"].as_str())
        .collect();
    names.sort();
    let mut want = vec![
        counter.name.as_str(),
        memhog.name.as_str(),
        redis.name.as_str(),
    ];
    want.sort();
    assert_eq!(names, want, "the evacuation's containers: {status}");
    let child = |name: &str| -> Value {
        children
            .iter()
            .find(|c| c["container"] == name)
            .cloned()
            .unwrap_or_default()
    };
    let hog = child(&memhog.name);
    assert_ne!(hog["state"], "succeeded", "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("1 of 3 containers did not move: {} ", memhog.name)),
        "{status}"
    );
    // Every child has its own status under its own id.
    let hog_status = fleet.final_status("node1", hog["job_id"].as_str().unwrap(), REPLY_TIMEOUT);
    assert_eq!(hog_status["parent"], first.as_str(), "{hog_status}");
    assert_eq!(hog_status["state"], "rolled_back", "{hog_status}");
    let error = hog_status["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&format!("runc checkpoint of {} failed", memhog.id))
            && error.contains("CRIU"),
        "the memhog's error should carry runc's and CRIU's: {hog_status}"
    );
    // The memhog runs on node1 with its memory as it was.
    assert!(memhog.is_running(), "the memhog stopped on node1");
    let ticks = parse_memhog(&memhog.logs()).unwrap().ticks.len();
    let log = wait_for("the memhog ticking on node1", REPLY_TIMEOUT, || {
        let log = parse_memhog(&memhog.logs())?;
        (log.ticks.len() > ticks)
            .then_some(log)
            .ok_or("no new tick".to_string())
    });
    assert_eq!(log.mismatch, None, "the memhog's memory changed");
    assert!(log.ticks.iter().all(|(_, s)| s == &checksum), "{log:?}");

    // The counter and redis run elsewhere, with their state.
    let moved_to = |c: &Value| -> &Node {
        assert_eq!(c["state"], "succeeded", "{status}");
        let t = c["target"].as_str().unwrap_or("");
        assert!(t == "node2" || t == "node3", "{c}");
        fleet.bed.nodes.iter().find(|n| n.name == t).unwrap()
    };
    let at = moved_to(&child(&counter.name));
    let before = counter_values(&counter_logs.finish());
    wait_for(&format!("counter on {}", at.name), REPLY_TIMEOUT, || {
        check_counter_resumed(&before, &parse_counter(&at.logs(&counter.name))?, 3)
    });
    assert!(!n1.exists(&counter.name));
    let at = moved_to(&child(&redis.name));
    wait_for(&format!("redis on {}", at.name), REPLY_TIMEOUT, || {
        redis_cli(at.addr, port, &["GET", "ferry"])
            .and_then(|r| (r == "evacuated").then_some(()).ok_or(r))
    });
    assert_eq!(
        redis_cli(at.addr, port, &["DEBUG", "DIGEST"]).unwrap(),
        digest
    );
    let info = redis_cli(at.addr, port, &["INFO", "server"]).unwrap();
    assert_eq!(info_field(&info, "run_id"), run_id, "redis restarted");
    assert!(!n1.exists(&redis.name));
    // One line per container on the way.
    for c in &children {
        let id = c["job_id"].as_str().unwrap_or("?");
        assert!(
            out.stderr.lines().any(|l| l.starts_with(&format!("{id} "))),
            "no progress line for {id}: {}",
            out.stderr
        );
    }

    // 2. Again without the failure: the memhog moves, with its memory;
    //    the unlabelled counter stays.
    let second = unique_name("evac");
    let out = fleet.ferry(&["evacuate", "node1", "--job-id", &second], JOB_TIMEOUT);
    println!("ferry evacuate:\n{}{}", out.stdout, out.stderr);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let status = fleet.final_status("node1", &second, REPLY_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    let children = status["children"].as_array().cloned().unwrap_or_default();
    assert_eq!(children.len(), 1, "{status}");
    assert_eq!(children[0]["container"], memhog.name.as_str());
    let at = moved_to(&children[0]);
    let log = wait_for(
        &format!("the memhog ticking on {}", at.name),
        REPLY_TIMEOUT,
        || {
            let log = parse_memhog(&at.logs(&memhog.name))?;
            (log.ticks.len() >= 2 || log.mismatch.is_some())
                .then_some(log)
                .ok_or("fewer than 2 ticks".to_string())
        },
    );
    assert_eq!(log.mismatch, None, "memory corrupted");
    assert_eq!(log.ready, None, "the memhog started over");
    assert!(log.ticks.iter().all(|(_, s)| s == &checksum), "{log:?}");
    assert!(unlabelled.is_running(), "the unlabelled counter left node1");
    assert!(!n1.exists(&memhog.name));
    println!("evacuated: {}", status["children"]);
}

/// A file that exists until dropped.
struct Flag(PathBuf);

impl Flag {
    fn set(path: PathBuf, text: &str) -> Flag {
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Flag(path)
    }
}

impl Drop for Flag {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn redis_cli(addr: Ipv4Addr, port: u16, args: &[&str]) -> Result<String, String> {
    let out = run_with_timeout(
        Command::new("redis-cli")
            .args(["-h", &addr.to_string(), "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(30),
    )
    .map_err(|e| format!("redis-cli: {e} (install: apt-get install redis-tools)"))?;
    let text = out.stdout.trim().to_string();
    if !out.status.success() || text.starts_with("Could not connect") || text.starts_with("ERR") {
        return Err(format!("redis-cli {args:?}: {text} {}", out.stderr.trim()));
    }
    Ok(text)
}

fn info_field(info: &str, key: &str) -> String {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("INFO has no {key}: {info}"))
        .to_string()
}

#[test]
fn a_canceled_evacuation_starts_no_further_container() {
    let fleet = Fleet::new(bed_of_four());
    let _agents: Vec<_> = (1..=2).map(|n| fleet.start_agent(n)).collect();
    let n1 = fleet.node(1);
    let label = ["--label", LABEL];
    let first = fleet.run_opts(1, "a-counter", COUNTER_IMAGE, &label, &[]);
    let second = fleet.run_opts(1, "b-counter", COUNTER_IMAGE, &label, &[]);
    first.wait_counting(REPLY_TIMEOUT);
    second.wait_counting(REPLY_TIMEOUT);

    let evac = unique_name("evac");
    let statuses = fleet.subscribe(&fleet.topic(&format!("node1/jobs/{evac}/status")));
    fleet.send_job(
        "node1",
        &evac,
        &json!({"action": "evacuate", "targets": ["node2"]}),
    );
    // Cancel once the first container's migration is under way.
    wait_for("the first container in progress", REPLY_TIMEOUT, || {
        statuses
            .messages()
            .iter()
            .filter_map(|(_, p)| serde_json::from_str::<Value>(p).ok())
            .any(|s| s["children"][0]["state"] == "in_progress")
            .then_some(())
            .ok_or("not yet".to_string())
    });
    fleet.send_job(
        "node1",
        &unique_name("cancel"),
        &json!({"action": "cancel", "job": evac}),
    );
    let status = fleet.final_status("node1", &evac, JOB_TIMEOUT);
    println!("canceled evacuation: {status}");
    assert_eq!(status["state"], "canceled", "{status}");
    let children = status["children"].as_array().cloned().unwrap_or_default();
    assert_eq!(children.len(), 2, "{status}");
    // Children go in name order: a-counter first.
    assert_eq!(children[0]["container"], first.name.as_str());
    assert_eq!(children[1]["state"], "canceled", "{status}");
    assert_eq!(
        children[1]["error"], "the evacuation was canceled",
        "{status}"
    );
    assert!(second.is_running(), "the second counter left node1");
    assert!(!fleet.node(2).exists(&second.name));
    // The first either got past its commit (on node2) or was canceled
    // (running on node1): never both, never neither.
    let running = |n: &Node| n.exists(&first.name) && n.is_running(&first.name);
    let (on1, on2) = (running(n1), running(fleet.node(2)));
    match children[0]["state"].as_str() {
        Some("succeeded") => assert!(!on1 && on2, "{status}"),
        Some("canceled") => assert!(on1 && !on2, "{status}"),
        other => panic!("the first child ended {other:?}: {status}"),
    }
}
