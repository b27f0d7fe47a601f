//! Security on the bed with the production broker configuration
//! (`broker-config/mosquitto.conf` + `acl`, started by the test itself):
//! who may publish and read what, who may connect to the broker and to a
//! data port, hostile archives and a corrupted stream fed to a real agent,
//! and a migration with everything on TLS.
//!
//! Needs the bed: `tests/bed/bed up 2`, or `tests/run` for everything.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::migration::protocol::{self, Prepare, ToSource, ToTarget};
use ferry_agent::runtime::ContainerSpec;
use ferry_agent::stream::wire::TransferHeader;
use ferry_tests::broker::{Who, ROOT};
use ferry_tests::fleet::{AgentOptions, SecureFleet};
use ferry_tests::hostile::{self, tar_header, tree, FlipRelay, Outcome, Zstd};
use ferry_tests::{unique_name, wait_for, Bed, COUNTER_IMAGE};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The agent colours its log even into a file; the figures read better without.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A prepare for a `counter` container `name` from `source` to `target`,
/// announcing `estimate` bytes, with the target's own arch and page size.
fn prepare(target_status: &Value, job: &str, source: &str, target: &str, name: &str) -> Prepare {
    Prepare {
        job_id: job.to_string(),
        source_node: source.to_string(),
        target_node: target.to_string(),
        checkpoint: format!("ferry-{job}"),
        spec: ContainerSpec {
            name: name.to_string(),
            image: COUNTER_IMAGE.to_string(),
            create_body: json!({"Image": COUNTER_IMAGE, "HostConfig": {"NetworkMode": "none"}}),
            networks: Vec::new(),
        },
        state: None,
        estimate_bytes: MIB,
        arch: target_status["arch"].as_str().unwrap_or("").to_string(),
        page_size: target_status["page_size"].as_u64().unwrap_or(0),
        container_id: String::new(),
        order: None,
    }
}

