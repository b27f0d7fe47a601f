//! Real workloads migrate whole, on the bed's real parts: Debian's
//! redis-server with 100k keys, an MQTT client publishing a counter to the
//! bed's broker, a small HTTP server, each on its node's default bridge and
//! publishing its port on its node's loopback address; and a container whose
//! `docker inspect` (name, command, env, labels, restart policy, limits,
//! healthcheck, log config, hostname, a user-defined network with an alias,
//! a published port) must read the same on the target.
//!
//! Established TCP connections need CRIU's `tcp-close` today: the MQTT test
//! writes it into both nodes' CRIU configuration (see `tests/bed/bed`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::Duration;

use ferry_tests::fleet::{DevFleet as Fleet, LastLogs};
use ferry_tests::{free_port, run_with_timeout, unique_name, wait_for, Bed, Container, Node};
use serde_json::{json, Value};

const REDIS_IMAGE: &str = "ferry-test/redis:latest";
const MQTTPUB_IMAGE: &str = "ferry-test/mqttpub:latest";
const HTTPD_IMAGE: &str = "ferry-test/httpd:latest";
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restored workload may take to answer or publish again.
const BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Migrates `source` to node `to` and checks both sides' final statuses
/// say succeeded; returns (source's, target's). The container is gone from
/// its node and runs on `to`.
fn migrate(fleet: &Fleet, source: &Container, to: usize) -> (Value, Value) {
    let (src, dst) = (&source.node, fleet.node(to));
    let job = fleet.send_migrate(source, to, None);
    let status = fleet.final_status(&src.name, &job, JOB_TIMEOUT);
    assert_eq!(status["state"], "succeeded", "final status: {status}");
    let target = fleet.final_status(&dst.name, &job, REPLY_TIMEOUT);
    assert_eq!(target["state"], "succeeded", "target's status: {target}");
    assert!(
        !src.exists(&source.name),
        "{} is still on {}",
        source.name,
        src.name
    );
    assert!(
        dst.is_running(&source.name),
        "{} is not running on {}",
        source.name,
        dst.name
    );
    (status, target)
}

/// The bed's subnet prefix of node `n`'s bridge: `10.(200+K).n.`.
fn bridge_prefix(bed: &Bed, n: usize) -> String {
    let k = bed.net_index.expect(
        "bed.env has no FERRY_BED_NET_INDEX: bring the bed up with the current tests/bed/bed",
    );
    format!("10.{}.{n}.", 200 + u32::from(k))
}

