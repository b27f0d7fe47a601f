//! Signed orders (issue 13, part 1) on the bed, with the production broker
//! configuration (`broker-config/mosquitto.conf` + `acl`, as in
//! `tests/security.rs`): agents given the manager's public order key
//! (`--order-key order.pub`) act only on jobs the manager signed, for them,
//! now, and once; a target checks the order in the `Prepare` itself.
//!
//! The jobs below are published with the manager's broker certificate: what
//! an attacker who took that certificate (but not the signing key, which
//! can stay offline) could send.
//!
//! Needs the bed: `tests/bed/bed up 2`, or `tests/run` for everything.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::migration::protocol::{self, Prepare, ToSource, ToTarget};
use ferry_agent::mqtt::contract::Envelope;
use ferry_agent::order::{unix_now, ManagerKey};
use ferry_agent::runtime::ContainerSpec;
use ferry_tests::broker::ROOT;
use ferry_tests::fleet::{ferry_bin, AgentOptions, SecureFleet};
use ferry_tests::{hostile, run_with_timeout, unique_name, Bed, CmdOutput, COUNTER_IMAGE};
use serde_json::{json, Map, Value};

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const TTL: Duration = Duration::from_secs(600);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A job JSON object.
fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn payload(envelope: &Envelope) -> String {
    serde_json::to_string(envelope).expect("envelope JSON")
}

/// `--order-key PATH` for `ferry agent`.
fn order_key_args(path: &Path) -> [&str; 2] {
    [
        "--order-key",
        path.to_str().expect("the certs path is UTF-8"),
    ]
}

/// `ferry migrate` as the manager, over mqtts, signing with `certs/order.key`.
fn cli_migrate(fleet: &SecureFleet, container: &str, from: &str, to: &str, job: &str) -> CmdOutput {
    let certs = &fleet.certs;
    let out = run_with_timeout(
        Command::new(ferry_bin())
            .args(["migrate", container, "--from", from, "--to", to])
            .args(["--job-id", job, "--mqtt", &fleet.broker.manager_url()])
            .args(["--topic-root", ROOT, "--tls-ca"])
            .arg(certs.join("ca.pem"))
            .arg("--tls-cert")
            .arg(certs.join("manager.pem"))
            .arg("--tls-key")
            .arg(certs.join("manager.key"))
            .arg("--order-key")
            .arg(certs.join("order.key")),
        JOB_TIMEOUT,
    )
    .expect("run ferry migrate");
    assert!(
        out.status.success(),
        "ferry migrate {job} failed: {}{}",
        out.stdout,
        out.stderr
    );
    out
}

/// A `Prepare` as a compromised `node1` would send it to node2's data port,
/// carrying `order`.
fn prepare(target_status: &Value, job: &str, name: &str, order: Option<Envelope>) -> Box<Prepare> {
    Box::new(Prepare {
        job_id: job.to_string(),
        source_node: "node1".into(),
        target_node: "node2".into(),
        checkpoint: format!("ferry-{job}"),
        spec: ContainerSpec {
            name: name.to_string(),
            image: COUNTER_IMAGE.to_string(),
            create_body: json!({"Image": COUNTER_IMAGE, "HostConfig": {"NetworkMode": "none"}}),
            networks: Vec::new(),
        },
        state: None,
        estimate_bytes: 1 << 20,
        arch: target_status["arch"].as_str().unwrap_or("").to_string(),
        page_size: target_status["page_size"].as_u64().unwrap_or(0),
        container_id: String::new(),
        order,
    })
}

/// Sends `prepare` to node2 over mutual TLS with node1's certificate;
/// returns node2's answer.
fn knock(fleet: &SecureFleet, prepare: Box<Prepare>) -> Result<ToSource, String> {
    let config =
        ferry_agent::stream::client_config(&fleet.tls_files("node1")).map_err(|e| e.to_string())?;
    let addr = fleet.data_addr("node2");
    runtime().block_on(async move {
        let mut tls = hostile::connect(Arc::clone(&config), addr, "node2").await?;
        protocol::send(&mut tls, &ToTarget::Prepare(prepare))
            .await
            .map_err(|e| format!("send: {e}"))?;
        protocol::recv::<_, ToSource>(&mut tls)
            .await
            .map_err(|e| format!("recv: {e}"))
    })
}

fn refused_with(answer: &Result<ToSource, String>, want: &str) -> bool {
    matches!(answer, Ok(ToSource::Refused { reason }) if reason.contains(want))
}