#[test]
fn node_certificates_are_confined_to_their_own_topics() {
    let fleet = SecureFleet::new(Bed::require());
    let mut a1 = fleet.start_agent(1);
    let mut a2 = fleet.start_agent(2);
    let everything = fleet.subscribe(&format!("{ROOT}/#"));

    // node1's certificate publishes a job to node2, and forges node2's
    // status and a reply of node2's.
    let forged = unique_name("forged");
    let job = json!({"action": "migrate", "container": "anything", "target": "node1"}).to_string();
    for (topic, payload, retain) in [
        (format!("{ROOT}/node2/jobs/{forged}"), job.as_str(), false),
        (format!("{ROOT}/node2/status"), r#"{"online":false}"#, true),
        (
            format!("{ROOT}/node2/jobs/{forged}/accepted"),
            r#"{"job_id":"x","node":"node2"}"#,
            false,
        ),
    ] {
        let out = fleet.publish_as(Who::Fleet("node1"), &topic, payload, retain);
        // MQTT 3.1.1 has no negative PUBACK: the client cannot tell.
        assert!(out.status.success(), "{topic}: {}", out.stderr);
    }
    // Control, published last: the same job from the manager reaches
    // node2, which answers.
    let allowed = unique_name("allowed");
    fleet.publish(&format!("{ROOT}/node2/jobs/{allowed}"), &job, false);
    let reply = everything.wait_topic(&format!("/node2/jobs/{allowed}/rejected"), REPLY_TIMEOUT);
    assert!(
        reply["reason"].as_str().unwrap_or("").contains("anything"),
        "{reply}"
    );
    // What orders the checks below: each publish above returned after the
    // broker's PUBACK, and the broker hands a subscriber its messages in
    // the order it took them in. So whatever it let through of node1's
    // publishes reached `everything` before node2's reply to the control.
    // (node2's agent, too, would have been handed the forged job before the
    // control; should the broker leak it, `everything` shows it in any case.)
    let seen = everything.messages();
    let forged_seen: Vec<_> = seen.iter().filter(|(t, _)| t.contains(&forged)).collect();
    assert!(
        forged_seen.is_empty(),
        "the broker passed node1's publishes under node2's topics: {forged_seen:?}"
    );
    assert!(
        !a2.log_text().contains(&forged),
        "node2's agent saw the forged job"
    );
    assert_eq!(
        fleet.node_status("node2")["online"],
        true,
        "node1 overwrote node2's retained status"
    );

    // node2's certificate listens to node1's jobs: the broker acknowledges
    // the subscription but must deliver nothing under it. The certificate
    // is node2's client id on the nodes' listener, so node2's agent steps
    // aside first. The same client also reads node2's own jobs, which it
    // may: the control below comes that way.
    a2.terminate();
    let spy = fleet.subscribe_as(
        Who::Fleet("node2"),
        &[
            &format!("{ROOT}/node1/jobs/+"),
            &format!("{ROOT}/node2/jobs/+"),
        ],
    );
    assert!(spy.subscribed(), "{}", spy.diagnostics());
    // A job for node1 from the manager: node1 sees it, node2's spy not.
    let for_node1 = unique_name("n1job");
    fleet.publish(
        &format!("{ROOT}/node1/jobs/{for_node1}"),
        &job.replace("node1", "node2"),
        false,
    );
    everything.wait_topic(&format!("/node1/jobs/{for_node1}/rejected"), REPLY_TIMEOUT);
    let control = unique_name("control");
    fleet.publish(&format!("{ROOT}/node2/jobs/{control}"), &job, false);
    // node1's job reached the spy, if at all, before the control did.
    spy.wait_topic(&format!("/node2/jobs/{control}"), REPLY_TIMEOUT);
    let control = format!("{ROOT}/node2/jobs/{control}");
    let spied: Vec<_> = spy
        .messages()
        .into_iter()
        .filter(|(t, _)| *t != control)
        .collect();
    assert!(spied.is_empty(), "node2 read node1's jobs: {spied:?}");
    assert!(
        a1.log_text().contains(&for_node1),
        "node1 never got its job"
    );
    assert!(a1.is_running());
    println!(
        "broker dropped node1's job to node2, the forged status and reply; node2 read none of node1's jobs; manager's messages seen: {}",
        seen.len()
    );
}

/// Client ids are bound to certificates: node1's certificate asking for
/// client id node2 is connected as node1 (and cannot get onto the
/// manager's listener at all), so node2 keeps its session and its jobs;
/// two manager clients run side by side.
#[test]
fn a_node_cannot_take_over_another_nodes_session() {
    let fleet = SecureFleet::new(Bed::require());
    let mut a2 = fleet.start_agent(2);
    let everything = fleet.subscribe(&format!("{ROOT}/#"));
    let second_manager = fleet.subscribe(&format!("{ROOT}/+/jobs/+/rejected"));
    let broker = &fleet.broker;

    let mut cmd = broker.client_on("mosquitto_sub", Who::Fleet("node1"), broker.port);
    cmd.args(["-i", "node2", "-c"]);
    let intruder = fleet.subscribe_with(cmd, &[&format!("{ROOT}/node2/jobs/+")]);
    assert!(intruder.subscribed(), "{}", intruder.diagnostics());
    let mut cmd = broker.client_on("mosquitto_sub", Who::Fleet("node1"), broker.manager_port);
    cmd.args(["-i", "node2"]);
    let on_manager_port = fleet.subscribe_with(cmd, &[&format!("{ROOT}/node2/jobs/+")]);
    assert!(
        !on_manager_port.subscribed(),
        "node1's certificate got onto the manager's listener"
    );

    // node2 still has its session: a job from the manager reaches it.
    let job = unique_name("after");
    let order = json!({"action": "migrate", "container": "anything", "target": "node1"});
    fleet.publish(
        &format!("{ROOT}/node2/jobs/{job}"),
        &order.to_string(),
        false,
    );
    let reply = everything.wait_topic(&format!("/node2/jobs/{job}/rejected"), REPLY_TIMEOUT);
    assert!(
        reply["reason"].as_str().unwrap_or("").contains("anything"),
        "{reply}"
    );
    second_manager.wait_topic(&format!("/node2/jobs/{job}/rejected"), REPLY_TIMEOUT);
    assert!(
        intruder.messages().is_empty(),
        "the intruder read node2's jobs: {:?}",
        intruder.messages()
    );
    let log = fleet.broker_log_text();
    assert!(
        !log.contains("already connected, closing old connection"),
        "a client was taken over:\n{log}"
    );
    let intruder_login: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains("u'node1'"))
        .collect();
    assert!(
        intruder_login.len() == 1 && intruder_login[0].contains(" as node1 ("),
        "{log}"
    );
    assert!(a2.is_running());

    // Two `ferry nodes` at once on the manager's listener, as the README
    // says to run the CLI: both connect and list node2.
    let cli = || {
        std::process::Command::new(ferry_tests::fleet::ferry_bin())
            .args(["nodes", "--mqtt"])
            .arg(format!("mqtts://127.0.0.1:{}", broker.manager_port))
            .arg("--tls-ca")
            .arg(fleet.certs.join("ca.pem"))
            .arg("--tls-cert")
            .arg(fleet.certs.join("manager.pem"))
            .arg("--tls-key")
            .arg(fleet.certs.join("manager.key"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ferry nodes")
    };
    let (one, two) = (cli(), cli());
    for out in [one, two] {
        let out = out.wait_with_output().expect("ferry nodes");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.lines().any(|l| l.starts_with("node2 ")),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "node1's certificate asking for client id node2: {}; on the manager's listener: refused ({}); node2 answered job {job}; two manager clients side by side",
        intruder_login[0].trim(),
        on_manager_port.diagnostics().lines().last().unwrap_or("").trim()
    );
}

/// `ferry certs --revoke node1`: the broker (restarted: mosquitto reads its
/// CRL at start) and node2's data port (started with `--tls-crl`) refuse
/// node1's certificate; node2's own still works on both.
#[test]
fn a_revoked_node_is_refused_by_the_broker_and_by_data_ports() {
    let mut fleet = SecureFleet::new(Bed::require());
    // Before: node1's certificate gets in (the broker reads the empty list
    // `ferry certs` wrote).
    let before = fleet.publish_as(
        Who::Fleet("node1"),
        &format!("{ROOT}/node1/status"),
        "{}",
        false,
    );
    assert!(before.status.success(), "{}", before.stderr);
    let out = ferry_tests::run_with_timeout(
        std::process::Command::new(ferry_tests::fleet::ferry_bin())
            .args(["certs", "--out"])
            .arg(&fleet.certs)
            .args(["--revoke", "node1"]),
        Duration::from_secs(30),
    )
    .expect("run ferry certs --revoke");
    assert!(
        out.status.success() && out.stdout.contains("revoked node1"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    fleet.broker.restart();
    let crl = fleet.certs.join("crl.pem").display().to_string();
    let mut a2 = fleet.start_agent_with(
        2,
        AgentOptions {
            extra: &["--tls-crl", &crl],
            ..AgentOptions::default()
        },
    );
    // The broker: node1 is refused, node2 (its agent) is online.
    let refused = fleet.publish_as(
        Who::Fleet("node1"),
        &format!("{ROOT}/node1/status"),
        "{}",
        false,
    );
    assert!(
        !refused.status.success(),
        "node1 could publish: {}",
        refused.stdout
    );
    assert_eq!(fleet.node_status("node2")["online"], true);
    // node2's data port: node1 is refused in the handshake; node2's
    // certificate gets a session (and a refusal for naming node3).
    let addr = fleet.data_addr("node2");
    let target = fleet.node_status("node2");
    let rt = runtime();
    let as_node =
        |n: &str| ferry_agent::stream::client_config(&fleet.tls_files(n)).expect("client config");
    let p = |source: &str| prepare(&target, &unique_name("revoked"), source, "node2", "never");
    let answer = rt.block_on(knock(as_node("node1"), addr, p("node1")));
    assert!(answer.is_err(), "node1 got in: {answer:?}");
    let answer = rt.block_on(knock(as_node("node2"), addr, p("node3")));
    assert!(
        matches!(&answer, Ok(ToSource::Refused { reason }) if reason.contains("node3")),
        "{answer:?}"
    );
    let line = wait_for("node2 to log why it refused node1", REPLY_TIMEOUT, || {
        a2.log_text()
            .lines()
            .find(|l| l.contains("data port TLS handshake failed"))
            .map(strip_ansi)
            .ok_or("not yet".to_string())
    });
    assert!(line.contains("invalid peer certificate: Revoked"), "{line}");
    let broker_log = fleet.broker_log_text();
    println!(
        "revoked node1: broker refused its publish ({}), node2's data port: {line}; broker log: {:?}",
        refused.stderr.trim(),
        broker_log
            .lines()
            .filter(|l| l.contains("OpenSSL") || l.contains("revoked"))
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(a2.is_running());
}

fn sighup(pid: u32) {
    let out = ferry_tests::run_with_timeout(
        std::process::Command::new("kill").args(["-HUP", &pid.to_string()]),
        Duration::from_secs(10),
    )
    .expect("run kill");
    assert!(out.status.success(), "kill -HUP {pid}: {}", out.stderr);
}

/// `ferry certs` re-issues every leaf while a rate-limited memhog migration
/// is in its transfer; SIGHUP makes both agents take the new files for new
/// data connections, the running one goes on and succeeds, and node2's data
/// port then presents its new certificate. A revocation is picked up the
/// same way, without a restart.
#[test]
fn a_renewed_certificate_is_picked_up_on_sighup_during_a_running_migration() {
    let fleet = SecureFleet::new(Bed::require());
    let crl = fleet.certs.join("crl.pem").display().to_string();
    let extra = ["--tls-crl", crl.as_str()];
    let with_crl = || AgentOptions {
        extra: &extra,
        ..AgentOptions::default()
    };
    let a1 = fleet.start_agent_with(1, with_crl());
    let mut a2 = fleet.start_agent_with(2, with_crl());
    let source = fleet.run(1, "memhog", ferry_tests::MEMHOG_IMAGE, &["64"]);
    ferry_tests::memhog_ready(&source);
    let job = fleet.send_migrate(
        &source,
        2,
        Some(json!({"rate_limit": "2MiB/s", "precopy": "off"})),
    );
    let topic = format!("{ROOT}/node1/jobs/{job}/status");
    wait_for("the job's transfer phase", JOB_TIMEOUT, || {
        match fleet.retained(&topic) {
            Some(s) if s["phase"] == "transfer" && s["bytes_wire"].as_u64().unwrap_or(0) > 0 => {
                Ok(())
            }
            Some(s) if s["state"] != "in_progress" => panic!("job ended before the transfer: {s}"),
            other => Err(format!("status {other:?}")),
        }
    });
    let old_node2 = std::fs::read(fleet.certs.join("node2.pem")).expect("node2.pem");
    let out = ferry_tests::run_with_timeout(
        std::process::Command::new(ferry_tests::fleet::ferry_bin())
            .args(["certs", "--out"])
            .arg(&fleet.certs)
            .args(["--nodes", "node1,node2"]),
        Duration::from_secs(30),
    )
    .expect("run ferry certs");
    assert!(out.status.success(), "{}", out.stderr);
    let new_node2 = std::fs::read(fleet.certs.join("node2.pem")).expect("node2.pem");
    assert_ne!(
        old_node2, new_node2,
        "node2's certificate was not re-issued"
    );
    sighup(a1.pid());
    sighup(a2.pid());
    let during = fleet.retained(&topic).unwrap_or_default();
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(
        during["state"], "in_progress",
        "SIGHUP came too late: {during}"
    );
    for agent in [&a1, &a2] {
        assert!(
            agent
                .log_text()
                .contains("SIGHUP: the data port uses the reloaded"),
            "{}: {}",
            agent.node,
            agent.log_text()
        );
    }
    // A new connection to node2 meets its new certificate.
    let rt = runtime();
    let config =
        ferry_agent::stream::client_config(&fleet.tls_files("node1")).expect("client config");
    let addr = fleet.data_addr("node2");
    let presented = rt.block_on(async {
        let tls = hostile::connect(config, addr, "node2")
            .await
            .expect("connect");
        tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
    });
    use rustls_pki_types::pem::PemObject;
    let new_der = rustls_pki_types::CertificateDer::from_pem_slice(&new_node2).expect("pem");
    assert_eq!(
        presented,
        new_der.to_vec(),
        "node2 still presents its old certificate"
    );

    // Revoking node1 and SIGHUP: node2's data port refuses it from then on.
    let out = ferry_tests::run_with_timeout(
        std::process::Command::new(ferry_tests::fleet::ferry_bin())
            .args(["certs", "--out"])
            .arg(&fleet.certs)
            .args(["--revoke", "node1"]),
        Duration::from_secs(30),
    )
    .expect("run ferry certs --revoke");
    assert!(out.status.success(), "{}", out.stderr);
    sighup(a2.pid());
    wait_for("node2 to reload", REPLY_TIMEOUT, || {
        (a2.log_text()
            .matches("SIGHUP: the data port uses the reloaded")
            .count()
            == 2)
            .then_some(())
            .ok_or("not yet".to_string())
    });
    let target = fleet.node_status("node2");
    let config =
        ferry_agent::stream::client_config(&fleet.tls_files("node1")).expect("client config");
    let answer = rt.block_on(knock(
        config,
        addr,
        prepare(&target, &unique_name("revoked"), "node1", "node2", "never"),
    ));
    assert!(answer.is_err(), "revoked node1 got in: {answer:?}");
    // The client may read the alert before the agent logs why it sent it.
    wait_for(
        "node2 to log the revoked certificate",
        REPLY_TIMEOUT,
        || {
            a2.log_text()
                .contains("invalid peer certificate: Revoked")
                .then_some(())
                .ok_or("not yet".to_string())
        },
    );
    assert!(a2.is_running());
    println!(
        "renewed during the transfer of job {job}: it {} in {} ms of transfer; node2 presents its new certificate; node1 revoked on SIGHUP: {answer:?}",
        status["state"], status["timings_ms"]["transfer"]
    );
}

#[test]
fn broker_refuses_clients_without_a_fleet_certificate() {
    let fleet = SecureFleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let everything = fleet.subscribe(&format!("{ROOT}/#"));
    let job = json!({"action": "migrate", "container": "anything", "target": "node2"}).to_string();
    for who in [Who::NoCert, Who::Rogue("manager"), Who::Rogue("node1")] {
        let id = unique_name("intruder");
        let out = fleet.publish_as(who, &format!("{ROOT}/node1/jobs/{id}"), &job, false);
        assert!(
            !out.status.success(),
            "{who:?} could publish: {}",
            out.stdout
        );
        let sub = fleet.subscribe_as(who, &[&format!("{ROOT}/#")]);
        assert!(!sub.subscribed(), "{who:?} could subscribe");
        println!(
            "{who:?}: publish refused ({}), subscribe refused ({})",
            out.stderr.trim(),
            sub.diagnostics().lines().last().unwrap_or("").trim()
        );
    }
    // Plain MQTT on the TLS port gets nowhere either.
    let plain = ferry_tests::run_with_timeout(
        std::process::Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &fleet.broker.port.to_string(),
            "-t",
            &format!("{ROOT}/node1/jobs/plain"),
            "-m",
            &job,
        ]),
        Duration::from_secs(15),
    );
    assert!(
        plain.map(|o| !o.status.success()).unwrap_or(true),
        "plain MQTT was accepted on the TLS listener"
    );
    // What orders the check below: a job from the manager, published
    // after every attempt above ended; the broker hands `everything` its
    // messages in the order it took them in.
    let marker = unique_name("marker");
    fleet.publish(&format!("{ROOT}/node1/jobs/{marker}"), &job, false);
    everything.wait_topic(&format!("/node1/jobs/{marker}"), REPLY_TIMEOUT);
    let jobs: Vec<_> = everything
        .messages()
        .into_iter()
        .filter(|(t, _)| t.contains("/jobs/") && !t.contains(&marker))
        .collect();
    assert!(jobs.is_empty(), "an intruder's job got through: {jobs:?}");
    let log = fleet.broker_log_text();
    assert!(
        log.contains("peer did not return a certificate"),
        "broker log does not show the refused handshake:\n{log}"
    );
}

#[test]
fn oversized_jobs_stop_at_the_broker_or_the_agent() {
    let fleet = SecureFleet::new(Bed::require());
    let mut a1 = fleet.start_agent(1);
    let everything = fleet.subscribe(&format!("{ROOT}/#"));
    // Over max_packet_size (256 KiB): the broker drops the publisher.
    let big = fleet.dir.join("big.json");
    let filler = "a".repeat(300 * 1024);
    let job = json!({"action": "cancel", "job": filler}).to_string();
    std::fs::write(&big, &job).unwrap();
    let id = unique_name("big");
    let out = fleet.publish_file_as(
        Who::Fleet("manager"),
        &format!("{ROOT}/node1/jobs/{id}"),
        &big,
    );
    assert!(
        !out.status.success(),
        "a {} byte publish went through",
        job.len()
    );
    // Under it, but over the agent's 16 KiB job limit: rejected with the size.
    let medium = fleet.dir.join("medium.json");
    std::fs::write(&medium, job.replace(&filler, &"a".repeat(100 * 1024))).unwrap();
    let id2 = unique_name("medium");
    let out = fleet.publish_file_as(
        Who::Fleet("manager"),
        &format!("{ROOT}/node1/jobs/{id2}"),
        &medium,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let rejected = everything.wait_topic(&format!("/jobs/{id2}/rejected"), REPLY_TIMEOUT);
    let reason = rejected["reason"].as_str().unwrap_or("");
    assert!(reason.contains("payload too large"), "{rejected}");
    // The medium job, published after the big one, has come and been
    // answered: had the broker passed the big one, `everything` would
    // have it already.
    assert!(
        !everything.messages().iter().any(|(t, _)| t.contains(&id)),
        "the oversized job reached a subscriber"
    );
    assert!(
        fleet.broker_log_text().contains("oversize packet"),
        "broker log does not show the oversized publish"
    );
    assert!(a1.is_running());
    assert_eq!(fleet.node_status("node1")["online"], true);
    println!("300 KiB job: dropped by the broker; 100 KiB job: rejected by node1: {reason}");
}

/// Connects to `addr` as `config`, sends `prepare` and returns the answer,
/// or the error that ended the connection.
async fn knock(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    prepare: Prepare,
) -> Result<ToSource, String> {
    let mut tls = hostile::connect(config, addr, "node2").await?;
    // In TLS 1.3 the server judges the client's certificate after the
    // client finished its side of the handshake: a refusal shows up as an
    // alert (or a closed socket) on the first read or write.
    let sent = protocol::send(&mut tls, &ToTarget::Prepare(Box::new(prepare))).await;
    let answer = protocol::recv::<_, ToSource>(&mut tls).await;
    match (sent, answer) {
        (_, Ok(a)) => Ok(a),
        (Ok(()), Err(e)) => Err(format!("recv: {e}")),
        (Err(s), Err(e)) => Err(format!("send: {s}; recv: {e}")),
    }
}

fn no_cert_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("read ca.pem") {
        roots.add(cert.expect("ca.pem")).expect("add the CA");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[test]
fn data_port_refuses_peers_without_a_fleet_certificate() {
    let fleet = SecureFleet::new(Bed::require());
    let mut a2 = fleet.start_agent(2);
    let addr = fleet.data_addr("node2");
    let target = fleet.node_status("node2");
    let rt = runtime();
    let fleet_client = |name: &str| {
        ferry_agent::stream::client_config(&fleet.tls_files(name)).expect("client config")
    };
    // Trusts the fleet CA (to check the agent) but holds another CA's cert.
    let rogue_client = ferry_agent::stream::client_config(&ferry_agent::stream::TlsFiles {
        ca: fleet.certs.join("ca.pem"),
        cert: fleet.broker.rogue.join("node1.pem"),
        key: fleet.broker.rogue.join("node1.key"),
    })
    .expect("rogue client config");

    let mut jobs = Vec::new();
    for (what, config, source) in [
        (
            "no certificate",
            no_cert_config(&fleet.certs.join("ca.pem")),
            "node1",
        ),
        ("another CA's node1", rogue_client, "node1"),
        // The manager's certificate, from the manager's CA, which agents do
        // not trust (its role, ferry:role:manager, would refuse it too:
        // unit-tested in stream::tls).
        ("the manager", fleet_client("manager"), "manager"),
        ("node1 claiming to be node3", fleet_client("node1"), "node3"),
    ] {
        let job = unique_name("knock");
        let name = unique_name("knock");
        fleet.track(&name);
        let answer = rt.block_on(knock(
            config,
            addr,
            prepare(&target, &job, source, "node2", &name),
        ));
        println!("{what}: {answer:?}");
        match what {
            "node1 claiming to be node3" => assert!(
                matches!(&answer, Ok(ToSource::Refused { reason })
                    if reason.contains("not the job's source node node3")),
                "{what}: {answer:?}"
            ),
            _ => {
                answer.expect_err(what);
            }
        }
        assert!(
            !fleet.node(2).exists(&name),
            "{what}: a container was created"
        );
        jobs.push(job);
    }
    let log = a2.log_text();
    let refused: Vec<String> = log
        .lines()
        .filter(|l| l.contains("data port TLS handshake failed"))
        .map(strip_ansi)
        .collect();
    assert_eq!(refused.len(), 3, "agent log:\n{log}");
    assert!(
        refused[0].contains("no certificates")
            && refused[1].contains("invalid peer certificate")
            && refused[2].contains("UnknownIssuer"),
        "{refused:#?}"
    );
    println!("agent log: {refused:#?}");
    for job in &jobs {
        assert!(
            fleet
                .retained(&format!("{ROOT}/node2/jobs/{job}/status"))
                .is_none(),
            "{job} got a job status on node2"
        );
    }
    assert!(a2.is_running(), "agent died: {log}");
}

/// A compromised node1 (a valid node certificate, speaking the data
/// protocol by hand) asks node2 for containers that would own node2: each
/// is refused at `Prepare`, naming the field, and nothing is created. The
/// same `Prepare` with a plain body is accepted, so the field is what
/// decided.
#[test]
fn a_compromised_node_cannot_have_a_peer_create_a_container_that_escapes() {
    let fleet = SecureFleet::new(Bed::require());
    let mut a2 = fleet.start_agent(2);
    let n2 = fleet.node(2);
    let addr = fleet.data_addr("node2");
    let target = fleet.node_status("node2");
    let config =
        ferry_agent::stream::client_config(&fleet.tls_files("node1")).expect("client config");
    let rt = runtime();
    let host = |extra: Value| {
        let mut h = json!({"NetworkMode": "none"});
        for (k, v) in extra.as_object().expect("an object") {
            h[k] = v.clone();
        }
        json!({"Image": COUNTER_IMAGE, "HostConfig": h})
    };
    let evil = unique_name("evil");
    let cases = [
        (
            "privileged",
            host(json!({"Privileged": true})),
            "HostConfig.Privileged",
        ),
        (
            "bind mount of /",
            host(json!({"Binds": ["/:/host"]})),
            "HostConfig.Binds",
        ),
        (
            "bind mount of / as a mount",
            host(json!({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]})),
            "HostConfig.Mounts",
        ),
        (
            "a local volume over /",
            host(
                json!({"Mounts": [{"Type": "volume", "Source": evil, "Target": "/host",
                "VolumeOptions": {"DriverConfig": {"Name": "local",
                "Options": {"type": "none", "o": "bind", "device": "/"}}}}]}),
            ),
            "HostConfig.Mounts",
        ),
        (
            "host PID namespace",
            host(json!({"PidMode": "host"})),
            "HostConfig.PidMode",
        ),
        (
            "host network",
            host(json!({"NetworkMode": "host"})),
            "HostConfig.NetworkMode",
        ),
        (
            "a device",
            host(
                json!({"Devices": [{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem",
                "CgroupPermissions": "rwm"}]}),
            ),
            "HostConfig.Devices",
        ),
        (
            "CAP_SYS_ADMIN",
            host(json!({"CapAdd": ["SYS_ADMIN"]})),
            "HostConfig.CapAdd",
        ),
    ];
    for (what, body, field) in cases {
        let job = unique_name("escape");
        let name = unique_name("escape");
        fleet.track(&name);
        let mut p = prepare(&target, &job, "node1", "node2", &name);
        p.spec.create_body = body;
        let answer = rt.block_on(knock(config.clone(), addr, p));
        let reason = match &answer {
            Ok(ToSource::Refused { reason }) => reason.clone(),
            other => panic!("{what}: {other:?}"),
        };
        assert!(
            reason.contains(field) && reason.contains("node2 does not allow"),
            "{what}: {reason}"
        );
        let status = fleet.final_status("node2", &job, REPLY_TIMEOUT);
        assert!(
            status["error"].as_str().unwrap_or("").contains(field),
            "{what}: {status}"
        );
        assert!(!n2.exists(&name), "{what}: a container was created");
        println!("{what}: refused: {reason}");
    }
    assert!(
        !n2.docker(&["volume", "inspect", &evil]).status.success(),
        "the volume over / was created"
    );

    // Control: the same Prepare with a plain body gets as far as a created
    // container, which goes again when the connection ends.
    let job = unique_name("plain");
    let name = unique_name("plain");
    fleet.track(&name);
    let answer = rt.block_on(async {
        let mut tls = hostile::connect(config.clone(), addr, "node2").await?;
        let p = prepare(&target, &job, "node1", "node2", &name);
        protocol::send(&mut tls, &ToTarget::Prepare(Box::new(p)))
            .await
            .map_err(|e| e.to_string())?;
        let answer = protocol::recv::<_, ToSource>(&mut tls).await;
        let created = n2.exists(&name);
        Ok::<_, String>((answer.map_err(|e| e.to_string())?, created))
    });
    assert!(
        matches!(&answer, Ok((ToSource::Prepared { .. }, true))),
        "a plain body: {answer:?}"
    );
    let status = fleet.final_status("node2", &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "failed", "{status}");
    wait_for("the plain container to go again", REPLY_TIMEOUT, || {
        (!n2.exists(&name))
            .then_some(())
            .ok_or("still there".to_string())
    });
    assert!(a2.is_running(), "agent died: {}", a2.log_text());
}

struct Case {
    what: &'static str,
    body: Vec<u8>,
    raw: u64,
    bad_sum: bool,
    /// Words the final verdict's error must contain.
    expect: &'static [&'static str],
}

impl Case {
    /// A case whose stream is the zstd frame `write` fills in.
    fn new(
        what: &'static str,
        expect: &'static [&'static str],
        bad_sum: bool,
        write: impl FnOnce(&mut Zstd),
    ) -> Case {
        let mut z = Zstd::new();
        write(&mut z);
        let (body, raw) = z.finish();
        Case {
            what,
            body,
            raw,
            bad_sum,
            expect,
        }
    }
}

fn cases() -> Vec<Case> {
    const END: [u8; 1024] = [0; 1024];
    vec![
        Case::new(
            "a ../../etc/x entry",
            &["\"../../etc/x\"", "'..'"],
            false,
            |z| {
                z.data(&tar_header("core-1.img", b'0', "", 4))
                    .data(b"core")
                    .zeros(508)
                    .data(&tar_header("../../etc/x", b'0', "", 4))
                    .data(b"evil")
                    .zeros(508)
                    .data(&END);
            },
        ),
        Case::new(
            "an escaping symlink",
            &["\"pages\"", "symlink"],
            false,
            |z| {
                z.data(&tar_header("pages", b'2', "../../../../../../../..", 0))
                    .data(&tar_header("pages/etc/x", b'0', "", 4))
                    .data(b"evil")
                    .zeros(508)
                    .data(&END);
            },
        ),
        Case::new(
            "a 10 GiB zero bomb in one file",
            &["\"pages-1.img\"", "per-entry limit"],
            false,
            |z| {
                z.data(&tar_header("pages-1.img", b'0', "", 10 * GIB))
                    .zeros(10 * GIB)
                    .data(&END);
            },
        ),
        Case::new(
            "a 10 GiB zero bomb in 40 files",
            &["total cap"],
            false,
            |z| {
                for i in 0..40 {
                    z.data(&tar_header(&format!("pages-{i}.img"), b'0', "", 256 * MIB))
                        .zeros(256 * MIB);
                }
                z.data(&END);
            },
        ),
        Case::new(
            "a valid archive with a wrong checksum",
            &["checksum mismatch"],
            true,
            |z| {
                z.data(&tar_header("core-1.img", b'0', "", 4))
                    .data(b"core")
                    .zeros(508)
                    .data(&END);
            },
        ),
    ]
}

#[test]
fn hostile_archives_are_rejected_by_a_real_agent() {
    let fleet = SecureFleet::new(Bed::require());
    let mut a2 = fleet.start_agent(2);
    let n2 = fleet.node(2);
    let addr = fleet.data_addr("node2");
    let target = fleet.node_status("node2");
    let config =
        ferry_agent::stream::client_config(&fleet.tls_files("node1")).expect("client config");
    let rt = runtime();
    let before = tree(&a2.work);
    let outside = ["/etc/x", "/x"];
    for p in outside {
        assert!(!Path::new(p).exists(), "{p} exists before the test");
    }

    for case in cases() {
        let job = unique_name("hostile");
        let name = unique_name("hostile");
        fleet.track(&name);
        let p = prepare(&target, &job, "node1", "node2", &name);
        let header = TransferHeader {
            job_id: job.clone(),
            source_node: "node1".into(),
            target_node: "node2".into(),
            container: name.clone(),
            checkpoint: p.checkpoint.clone(),
        };
        let bad_sum = case.bad_sum.then_some([0x5a; 32]);
        let outcome = rt.block_on(async {
            let mut tls = hostile::connect(config.clone(), addr, "node2")
                .await
                .expect("a valid node certificate gets in");
            hostile::transfer(&mut tls, p, &header, &case.body, case.raw, bad_sum).await
        });
        let Outcome::Final(verdict) = &outcome else {
            panic!("{}: {outcome:?}", case.what);
        };
        let error = verdict.error.clone().unwrap_or_default();
        assert!(!verdict.ok, "{}: accepted", case.what);
        for word in case.expect {
            assert!(
                error.contains(word),
                "{}: {error:?} lacks {word:?}",
                case.what
            );
        }
        let status = fleet.final_status("node2", &job, REPLY_TIMEOUT);
        assert_eq!(status["state"], "failed", "{}: {status}", case.what);
        assert!(
            status["error"]
                .as_str()
                .unwrap_or("")
                .contains(case.expect[0]),
            "{}: {status}",
            case.what
        );
        // What the target created for the job is gone again, and nothing
        // was written outside its staging folder.
        assert!(!n2.exists(&name), "{}: container left behind", case.what);
        assert!(
            !a2.work.join("staging").join(&job).exists(),
            "{}: staging folder left behind",
            case.what
        );
        let extra: Vec<String> = tree(&a2.work)
            .into_iter()
            .filter(|p| !before.contains(p) && p != "staging")
            .collect();
        assert!(
            extra.is_empty(),
            "{}: new paths in the work dir: {extra:?}",
            case.what
        );
        for p in outside {
            assert!(!Path::new(p).exists(), "{}: {p} was written", case.what);
        }
        assert!(a2.is_running(), "{}: the agent died", case.what);
        println!(
            "{}: {} wire bytes for {} raw: rejected: {error}",
            case.what,
            case.body.len(),
            case.raw
        );
    }

    // A stream whose header names another job than the one prepared.
    let job = unique_name("hostile");
    let name = unique_name("hostile");
    fleet.track(&name);
    let p = prepare(&target, &job, "node1", "node2", &name);
    let header = TransferHeader {
        job_id: unique_name("other"),
        source_node: "node1".into(),
        target_node: "node2".into(),
        container: name.clone(),
        checkpoint: p.checkpoint.clone(),
    };
    let outcome = rt.block_on(async {
        let mut tls = hostile::connect(config.clone(), addr, "node2")
            .await
            .expect("a valid node certificate gets in");
        hostile::transfer(&mut tls, p, &header, &[], 0, None).await
    });
    assert!(
        matches!(&outcome, Outcome::HeaderRefused(r) if r.contains("does not match the prepared job")),
        "{outcome:?}"
    );
    let status = fleet.final_status("node2", &job, REPLY_TIMEOUT);
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        !n2.exists(&name),
        "container left behind after a refused header"
    );
    println!("a header for another job than the prepared one: {outcome:?}");
}

/// Bytes of the source → target stream before the flip: past the TLS
/// handshake, the prepare and the header (about 3 KiB), inside the
/// checkpoint body (a `counter` sends about 21 KiB in all).
const FLIP_AT: u64 = 10 * 1024;

#[test]
fn flipped_byte_rolls_back_and_the_workload_keeps_running() {
    let fleet = SecureFleet::new(Bed::require());
    let n2 = fleet.node(2);
    // node2 listens on a port of its own and advertises the relay's.
    let listen = TcpListener::bind(SocketAddr::new(n2.addr.into(), 0))
        .and_then(|l| l.local_addr())
        .expect("free port for node2");
    let relay_socket =
        TcpListener::bind(SocketAddr::new(n2.addr.into(), 0)).expect("relay listener");
    let relay = FlipRelay::start(relay_socket, listen, FLIP_AT);
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent_with(
        2,
        AgentOptions {
            listen: Some(listen),
            advertise: Some(relay.addr),
            ..AgentOptions::default()
        },
    );
    assert_eq!(fleet.data_addr("node2"), relay.addr);

    let source = fleet.start_counter(1);
    // Without pre-copy: the flip must hit the final stream (after the
    // checkpoint), which the source then rolls back.
    let job = fleet.send_migrate(&source, 2, Some(json!({"precopy": "off"})));
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    let (up, down) = (
        relay.up.load(Ordering::Relaxed),
        relay.down.load(Ordering::Relaxed),
    );
    println!(
        "relay: {up} bytes source → target, {down} back, flipped byte {FLIP_AT}: {}; final status {status}",
        relay.flipped.load(Ordering::Relaxed)
    );
    assert!(
        relay.flipped.load(Ordering::Relaxed),
        "the stream was shorter than {FLIP_AT} bytes"
    );
    // Exactly one node runs it: the source, counting on without a gap.
    fleet.assert_rolled_back(&source, 2, &job, &status, "transfer");
}

#[test]
fn counter_migrates_with_everything_on_tls() {
    let fleet = SecureFleet::new(Bed::require());
    let a1 = fleet.start_agent(1);
    let a2 = fleet.start_agent(2);
    let source = fleet.start_counter(1);
    fleet.migrate_counter(&source, 2, None);

    // Nothing ran in the clear: no --insecure, and the broker saw each
    // agent under its certificate's name.
    for agent in [&a1, &a2] {
        assert!(!agent.log_text().contains("--insecure"), "{}", agent.node);
    }
    let log = fleet.broker_log_text();
    for node in ["node1", "node2"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!(" as {node} (")) && l.contains(&format!("u'{node}'"))),
            "broker log lacks {node}'s certificate login:\n{log}"
        );
    }
    println!("the counter went over mqtts and a mutual TLS data port");
}