/// The container's address on the default bridge moved from node 1's
/// subnet to node 2's, as both statuses report it.
fn check_bridge_addresses(fleet: &Fleet, status: &Value, target: &Value) -> (String, String) {
    let old = status["old_addresses"]["bridge"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let new = target["new_addresses"]["bridge"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        old.starts_with(&bridge_prefix(&fleet.bed, 1)),
        "old address {old:?} is not on node1's bridge: {status}"
    );
    assert_eq!(target["old_addresses"], status["old_addresses"], "{target}");
    assert!(
        new.starts_with(&bridge_prefix(&fleet.bed, 2)),
        "new address {new:?} is not on node2's bridge: {target}"
    );
    (old, new)
}

fn redis(addr: Ipv4Addr, port: u16, args: &[&str]) -> Result<String, String> {
    let out = run_with_timeout(
        Command::new("redis-cli")
            .args(["-h", &addr.to_string(), "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(60),
    )
    .map_err(|e| format!("redis-cli: {e} (install: apt-get install redis-tools)"))?;
    let text = out.stdout.trim().to_string();
    if !out.status.success() || text.starts_with("Could not connect") || text.starts_with("ERR") {
        return Err(format!("redis-cli {args:?}: {text} {}", out.stderr.trim()));
    }
    Ok(text)
}

/// `KEY` from `INFO server` output.
fn info_field(info: &str, key: &str) -> String {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("INFO has no {key}: {info}"))
        .to_string()
}

#[test]
fn redis_with_100k_keys_moves_with_the_same_data_and_process() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let port = free_port(&[n1.addr, n2.addr]);
    let publish = format!("{}:{port}:6379", n1.addr);
    let source = fleet.run_with(1, "redis", &["-p", &publish], REDIS_IMAGE, &[]);
    wait_for("redis on node1", BACK_TIMEOUT, || {
        redis(n1.addr, port, &["PING"]).and_then(|r| (r == "PONG").then_some(()).ok_or(r))
    });
    assert_eq!(
        redis(n1.addr, port, &["DEBUG", "POPULATE", "100000"]).unwrap(),
        "OK"
    );
    assert_eq!(redis(n1.addr, port, &["DBSIZE"]).unwrap(), "100000");
    let digest = redis(n1.addr, port, &["DEBUG", "DIGEST"]).unwrap();
    let info = redis(n1.addr, port, &["INFO", "server"]).unwrap();
    let (run_id, uptime) = (
        info_field(&info, "run_id"),
        info_field(&info, "uptime_in_seconds"),
    );
    let memory = info_field(
        &redis(n1.addr, port, &["INFO", "memory"]).unwrap(),
        "used_memory",
    );

    let (status, target) = migrate(&fleet, &source, 2);
    let (old, new) = check_bridge_addresses(&fleet, &status, &target);

    // The same content, the same process, answering on node2's address.
    let info2 = wait_for("redis on node2", BACK_TIMEOUT, || {
        redis(n2.addr, port, &["INFO", "server"])
    });
    assert_eq!(
        info_field(&info2, "run_id"),
        run_id,
        "redis restarted on node2"
    );
    let uptime2 = info_field(&info2, "uptime_in_seconds");
    assert!(
        uptime2.parse::<u64>().unwrap() >= uptime.parse::<u64>().unwrap(),
        "uptime went back from {uptime} to {uptime2}"
    );
    assert_eq!(redis(n2.addr, port, &["DBSIZE"]).unwrap(), "100000");
    assert_eq!(
        redis(n2.addr, port, &["DEBUG", "DIGEST"]).unwrap(),
        digest,
        "content differs"
    );
    assert!(
        redis(n1.addr, port, &["PING"]).is_err(),
        "something still answers on node1's {}:{port}",
        n1.addr
    );
    println!(
        "redis 100000 keys (used_memory {memory} B), digest {digest}: run_id kept, uptime {uptime} s -> {uptime2} s; \
         address {old} -> {new}; raw {} B, wire {} B; timings {}",
        status["bytes_raw"], status["bytes_wire"], status["timings_ms"]
    );
}

/// `published N` lines of an mqttpub log, in order.
fn published(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter_map(|l| l.strip_prefix("published ")?.trim().parse().ok())
        .collect()
}

#[test]
fn mqtt_client_counts_on_and_reaches_the_broker_again_after_the_restore() {
    let fleet = Fleet::new(Bed::require());
    let (host, port) = fleet.bed.mqtt_bridge.expect(
        "bed.env has no FERRY_BED_MQTT_BRIDGE_HOST/FERRY_BED_MQTT_PORT: bring the bed up with the current tests/bed/bed",
    );
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    // The connection to the broker is established at the checkpoint.
    let _conf1 = n1.criu_conf("tcp-close\n");
    let _conf2 = n2.criu_conf("tcp-close\n");
    let topic = format!("ferry-test/{}", unique_name("mqttpub"));
    let sub = fleet.subscribe(&topic);
    let client_id = unique_name("pub");
    let env = [
        format!("MQTT_HOST={host}"),
        format!("MQTT_PORT={port}"),
        format!("MQTT_TOPIC={topic}"),
        // mqttpub takes client ids of at most 23 bytes: the unique tail.
        format!(
            "MQTT_CLIENT_ID={}",
            &client_id[client_id.len().saturating_sub(23)..]
        ),
    ];
    let mut options = Vec::new();
    for e in &env {
        options.extend(["-e", e.as_str()]);
    }
    let source = fleet.run_with(1, "mqttpub", &options, MQTTPUB_IMAGE, &[]);
    let values = |sub: &ferry_tests::fleet::Subscriber| -> Vec<(u64, u64)> {
        sub.payloads_at()
            .into_iter()
            .map(|(t, p)| {
                (
                    t,
                    p.trim().parse().unwrap_or_else(|_| panic!("payload {p:?}")),
                )
            })
            .collect()
    };
    wait_for("mqttpub publishing to the broker", BACK_TIMEOUT, || {
        let n = values(&sub).len();
        (n >= 10).then_some(()).ok_or(format!("{n} messages"))
    });
    let source_logs = LastLogs::follow(n1, &source.name);

    let (status, target) = migrate(&fleet, &source, 2);
    let (old, new) = check_bridge_addresses(&fleet, &status, &target);
    let before = published(&source_logs.finish());
    let last = *before.last().expect("mqttpub published nothing on node1");
    assert!(
        before.iter().enumerate().all(|(i, v)| *v == i as u64),
        "node1 did not count 0, 1, 2, ...: {before:?}"
    );

    // The restored client notices its connection is gone, reconnects and
    // publishes the next value.
    let seen = wait_for("mqttpub's messages from node2", BACK_TIMEOUT, || {
        let v = values(&sub);
        if v.iter().filter(|(_, x)| *x > last).count() >= 5 {
            Ok(v)
        } else {
            Err(format!("last value on node1 {last}, seen {:?}", v.last()))
        }
    });
    let after: Vec<(u64, u64)> = seen.iter().copied().filter(|(_, x)| *x > last).collect();
    assert_eq!(
        after[0].1,
        last + 1,
        "the first value from node2 is not node1's last + 1 (0 would be a restart): {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "values from node2 skip or repeat: {after:?}"
    );
    // Nothing before the migration was lost or repeated on the broker's side
    // either: it saw 0..=last (the value written just before the freeze may
    // have been in the dead socket's queue).
    let early: Vec<u64> = seen
        .iter()
        .map(|(_, x)| *x)
        .filter(|x| *x <= last)
        .collect();
    assert!(
        early.iter().enumerate().all(|(i, v)| *v == i as u64) && early.len() as u64 >= last,
        "the broker saw {early:?} before the migration, node1 published 0..={last}"
    );
    let restored_ms = target["updated_ms"].as_u64().unwrap()
        - target["timings_ms"]["cleanup"].as_u64().unwrap_or(0);
    // Negative: it arrived while the target still watched the restored
    // container settle.
    let back_ms = after[0].0 as i64 - restored_ms as i64;
    let logs2 = n2.logs(&source.name);
    let lost = logs2
        .lines()
        .find(|l| l.starts_with("lost"))
        .unwrap_or("(no lost line)");
    println!(
        "mqttpub: node1 published 0..={last}; node2 went on at {} and its first message reached the broker {back_ms:+} ms \
         from the end of the target's restore phase (negative: during its settle check); node2 said {lost:?}; address {old} -> {new}; timings {}",
        after[0].1, status["timings_ms"]
    );
    assert!(
        back_ms < 10_000,
        "the first message from node2 came {back_ms} ms after the restore"
    );
    assert!(
        logs2.lines().any(|l| l.starts_with("connected")),
        "node2's client never said connected: {logs2}"
    );
}

/// `GET path` over HTTP/1.0; the body, or why not.
fn http_get(addr: Ipv4Addr, port: u16, path: &str) -> Result<String, String> {
    let mut conn =
        TcpStream::connect((addr, port)).map_err(|e| format!("connect {addr}:{port}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(conn, "GET {path} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.trim_end().to_string()),
        _ => Err(format!("GET {path}: {reply:?}")),
    }
}

#[test]
fn http_server_answers_on_the_target_port_with_its_state() {
    let fleet = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let port = free_port(&[n1.addr, n2.addr]);
    let publish = format!("{}:{port}:80", n1.addr);
    let source = fleet.run_with(1, "httpd", &["-p", &publish], HTTPD_IMAGE, &[]);
    let token = unique_name("state");
    wait_for("httpd on node1", BACK_TIMEOUT, || {
        http_get(n1.addr, port, "/")
    });
    http_get(n1.addr, port, &format!("/set?v={token}")).unwrap();
    for want in ["1", "2", "3"] {
        assert_eq!(http_get(n1.addr, port, "/count").unwrap(), want);
    }

    let (status, target) = migrate(&fleet, &source, 2);
    let (old, new) = check_bridge_addresses(&fleet, &status, &target);
    let state = wait_for("httpd on node2's port", BACK_TIMEOUT, || {
        http_get(n2.addr, port, "/state")
    });
    assert_eq!(state, token, "the value set on node1 is gone");
    assert_eq!(
        http_get(n2.addr, port, "/count").unwrap(),
        "4",
        "the counter started over"
    );
    assert!(
        http_get(n1.addr, port, "/state").is_err(),
        "something still answers on node1's {}:{port}",
        n1.addr
    );
    let published = n2.docker_ok(&["port", &source.name, "80/tcp"]);
    assert_eq!(published.trim(), format!("{}:{port}", n2.addr));
    println!(
        "httpd: state and count kept, answering on {}:{port}; address {old} -> {new}; timings {}",
        n2.addr, status["timings_ms"]
    );
}

/// Removes a network from every node when dropped (declare it before the
/// fleet, so it drops after the containers).
struct Network {
    nodes: Vec<Node>,
    name: String,
}

impl Drop for Network {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = node.try_docker(&["network", "rm", &self.name]);
        }
    }
}