#[test]
fn only_the_managers_orders_for_this_node_run_and_only_once() {
    let fleet = SecureFleet::new(Bed::require());
    let order_pub = fleet.certs.join("order.pub");
    let with_key = AgentOptions {
        extra: &order_key_args(&order_pub),
        ..AgentOptions::default()
    };
    let mut a1 = fleet.start_agent_with(1, with_key);
    let mut a2 = fleet.start_agent_with(2, with_key);
    let manager = ManagerKey::load(&fleet.certs.join("order.key")).expect("the manager's key");
    let key_id = manager.id();
    for agent in [&a1, &a2] {
        let log = agent.log_text();
        assert!(
            log.lines().any(
                |l| l.contains("jobs must be signed by the manager's order key")
                    && l.contains(&key_id)
            ),
            "{} does not say it requires key {key_id}:\n{log}",
            agent.node
        );
    }
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let source = fleet.start_counter(1);
    let name = source.name.clone();
    let replies = fleet.subscribe(&format!("{ROOT}/+/jobs/#"));

    // A key node1 made itself: Ed25519 like the manager's, but not its.
    let node_key = ManagerKey::generate().expect("a node's own key");
    let to_node2 = object(json!({"action": "migrate", "container": name, "target": "node2"}));
    // The manager's order for node2 to send a container to node1, re-addressed.
    let to_node1 = object(json!({"action": "migrate", "container": name, "target": "node1"}));
    let now = unix_now();
    let sign = |key: &ManagerKey, job: &Map<String, Value>, node: &str, id: &str, at: u64| {
        payload(&key.sign(job, node, id, at, TTL).expect("sign"))
    };
    let mut cases = Vec::new();
    for (what, want) in [
        (
            "unsigned",
            format!(
                "unsigned job: node node1 acts only on jobs signed by the manager's key {key_id}"
            ),
        ),
        (
            "signed by a node's own key",
            format!("bad signature: not signed by the manager's key {key_id}"),
        ),
        (
            "for another node",
            r#"signed job names node "node2", but it was published as "node1""#.into(),
        ),
        ("expired", "order expired at".into()),
    ] {
        let id = unique_name("order");
        let body = match what {
            "unsigned" => Value::Object(to_node2.clone()).to_string(),
            "signed by a node's own key" => sign(&node_key, &to_node2, "node1", &id, now),
            "for another node" => sign(&manager, &to_node1, "node2", &id, now),
            // Issued two hours ago for ten minutes.
            _ => sign(&manager, &to_node2, "node1", &id, now - 7200),
        };
        fleet.publish(&format!("{ROOT}/node1/jobs/{id}"), &body, false);
        cases.push((what, id, want));
    }
    for (what, id, want) in &cases {
        let rejected = replies.wait_topic(&format!("/node1/jobs/{id}/rejected"), REPLY_TIMEOUT);
        let reason = rejected["reason"].as_str().unwrap_or("");
        assert!(reason.contains(want.as_str()), "{what}: {rejected}");
        println!("{what}: rejected: {reason}");
    }
    // Nothing happened on either node: the counter runs on node1 only, and
    // no job got a status anywhere.
    assert!(source.is_running(), "the counter stopped on node1");
    assert!(!n2.exists(&name), "{name} appeared on node2");
    for (what, id, _) in &cases {
        for node in ["node1", "node2"] {
            assert!(
                fleet
                    .retained(&format!("{ROOT}/{node}/jobs/{id}/status"))
                    .is_none(),
                "{what}: job {id} got a status on {node}"
            );
        }
        assert!(
            !replies
                .messages()
                .iter()
                .any(|(t, _)| t.ends_with(&format!("/jobs/{id}/accepted"))),
            "{what}: job {id} was accepted"
        );
    }

    // The manager's own orders run: there and back with `ferry migrate`,
    // which signs, each checked again by the target.
    let there = unique_name("there");
    let back = unique_name("back");
    cli_migrate(&fleet, &name, "node1", "node2", &there);
    assert!(
        n2.is_running(&name) && !n1.exists(&name),
        "{name} is not on node2 alone"
    );
    cli_migrate(&fleet, &name, "node2", "node1", &back);
    assert!(
        n1.is_running(&name) && !n2.exists(&name),
        "{name} is not on node1 alone"
    );
    for (job, target) in [(&there, "node2"), (&back, "node1")] {
        let seen = fleet.final_status(target, job, REPLY_TIMEOUT);
        assert_eq!(seen["state"], "succeeded", "{job} on {target}: {seen}");
    }

    // The first order again, exactly as the CLI published it (still within
    // its ten minutes): it would move the counter back to node2.
    let (_, original) = replies
        .messages()
        .into_iter()
        .find(|(t, _)| t == &format!("{ROOT}/node1/jobs/{there}"))
        .expect("the subscriber saw the CLI's job");
    let envelope: Envelope = serde_json::from_str(&original).expect("the CLI sent an envelope");
    assert_eq!(envelope.key_id.as_deref(), Some(key_id.as_str()));
    let replay_at = replies.messages().len();
    fleet.publish(&format!("{ROOT}/node1/jobs/{there}"), &original, false);
    let reason = ferry_tests::wait_for("the replay's rejection", REPLY_TIMEOUT, || {
        replies.messages()[replay_at..]
            .iter()
            .find(|(t, _)| t.ends_with(&format!("/node1/jobs/{there}/rejected")))
            .map(|(_, p)| p.clone())
            .ok_or("no rejection yet".to_string())
    });
    assert!(
        reason.contains(&format!(
            "job {there} was seen before on node1: a replayed or redelivered order is not run again"
        )),
        "{reason}"
    );
    println!("replayed: rejected: {reason}");

    // node1 itself, holding that order, asks node2 for the container once
    // more: node2 accepted this order before, and says so.
    let answer = knock(
        &fleet,
        prepare(&fleet.node_status("node2"), &there, &name, Some(envelope)),
    );
    assert!(
        refused_with(&answer, &format!("job {there} was seen before on node2")),
        "{answer:?}"
    );
    println!("replayed prepare: {answer:?}");

    let values = ferry_tests::counter_values(&n1.logs(&name));
    ferry_tests::wait_for("the counter to go on on node1", REPLY_TIMEOUT, || {
        let now = ferry_tests::counter_values(&n1.logs(&name));
        (now.len() > values.len() + 3).then_some(()).ok_or(format!(
            "{} values, were {}",
            now.len(),
            values.len()
        ))
    });
    assert!(n1.is_running(&name), "{name} stopped on node1");
    assert!(!n2.exists(&name), "{name} appeared on node2");
    assert!(a1.is_running() && a2.is_running(), "an agent died");
}