#[test]
fn an_agent_refuses_to_start_with_another_nodes_certificate() {
    let fleet = SecureFleet::new(Bed::require());
    let theirs = fleet.tls_files("node2");
    let out = ferry_tests::run_with_timeout(
        &mut fleet.agent_command(1, &theirs, AgentOptions::default()),
        Duration::from_secs(60),
    )
    .expect("run ferry agent");
    let stderr = strip_ansi(&out.stderr);
    assert!(!out.status.success(), "the agent started: {stderr}");
    assert!(
        stderr.contains("node2.pem") && stderr.contains("not this node's id \"node1\""),
        "{stderr}"
    );
    println!("node1 with node2's certificate: {}", stderr.trim());
}

#[test]
fn silent_connections_neither_hold_the_data_port_nor_delay_shutdown() {
    use std::io::Read;
    let fleet = SecureFleet::new(Bed::require());
    let mut a2 = fleet.start_agent(2);
    let addr = fleet.data_addr("node2");
    let open = |n: usize| -> Vec<std::net::TcpStream> {
        (0..n)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect to the data port"))
            .collect()
    };
    // Closed by the agent: read returns 0 (or a reset) within `within`.
    let closed_within = |s: &mut std::net::TcpStream, within: Duration| {
        s.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };

    // A flood of connections that never start TLS: beyond the pending
    // handshake cap of one peer they are closed at once, the rest after
    // the timeout.
    let started = std::time::Instant::now();
    let mut flood = open(3 * PER_PEER);
    let extra: Vec<bool> = flood[PER_PEER..]
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_secs(2)))
        .collect();
    assert!(
        extra.iter().all(|c| *c),
        "connections over the cap were kept: {extra:?}"
    );
    assert!(
        closed_within(&mut flood[0], Duration::from_secs(20)),
        "a silent connection was kept open"
    );
    let held = started.elapsed();
    assert!(held < Duration::from_secs(15), "held for {held:?}");
    drop(flood);

    // Once they are gone, a real peer gets in again.
    let target = fleet.node_status("node2");
    let config =
        ferry_agent::stream::client_config(&fleet.tls_files("node1")).expect("client config");
    let answer = runtime().block_on(knock(
        config,
        addr,
        prepare(
            &target,
            &unique_name("after"),
            "node3",
            "node2",
            "never-created",
        ),
    ));
    assert!(
        matches!(&answer, Ok(ToSource::Refused { reason }) if reason.contains("node3")),
        "after the flood: {answer:?}"
    );

    // A silent connection open during SIGTERM does not hold up the drain.
    let silent = open(1);
    wait_for(
        "node2's agent to accept the silent connection",
        REPLY_TIMEOUT,
        || accepted_by(a2.pid(), &silent[0]),
    );
    let stop = std::time::Instant::now();
    let code = a2.terminate();
    let took = stop.elapsed();
    assert_eq!(code, Some(0), "agent exit: {}", a2.log_text());
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let log = a2.log_text();
    println!(
        "{} silent connections: {} over the cap closed at once, the rest after {:.1} s; shutdown with one open took {:.1} s; log: {:?}",
        3 * PER_PEER,
        2 * PER_PEER,
        held.as_secs_f64(),
        took.as_secs_f64(),
        log.lines()
            .filter(|l| l.contains("handshake"))
            .map(strip_ansi)
            .take(2)
            .collect::<Vec<_>>()
    );
}