fn inspect(node: &Node, name: &str) -> Value {
    let text = node.docker_ok(&["inspect", name]);
    let mut all: Value = serde_json::from_str(&text).unwrap();
    all[0].take()
}

/// What must read the same on both nodes, with the fields that must change
/// (id, addresses, the container's own short id among its aliases, the
/// host IP of a port published on the node's own address) taken out.
fn lasting(c: &Value, node_addr: Ipv4Addr) -> Value {
    let short_id = &c["Id"].as_str().unwrap()[..12];
    let mut networks = serde_json::Map::new();
    for (name, ep) in c["NetworkSettings"]["Networks"].as_object().unwrap() {
        let aliases: Vec<&Value> = ep["Aliases"]
            .as_array()
            .map(|a| a.iter().filter(|a| *a != short_id).collect())
            .unwrap_or_default();
        networks.insert(name.clone(), json!({"Aliases": aliases}));
    }
    let mut ports = c["HostConfig"]["PortBindings"].clone();
    for binding in ports.as_object_mut().unwrap().values_mut() {
        for b in binding.as_array_mut().unwrap() {
            if b["HostIp"] == node_addr.to_string() {
                b["HostIp"] = json!("<the node's address>");
            }
        }
    }
    let config = &c["Config"];
    let host = &c["HostConfig"];
    json!({
        "Name": c["Name"],
        "Path": c["Path"],
        "Args": c["Args"],
        "Config": {
            "Hostname": config["Hostname"], "User": config["User"], "Env": config["Env"],
            "Cmd": config["Cmd"], "Entrypoint": config["Entrypoint"], "Image": config["Image"],
            "Labels": config["Labels"], "Healthcheck": config["Healthcheck"],
            "ExposedPorts": config["ExposedPorts"], "WorkingDir": config["WorkingDir"],
        },
        "HostConfig": {
            "RestartPolicy": host["RestartPolicy"], "Memory": host["Memory"],
            "MemorySwap": host["MemorySwap"], "NanoCpus": host["NanoCpus"],
            "LogConfig": host["LogConfig"], "NetworkMode": host["NetworkMode"],
            "PortBindings": ports,
        },
        "Networks": networks,
    })
}