#[test]
fn a_target_with_the_key_checks_the_order_in_the_prepare() {
    let fleet = SecureFleet::new(Bed::require());
    let order_pub = fleet.certs.join("order.pub");
    // node1 runs without the key (accepts unsigned jobs, with a warning);
    // node2 has it.
    let mut a1 = fleet.start_agent(1);
    let mut a2 = fleet.start_agent_with(
        2,
        AgentOptions {
            extra: &order_key_args(&order_pub),
            ..AgentOptions::default()
        },
    );
    assert!(
        a1.log_text()
            .contains("no order_key: unsigned jobs are run"),
        "node1 does not warn:\n{}",
        a1.log_text()
    );
    let n2 = fleet.node(2);
    let source = fleet.start_counter(1);
    let name = source.name.clone();
    let manager = ManagerKey::load(&fleet.certs.join("order.key")).expect("the manager's key");

    // An unsigned job: node1 runs it, node2 refuses the prepare before
    // anything stopped.
    let job = fleet.send_migrate(&source, 2, None);
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    let error = status["error"].as_str().unwrap_or("");
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        error.contains("prepare without the signed order: node node2 acts only on migrations the manager signed"),
        "{status}"
    );
    assert!(
        status["timings_ms"]["checkpoint"].is_null(),
        "the source checkpointed: {status}"
    );
    println!("unsigned job, node2's answer: {error}");

    // node1 asks node2 directly: with an order for another container, and
    // with one signed by another key.
    let target = fleet.node_status("node2");
    let other_name = unique_name("other");
    fleet.track(&other_name);
    let id = unique_name("knock");
    let for_name = |container: &str, key: &ManagerKey| {
        let job = object(json!({"action": "migrate", "container": container, "target": "node2"}));
        key.sign(&job, "node1", &id, unix_now(), TTL).expect("sign")
    };
    let stranger = ManagerKey::generate().expect("another key");
    for (what, order, want) in [
        (
            "an order for another container",
            for_name(&name, &manager),
            format!("names container \"{name}\", but the prepare has \"{other_name}\""),
        ),
        (
            "an order signed by another key",
            for_name(&other_name, &stranger),
            format!(
                "bad signature: not signed by the manager's key {}",
                manager.id()
            ),
        ),
    ] {
        let answer = knock(&fleet, prepare(&target, &id, &other_name, Some(order)));
        assert!(refused_with(&answer, &want), "{what}: {answer:?}");
        println!("{what}: {answer:?}");
    }
    assert!(!n2.exists(&other_name), "{other_name} was created on node2");
    assert!(!n2.exists(&name), "{name} was created on node2");
    assert!(source.is_running(), "the counter stopped on node1");
    assert!(a1.is_running() && a2.is_running(), "an agent died");
}