const PER_PEER: usize = ferry_agent::stream::admission::MAX_PENDING_PER_PEER;

/// What a flood of silent connections from one address did.
#[derive(Debug, Default)]
struct FloodStats {
    /// Connections opened in all.
    opened: usize,
    /// Of those, seen closed by the agent.
    closed: usize,
    /// Most held open at one time.
    held_max: usize,
}

/// Holds `n` silent connections from `from` to `addr`, opening new ones as
/// the agent closes them, until `stop`.
fn flood(
    from: std::net::IpAddr,
    addr: SocketAddr,
    n: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    rounds: Arc<std::sync::atomic::AtomicUsize>,
) -> FloodStats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut stats = FloodStats::default();
        let mut held: Vec<tokio::net::TcpStream> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            held.retain(|s| {
                let mut buf = [0u8; 16];
                let open = matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
                if !open {
                    stats.closed += 1;
                }
                open
            });
            while held.len() < n {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket
                    .bind(SocketAddr::new(from, 0))
                    .expect("bind the flood's source address");
                match tokio::time::timeout(Duration::from_secs(1), socket.connect(addr)).await {
                    Ok(Ok(s)) => held.push(s),
                    _ => break,
                }
                stats.opened += 1;
            }
            stats.held_max = stats.held_max.max(held.len());
            if held.len() == n {
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stats
    })
}