#[test]
fn everything_docker_inspect_says_stays() {
    let bed = Bed::require();
    let k = bed.net_index.expect("bed.env has no FERRY_BED_NET_INDEX");
    let network = Network {
        nodes: bed.nodes.clone(),
        name: unique_name("net"),
    };
    let fleet = Fleet::new(bed);
    let _a1 = fleet.start_agent(1);
    let a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    // A subnet of this bed's own range; node2 routes it through node1's
    // bridge (one host), so the target must leave the subnet to its engine.
    let subnet = format!("10.{}.77.0/24", 200 + u32::from(k));
    n1.docker_ok(&[
        "network",
        "create",
        "--driver",
        "bridge",
        "--subnet",
        &subnet,
        "--label",
        "ferry.test=inspect",
        "--opt",
        "com.docker.network.driver.mtu=1400",
        &network.name,
    ]);
    let port = free_port(&[n1.addr, n2.addr]);
    let publish = format!("{}:{port}:80", n1.addr);
    let source = fleet.run_with(
        1,
        "inspect",
        &[
            "--network",
            &network.name,
            "--network-alias",
            "web",
            "-p",
            &publish,
            "--hostname",
            "edge-web",
            "-e",
            "MODE=edge",
            "-e",
            "GREETING=hello world",
            "-l",
            "app=ferry-test",
            "-l",
            "tier=edge",
            "--restart",
            "on-failure:3",
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            // The image has no shell: the check fails, which only marks the
            // container unhealthy; a long interval keeps it off the checkpoint.
            "--health-cmd",
            "/httpd --version",
            "--health-interval",
            "60s",
            "--health-retries",
            "2",
            "--health-start-period",
            "5s",
            "--log-driver",
            "json-file",
            "--log-opt",
            "max-size=1m",
            "--log-opt",
            "max-file=2",
        ],
        HTTPD_IMAGE,
        &["80"],
    );
    wait_for("httpd on node1", BACK_TIMEOUT, || {
        http_get(n1.addr, port, "/")
    });
    let before = inspect(n1, &source.name);

    let (status, target) = migrate(&fleet, &source, 2);
    let after = inspect(n2, &source.name);
    let (want, got) = (lasting(&before, n1.addr), lasting(&after, n2.addr));
    assert_eq!(
        got,
        want,
        "docker inspect differs:\nsource {}\ntarget {}",
        serde_json::to_string_pretty(&want).unwrap(),
        serde_json::to_string_pretty(&got).unwrap()
    );
    assert_eq!(
        after["HostConfig"]["PortBindings"]["80/tcp"][0]["HostIp"],
        n2.addr.to_string()
    );
    assert_ne!(after["Id"], before["Id"]);

    // The network exists on node2 as it was made on node1, but for its
    // subnet, which node2 could not take and said so.
    let net = |node: &Node| -> Value {
        let v: Value =
            serde_json::from_str(&node.docker_ok(&["network", "inspect", &network.name])).unwrap();
        v[0].clone()
    };
    let (net1, net2) = (net(n1), net(n2));
    for key in [
        "Driver",
        "Labels",
        "Options",
        "Internal",
        "Attachable",
        "EnableIPv6",
    ] {
        assert_eq!(net2[key], net1[key], "network {key} differs");
    }
    let subnet2 = net2["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_ne!(
        subnet2, subnet,
        "node2 took a subnet that node1's bridge routes on this host"
    );
    assert_eq!(
        target["new_addresses"].as_object().map(|m| m.len()),
        Some(1),
        "{target}"
    );
    assert_eq!(
        status["old_addresses"][&network.name]
            .as_str()
            .map(|a| a.starts_with(&subnet[..subnet.len() - 4])),
        Some(true),
        "{status}"
    );
    let target_log = a2.log_text();
    assert!(
        target_log.contains(&format!(
            "network {}: subnet {subnet} overlaps",
            network.name
        )) && target_log.contains("the engine picks its subnet"),
        "node2's agent did not say it left the subnet to the engine"
    );
    assert_eq!(http_get(n2.addr, port, "/").unwrap(), "ferry-test httpd");
    println!(
        "inspect: name, command, env, labels, restart policy, limits, healthcheck, log config, hostname, \
         network {} (alias web, subnet {subnet} -> {subnet2}), port {}:{port} -> {}:{port} all kept; \
         addresses {} -> {}",
        network.name, n1.addr, n2.addr, status["old_addresses"], target["new_addresses"]
    );
}
