//! Outages and admission on the bed (real mosquitto, dockerd, CRIU, real
//! `ferry agent` processes): the broker gone for 15 s in the middle of a
//! transfer, two jobs at once on one node, and a job id published again
//! after the agent restarted with a fresh work dir (a reboot's empty /run)
//! and the same state dir.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::broker::{line_buffered, plain_agent_args, Broker};
use ferry_tests::fleet::{stop_child, AgentOptions, DevFleet, Fleet};
use ferry_tests::{
    memhog_ready, parse_memhog, run_with_timeout, unique_name, wait_for, Bed, COUNTER_IMAGE,
    MEMHOG_IMAGE,
};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const OUTAGE: Duration = Duration::from_secs(15);

/// A mosquitto of this test's own, from the bed's dev config on a free
/// loopback port, that the test stops and starts again (the bed's shared
/// broker serves other tests). No persistence, as in `broker-config/dev.conf`:
/// after a restart it knows no retained message and no session, so whatever
/// is retained afterwards the agents published again. Stopped by its pid.
struct OwnBroker {
    dir: PathBuf,
    port: u16,
    root: String,
    child: Option<Child>,
}

impl OwnBroker {
    fn conf(&self) -> PathBuf {
        self.dir.join("mosquitto.conf")
    }

    fn spawn(&mut self) {
        let log = self.dir.join("stderr.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("broker stderr log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.conf())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start mosquitto (the bed installs it: tests/bed/bed install)");
        self.child = Some(child);
        let port = self.port;
        wait_for("the test's mosquitto listening", REPLY_TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    }

    /// SIGTERM by pid; returns once the broker is gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, "the test's mosquitto");
        }
    }
}