#[test]
fn a_flood_from_one_address_does_not_stop_a_migration_from_another() {
    let fleet = SecureFleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let a2 = fleet.start_agent(2);
    let addr = fleet.data_addr("node2");
    let source = fleet.start_counter(1);
    // 64 silent connections from 127.0.0.50, kept up for the whole
    // migration (node1's agent dials from 127.0.0.1).
    let attacker: std::net::IpAddr = "127.0.0.50".parse().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flooding = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || flood(attacker, addr, 64, stop, rounds))
    };
    wait_for("the flood to hold 64 connections", REPLY_TIMEOUT, || {
        (rounds.load(Ordering::Relaxed) >= 2)
            .then_some(())
            .ok_or("not yet".to_string())
    });
    let started = std::time::Instant::now();
    let migrated = fleet.migrate_counter(&source, 2, None);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let stats = flooding.join().expect("flood thread");
    println!(
        "migration under a flood of 64 silent connections from {attacker}: succeeded in {:.1} s; flood: {stats:?}; job {}",
        took.as_secs_f64(),
        migrated.job
    );
    assert!(
        stats.closed > 64,
        "the agent closed only {} of the flood's connections",
        stats.closed
    );
    assert_eq!(stats.held_max, 64, "the flood never held 64 connections");
    let log = a2.log_text();
    assert!(
        log.contains(&format!(
            "peer {attacker} already has {PER_PEER} data connections"
        )),
        "{log}"
    );
}

/// Whether process `pid` holds the server side of `client`'s connection,
/// i.e. has accepted it (a connection still in the listen backlog has no
/// socket inode yet). Reads /proc/net/tcp and /proc/PID/fd.
fn accepted_by(pid: u32, client: &std::net::TcpStream) -> Result<(), String> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the bed's nodes have IPv4 addresses"),
    };
    let (server, peer) = (
        hex(client.peer_addr().map_err(|e| e.to_string())?),
        hex(client.local_addr().map_err(|e| e.to_string())?),
    );
    let table = std::fs::read_to_string("/proc/net/tcp").map_err(|e| e.to_string())?;
    let inode = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1] == server && f[2] == peer)
        .map(|f| f[9].to_string())
        .ok_or(format!(
            "no server side {server} <- {peer} in /proc/net/tcp"
        ))?;
    let socket = format!("socket:[{inode}]");
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == socket.as_str()));
    held.then_some(())
        .ok_or(format!("inode {inode} is not among pid {pid}'s files yet"))
}