impl Broker for OwnBroker {
    fn start(_bed: &Bed, dir: &Path, _certs: &Path) -> OwnBroker {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let template = std::fs::read_to_string(repo.join("broker-config/dev.conf"))
            .expect("read broker-config/dev.conf");
        let broker_dir = dir.join("own-broker");
        std::fs::create_dir_all(&broker_dir).expect("create the broker dir");
        // The broker drops to the mosquitto user and writes its log here.
        let out = run_with_timeout(
            Command::new("chown").arg("mosquitto:").arg(&broker_dir),
            Duration::from_secs(10),
        )
        .expect("run chown");
        assert!(out.status.success(), "chown mosquitto: {}", out.stderr);
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let conf = template
            .replace("@PORT@", &port.to_string())
            .replace("@DIR@", &broker_dir.display().to_string());
        let name = dir.file_name().expect("fleet dir name").to_string_lossy();
        let mut broker = OwnBroker {
            dir: broker_dir,
            port,
            root: format!("{name}/v1"),
            child: None,
        };
        std::fs::write(broker.conf(), conf).expect("write the broker config");
        broker.spawn();
        broker
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn root(&self) -> &str {
        &self.root
    }

    fn agent_args(&self) -> Vec<String> {
        plain_agent_args(&self.root)
    }

    fn client(&self, tool: &str) -> Command {
        line_buffered(tool, "127.0.0.1", &self.port.to_string())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `node`'s retained status of `job` satisfies `ok`.
fn wait_status<B: Broker>(
    fleet: &Fleet<B>,
    node: &str,
    job: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let topic = fleet.topic(&format!("{node}/jobs/{job}/status"));
    wait_for(what, JOB_TIMEOUT, || match fleet.retained(&topic) {
        Some(s) if ok(&s) => Ok(s),
        other => Err(format!("status {other:?}")),
    })
}

fn memhog_intact_on(fleet_node: &ferry_tests::Node, name: &str, checksum: &str) {
    let log = wait_for("memhog ticking", Duration::from_secs(60), || {
        let log = parse_memhog(&fleet_node.logs(name))?;
        if log.mismatch.is_some() {
            return Ok(log);
        }
        (log.ticks.len() >= 2)
            .then_some(log)
            .ok_or("fewer than 2 ticks".to_string())
    });
    assert_eq!(log.mismatch, None, "memory corrupted");
    assert_eq!(log.ready, None, "memhog started over (printed ready again)");
    for (tick, sum) in &log.ticks {
        assert_eq!(sum, checksum, "tick {tick}: checksum changed");
    }
}

#[test]
fn a_broker_outage_during_the_transfer_neither_stalls_it_nor_loses_a_status() {
    let mut fleet: Fleet<OwnBroker> = Fleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let n2 = fleet.node(2).clone();
    let source = fleet.run(1, "memhog", MEMHOG_IMAGE, &["64"]);
    let name = source.name.clone();
    let checksum = memhog_ready(&source);
    // About 32 MiB on the wire at 4 MiB/s: the whole transfer, the restore
    // and the end of the job happen while the broker is away.
    let limit: u64 = 4 << 20;
    let job = fleet.send_migrate(
        &source,
        2,
        Some(json!({"rate_limit": "4MiB/s", "precopy": "off"})),
    );
    wait_status(&fleet, "node1", &job, "the transfer phase", |s| {
        assert_eq!(s["state"], "in_progress", "ended before the transfer: {s}");
        s["phase"] == "transfer" && s["bytes_wire"].as_u64().unwrap_or(0) > 0
    });

    // Down for 15 s, and until the job ended on both nodes (the original
    // removed from node1 after the commit, the target's copy running).
    let down = Instant::now();
    fleet.broker.stop();
    std::thread::sleep(OUTAGE);
    wait_for(
        "the job to end while the broker is away",
        JOB_TIMEOUT,
        || {
            (!fleet.node(1).exists(&name) && n2.is_running(&name))
                .then_some(())
                .ok_or("still migrating".to_string())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    fleet.broker.spawn();
    println!("broker down for {:.1} s", down.elapsed().as_secs_f64());

    // The restarted broker kept nothing: every retained status below was
    // published again by the agents after they reconnected.
    let status = fleet.final_status("node1", &job, JOB_TIMEOUT);
    assert_eq!(
        status["state"], "succeeded",
        "source's final status: {status}"
    );
    let target = fleet.final_status("node2", &job, REPLY_TIMEOUT);
    assert_eq!(
        target["state"], "succeeded",
        "target's final status: {target}"
    );
    for node in ["node1", "node2"] {
        let s = wait_for(
            &format!("{node} online again"),
            REPLY_TIMEOUT,
            || match fleet.retained(&fleet.topic(&format!("{node}/status"))) {
                Some(s) if s["online"] == true => Ok(s),
                other => Err(format!("status {other:?}")),
            },
        );
        assert_eq!(s["jobs"], 0, "{node} still counts a job: {s}");
    }

    // The transfer went on at its rate while the broker was away.
    let wire = status["bytes_wire"].as_u64().unwrap();
    let transfer_ms = status["timings_ms"]["transfer"].as_u64().unwrap();
    let at_limit_ms = wire * 1000 / limit;
    println!(
        "wire {wire} B: transfer {transfer_ms} ms, {at_limit_ms} ms at the limit; timings {}",
        status["timings_ms"]
    );
    assert!(
        transfer_ms < at_limit_ms + at_limit_ms / 5 + 3000,
        "the transfer stalled: {transfer_ms} ms for {wire} B at 4 MiB/s ({at_limit_ms} ms)"
    );

    assert!(!fleet.node(1).exists(&name), "{name} left on node1");
    memhog_intact_on(&n2, &name, &checksum);
    assert!(n2.is_running(&name));
}

#[test]
fn a_second_job_waits_in_line_then_runs() {
    let fleet = DevFleet::new(Bed::require());
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let first = fleet.run(1, "memhog", MEMHOG_IMAGE, &["64"]);
    let second = fleet.run(1, "memhog", MEMHOG_IMAGE, &["64"]);
    let sums = [memhog_ready(&first), memhog_ready(&second)];

    let statuses = fleet.subscribe(&fleet.topic("node1/jobs/+/status"));
    let slow = Some(json!({"rate_limit": "4MiB/s"}));
    let j1 = fleet.send_migrate(&first, 2, slow.clone());
    let j2 = fleet.send_migrate(&second, 2, slow);

    let queued = wait_status(&fleet, "node1", &j2, "the second job queued", |s| {
        s["state"] == "queued"
    });
    assert_eq!(queued["position"], 1, "{queued}");
    let running = fleet.retained(&fleet.topic(&format!("node1/jobs/{j1}/status")));
    assert_eq!(
        running.as_ref().map(|s| s["state"].clone()),
        Some(json!("in_progress")),
        "the first job does not run: {running:?}"
    );

    for (job, c, sum) in [(&j1, &first, &sums[0]), (&j2, &second, &sums[1])] {
        let s = fleet.final_status("node1", job, JOB_TIMEOUT);
        assert_eq!(s["state"], "succeeded", "{job}: {s}");
        assert!(!n1.exists(&c.name));
        memhog_intact_on(n2, &c.name, sum);
    }

    // In order, one at a time: j2 left the line only after j1 ended.
    let seen: Vec<(String, Value)> = statuses
        .messages()
        .into_iter()
        .filter_map(|(t, p)| Some((t, serde_json::from_str(&p).ok()?)))
        .collect();
    let index = |job: &str, pred: &dyn Fn(&Value) -> bool| {
        seen.iter()
            .position(|(t, s)| t.contains(&format!("/jobs/{job}/")) && pred(s))
            .unwrap_or_else(|| panic!("no such status of {job}: {seen:?}"))
    };
    let j1_ended = index(&j1, &|s| s["state"] == "succeeded");
    let j2_started = index(&j2, &|s| s["state"] == "in_progress");
    let j2_queued = index(&j2, &|s| s["state"] == "queued");
    assert!(
        j2_queued < j1_ended && j1_ended < j2_started,
        "queued at {j2_queued}, j1 ended at {j1_ended}, j2 started at {j2_started}: {seen:?}"
    );
    println!(
        "j2 queued (position {}), started after j1 succeeded",
        queued["position"]
    );
}

#[test]
fn a_job_id_seen_before_a_reboot_is_not_run_again() {
    let fleet = DevFleet::new(Bed::require());
    let mut a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let first = fleet.start_counter(1);
    let job = fleet.migrate_counter(&first, 2, None).job;
    assert!(n2.is_running(&first.name));

    // A reboot: the agent starts again with an empty work dir (the fresh
    // /run of a reboot) and the same state dir.
    assert_eq!(a1.terminate(), Some(0), "{}", a1.log_text());
    let fresh = fleet.dir.join(unique_name("fresh-run"));
    let _a1 = fleet.start_agent_with(
        1,
        AgentOptions {
            work_dir: Some(&fresh),
            ..AgentOptions::default()
        },
    );
    assert!(
        std::fs::read_dir(&fresh).is_ok_and(|d| d.count() == 0),
        "the ledger went into the work dir {}",
        fresh.display()
    );

    // The manager retries the same job id, now naming a container that is
    // on node1: run again, it would move it.
    let second = fleet.run(1, "counter", COUNTER_IMAGE, &[]);
    let replies = fleet.subscribe(&fleet.topic(&format!("node1/jobs/{job}/#")));
    let retry = json!({"action": "migrate", "container": second.name, "target": "node2"});
    fleet.send_job("node1", &job, &retry);
    // The control: the same order under a new id is accepted and runs.
    let control = unique_name("job");
    let control_replies = fleet.subscribe(&fleet.topic(&format!("node1/jobs/{control}/#")));
    fleet.send_job("node1", &control, &retry);
    control_replies.wait_topic(&format!("/jobs/{control}/accepted"), REPLY_TIMEOUT);
    let s = fleet.final_status("node1", &control, JOB_TIMEOUT);
    assert_eq!(s["state"], "succeeded", "control job: {s}");

    // The repeated id is refused as seen before, never accepted.
    let answered: Vec<_> = replies
        .messages()
        .into_iter()
        .filter(|(t, _)| t.ends_with("/accepted") || t.ends_with("/rejected"))
        .collect();
    assert!(
        answered.len() == 1
            && answered[0].0.ends_with("/rejected")
            && answered[0].1.contains("was seen before on node1"),
        "the repeated job id should be rejected as seen before: {answered:?}"
    );
    let retained = fleet.retained(&fleet.topic(&format!("node1/jobs/{job}/status")));
    assert_eq!(
        retained.as_ref().map(|s| s["container"].clone()),
        Some(json!(first.name)),
        "the job's status changed: {retained:?}"
    );
    assert!(n2.is_running(&first.name));
    assert!(
        n2.is_running(&second.name),
        "the control did not move {}",
        second.name
    );
    assert!(!n1.exists(&second.name));
}
