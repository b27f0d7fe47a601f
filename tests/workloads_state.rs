//! A container moves whole between two real agents (`ferry migrate`, real
//! dockerd and CRIU on the bed): the files it wrote and deleted, its named
//! and anonymous volumes and its image arrive on the target; the source
//! keeps nothing after the commit and everything after a rollback; the
//! engine never restarts the checkpointed original; mounts that cannot move
//! are refused at precheck while the container keeps running.
//!
//! Needs the bed (`tests/bed/bed up 2`) with its test images.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use ferry_tests::fleet::{AgentOptions, DevFleet, LastLogs};
use ferry_tests::{
    check_counter_resumed, counter_values, parse_counter, unique_name, wait_for, Bed, CmdOutput,
    Container, Node, COUNTER_IMAGE,
};

/// `images/writer.c`: files under /data, ticks appended to /vol/log.
const WRITER_IMAGE: &str = "ferry-test/writer:latest";
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(30);

/// Volumes and images a test made, removed from every node when dropped
/// (declare it before the fleet: it then drops after the containers).
struct Leftovers {
    nodes: Vec<Node>,
    volumes: Mutex<Vec<String>>,
    images: Mutex<Vec<String>>,
    paths: Mutex<Vec<PathBuf>>,
}

impl Leftovers {
    fn new(bed: &Bed) -> Leftovers {
        Leftovers {
            nodes: bed.nodes.clone(),
            volumes: Mutex::default(),
            images: Mutex::default(),
            paths: Mutex::default(),
        }
    }

    fn volume(&self, name: &str) {
        self.volumes.lock().unwrap().push(name.into());
    }

    fn image(&self, reference: &str) {
        self.images.lock().unwrap().push(reference.into());
    }

    fn path(&self, p: &Path) {
        self.paths.lock().unwrap().push(p.into());
    }

    /// A new folder under the system temp dir, removed with the rest.
    fn temp_dir(&self, tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        self.path(&dir);
        dir
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for node in &self.nodes {
            for v in self.volumes.lock().unwrap().iter() {
                let _ = node.try_docker(&["volume", "rm", "-f", v]);
            }
            for i in self.images.lock().unwrap().iter().rev() {
                let _ = node.try_docker(&["rmi", "-f", i]);
            }
        }
        for p in self.paths.lock().unwrap().iter() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `ferry migrate NAME --from SRC --to node2 --job-id J [extra]`; returns
/// what it printed and the source's final status.
fn ferry_migrate(fleet: &DevFleet, c: &Container, to: usize, extra: &[&str]) -> (CmdOutput, Value) {
    let job = unique_name("job");
    let dst = fleet.node(to).name.clone();
    let mut args = vec![
        "migrate",
        &c.name,
        "--from",
        &c.node.name,
        "--to",
        &dst,
        "--job-id",
        &job,
    ];
    args.extend_from_slice(extra);
    let out = fleet.ferry(&args, JOB_TIMEOUT);
    let status = fleet.final_status(&c.node.name, &job, WAIT);
    println!("ferry migrate {}: {}", c.name, status);
    (out, status)
}

/// `tick N` lines a writer printed.
fn ticks(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn wait_ticks(node: &Node, name: &str, at_least: usize) -> Vec<u64> {
    wait_for(&format!("{name} ticking on {}", node.name), WAIT, || {
        let t = ticks(&node.logs(name));
        (t.len() >= at_least)
            .then_some(t.clone())
            .ok_or(format!("{} ticks", t.len()))
    })
}

/// A file of a container (running or not), through `docker cp`; `None`
/// when it does not exist.
fn file_in(node: &Node, container: &str, path: &str, scratch: &Path) -> Option<String> {
    let dest = scratch.join(unique_name("cp"));
    let out = node.docker(&["cp", &format!("{container}:{path}"), dest.to_str()?]);
    if !out.status.success() {
        assert!(
            out.stderr.contains("No such container:path")
                || out.stderr.contains("Could not find the file"),
            "docker cp {path}: {}",
            out.stderr
        );
        return None;
    }
    Some(std::fs::read_to_string(&dest).expect("copied file"))
}

/// The folder of volume `name` on `node`, if the volume exists.
fn volume_dir(node: &Node, name: &str) -> Option<PathBuf> {
    let out = node.docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", name]);
    out.status
        .success()
        .then(|| PathBuf::from(out.stdout.trim()))
}

fn inspect(node: &Node, container: &str, format: &str) -> String {
    node.docker_ok(&["inspect", "-f", format, container])
        .trim()
        .to_string()
}

/// The name of the volume mounted at `dest`.
fn volume_at(node: &Node, container: &str, dest: &str) -> String {
    let format = format!("{{{{range .Mounts}}}}{{{{if eq .Destination \"{dest}\"}}}}{{{{.Name}}}}{{{{end}}}}{{{{end}}}}");
    let name = inspect(node, container, &format);
    assert!(!name.is_empty(), "no volume at {dest} in {container}");
    name
}

/// Lines `1..=n` without a gap, as the writer appends them.
fn consecutive(text: &str, what: &str) -> u64 {
    let v: Vec<u64> = text.lines().map(|l| l.parse().expect(what)).collect();
    assert!(!v.is_empty(), "{what} is empty");
    for (i, n) in v.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "{what}: line {i} is {n}: {v:?}");
    }
    v.len() as u64
}

/// A writer on node1 with the image's anonymous volume at /vol, a named
/// volume at /named holding a file copied in after start, and `opts`.
struct Writer {
    c: Container,
    named: String,
    anon: String,
    scratch: PathBuf,
}

const NAMED_FILE: &str = "copied into the named volume after start\n";

fn start_writer(fleet: &DevFleet, left: &Leftovers, opts: &[&str]) -> Writer {
    let named = unique_name("named");
    left.volume(&named);
    let mount = format!("{named}:/named");
    let mut all = vec!["-v", mount.as_str()];
    all.extend_from_slice(opts);
    let c = fleet.run_opts(1, "writer", WRITER_IMAGE, &all, &[]);
    let anon = volume_at(&c.node, &c.name, "/vol");
    left.volume(&anon);
    let scratch = left.temp_dir("scratch");
    let src = scratch.join("hello");
    std::fs::write(&src, NAMED_FILE).unwrap();
    c.node.docker_ok(&[
        "cp",
        src.to_str().unwrap(),
        &format!("{}:/named/hello", c.name),
    ]);
    wait_ticks(&c.node, &c.name, 3);
    Writer {
        c,
        named,
        anon,
        scratch,
    }
}

#[test]
fn files_and_volumes_arrive_and_the_source_keeps_nothing_after_the_commit() {
    let bed = Bed::require();
    let left = Leftovers::new(&bed);
    let fleet = DevFleet::new(bed);
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let w = start_writer(&fleet, &left, &[]);
    let name = &w.c.name;
    let shipped = file_in(n1, name, "/data/shipped", &w.scratch);
    assert!(shipped.is_some(), "the image ships /data/shipped");
    assert_eq!(
        file_in(n1, name, "/data/deleted-at-start", &w.scratch),
        None
    );

    let source_logs = LastLogs::follow(n1, name);
    let (out, status) = ferry_migrate(&fleet, &w.c, 2, &[]);
    assert!(out.status.success(), "ferry migrate: {}", out.stderr);
    assert_eq!(status["state"], "succeeded", "{status}");
    let bytes_state = status["bytes_state"].as_u64().unwrap_or(0);
    assert!(bytes_state > 0, "no state bytes reported: {status}");
    println!(
        "files and volumes: {bytes_state} tar bytes inside a checkpoint of {} raw bytes",
        status["bytes_raw"]
    );

    // The workload went on: the same process, at the next tick.
    let before = ticks(&source_logs.finish());
    let last = *before.last().expect("source ticks");
    let after = wait_ticks(n2, name, 3);
    assert_eq!(after[0], last + 1, "resumed at {after:?} after {last}");

    // The written file, the deleted file, the shipped file, the layer's
    // ticks and both volumes, as they were.
    let on_target = |p: &str| file_in(n2, name, p, &w.scratch);
    assert_eq!(
        on_target("/data/created-at-start").as_deref(),
        Some("created at start\n")
    );
    assert_eq!(
        on_target("/data/deleted-at-start"),
        None,
        "deleted file is back"
    );
    assert_eq!(on_target("/data/shipped"), shipped);
    let layer_ticks = consecutive(&on_target("/data/ticks").unwrap(), "/data/ticks");
    assert!(layer_ticks > last, "/data/ticks has {layer_ticks} lines");
    assert_eq!(on_target("/named/hello").as_deref(), Some(NAMED_FILE));
    let vol_log = consecutive(&on_target("/vol/log").unwrap(), "/vol/log");
    assert!(vol_log > last, "/vol/log has {vol_log} lines");
    assert_eq!(volume_at(n2, name, "/vol"), w.anon, "anonymous volume name");
    assert_eq!(volume_at(n2, name, "/named"), w.named);
    let named_dir = volume_dir(n2, &w.named).expect("named volume on node2");
    assert_eq!(
        std::fs::read_to_string(named_dir.join("hello")).unwrap(),
        NAMED_FILE
    );

    // The source keeps nothing.
    assert!(!n1.exists(name), "{name} left on node1");
    assert_eq!(volume_dir(n1, &w.named), None, "named volume left on node1");
    assert_eq!(
        volume_dir(n1, &w.anon),
        None,
        "anonymous volume left on node1"
    );
}

#[test]
fn after_a_rollback_the_source_keeps_everything() {
    let bed = Bed::require();
    let left = Leftovers::new(&bed);
    let fleet = DevFleet::new(bed);
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let w = start_writer(&fleet, &left, &["--restart", "always"]);
    let name = &w.c.name;

    // node2's engine now fails every CRIU call (see tests/bed/bed).
    let flag = n2.dir.join("fail-criu");
    std::fs::write(&flag, "").unwrap();
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _flag = RemoveOnDrop(flag);

    let (out, status) = ferry_migrate(&fleet, &w.c, 2, &[]);
    assert!(!out.status.success(), "ferry migrate succeeded: {status}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    assert!(
        status["error"].as_str().unwrap_or("").contains("restore"),
        "{status}"
    );

    // The original runs on, not afresh, with its policy back.
    let t = wait_for("writer ticking on after the rollback", WAIT, || {
        let t = ticks(&n1.logs(name));
        if t.iter().enumerate().any(|(i, n)| *n != i as u64 + 1) {
            return Ok(Err(format!("ticks restarted or skipped: {t:?}")));
        }
        let frozen = status["timings_ms"]["checkpoint"].as_u64().unwrap_or(0) / 200;
        (w.c.is_running() && t.len() as u64 > frozen + 10)
            .then_some(Ok(t.clone()))
            .ok_or(format!("{} ticks", t.len()))
    })
    .unwrap_or_else(|e: String| panic!("{e}"));
    assert_eq!(
        inspect(n1, name, "{{.HostConfig.RestartPolicy.Name}}"),
        "always"
    );
    assert_eq!(inspect(n1, name, "{{.RestartCount}}"), "0");
    let on_source = |p: &str| file_in(n1, name, p, &w.scratch);
    assert_eq!(on_source("/named/hello").as_deref(), Some(NAMED_FILE));
    assert_eq!(on_source("/data/deleted-at-start"), None);
    assert!(consecutive(&on_source("/vol/log").unwrap(), "/vol/log") >= t.len() as u64);
    assert!(volume_dir(n1, &w.named).is_some() && volume_dir(n1, &w.anon).is_some());

    // The target kept nothing.
    assert!(!n2.exists(name), "{name} left on node2");
    assert_eq!(volume_dir(n2, &w.named), None, "named volume left on node2");
    assert_eq!(
        volume_dir(n2, &w.anon),
        None,
        "anonymous volume left on node2"
    );
}

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn image_id(node: &Node, reference: &str) -> Option<String> {
    let out = node.docker(&["image", "inspect", "-f", "{{.Id}}", reference]);
    out.status.success().then(|| out.stdout.trim().to_string())
}

/// Starts `image` (a counter) on node1, migrates it with `ferry migrate`,
/// checks it counts on at node2 from the same image id; returns the image
/// bytes the job reports.
fn migrate_counter_of(fleet: &DevFleet, image: &str) -> u64 {
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let c = fleet.run(1, "img", image, &[]);
    c.wait_counting(WAIT);
    let logs = LastLogs::follow(n1, &c.name);
    let (out, status) = ferry_migrate(fleet, &c, 2, &[]);
    assert!(out.status.success(), "ferry migrate: {}", out.stderr);
    assert_eq!(status["state"], "succeeded", "{status}");
    let before = counter_values(&logs.finish());
    wait_for("counter on node2", WAIT, || {
        check_counter_resumed(&before, &parse_counter(&n2.logs(&c.name))?, 5)
    });
    assert_eq!(image_id(n2, image), image_id(n1, image), "image id differs");
    assert_eq!(
        inspect(n2, &c.name, "{{.Image}}"),
        image_id(n1, image).unwrap(),
        "created from another image"
    );
    status["bytes_image"].as_u64().unwrap_or(0)
}

#[test]
fn an_image_only_the_source_has_travels_and_then_only_its_new_layer() {
    let bed = Bed::require();
    let left = Leftovers::new(&bed);
    let fleet = DevFleet::new(bed);
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let scratch = left.temp_dir("image");

    // Base: the counter's rootfs plus 2 MiB of its own, on node1 only.
    let tag = unique_name("img").to_lowercase();
    let base = format!("ferry-test/{tag}:base");
    let top = format!("ferry-test/{tag}:top");
    left.image(&base);
    left.image(&top);
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out/counter.tar");
    let tar = scratch.join("rootfs.tar");
    std::fs::copy(&rootfs, &tar).expect("images/out/counter.tar (run images/build)");
    std::fs::write(scratch.join("base-blob"), noise(2 << 20, 7)).unwrap();
    let appended = std::process::Command::new("tar")
        .arg("-rf")
        .arg(&tar)
        .arg("-C")
        .arg(&scratch)
        .arg("base-blob")
        .status()
        .unwrap();
    assert!(appended.success());
    n1.docker_ok(&[
        "import",
        "--change",
        "ENTRYPOINT [\"/counter\"]",
        tar.to_str().unwrap(),
        &base,
    ]);
    assert_eq!(image_id(n2, &base), None, "node2 must lack the image");
    let whole = migrate_counter_of(&fleet, &base);

    // Top: the base plus one layer of 256 KiB, committed on node1.
    let builder = unique_name("builder");
    fleet.track(&builder);
    n1.docker_ok(&["create", "--name", &builder, &base]);
    std::fs::write(scratch.join("top-blob"), noise(256 << 10, 9)).unwrap();
    let blob = scratch.join("top-blob");
    n1.docker_ok(&[
        "cp",
        blob.to_str().unwrap(),
        &format!("{builder}:/top-blob"),
    ]);
    n1.docker_ok(&["commit", &builder, &top]);
    n1.remove(&builder).unwrap();
    assert_eq!(image_id(n2, &top), None);
    let delta = migrate_counter_of(&fleet, &top);

    println!("image bytes sent: whole image {whole}, only the top layer differing {delta}");
    assert!(whole > 2 << 20, "the whole image is over 2 MiB: {whole}");
    assert!(
        delta > 256 << 10 && delta < whole / 4,
        "only the top layer should travel: {delta} of {whole}"
    );
}

#[test]
fn restart_always_never_restarts_the_original_and_the_target_keeps_it() {
    let bed = Bed::require();
    let fleet = DevFleet::new(bed);
    let _a1 = fleet.start_agent(1);
    let _a2 = fleet.start_agent(2);
    let (n1, n2) = (fleet.node(1), fleet.node(2));
    let c = fleet.run_opts(1, "always", COUNTER_IMAGE, &["--restart", "always"], &[]);
    c.wait_counting(WAIT);
    let started = inspect(n1, &c.name, "{{.State.StartedAt}}");

    // Watch the original on node1 until it is gone: never started again.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (node, name, done) = (n1.clone(), c.name.clone(), done.clone());
        thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let out = node.docker(&[
                    "inspect",
                    "-f",
                    "{{.RestartCount}} {{.State.StartedAt}} {{.State.Running}}",
                    &name,
                ]);
                if !out.status.success() {
                    break;
                }
                seen.push(out.stdout.trim().to_string());
                thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let logs = LastLogs::follow(n1, &c.name);
    let (out, status) = ferry_migrate(&fleet, &c, 2, &[]);
    assert!(out.status.success(), "ferry migrate: {}", out.stderr);
    assert_eq!(status["state"], "succeeded", "{status}");
    let before = counter_values(&logs.finish());
    thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(!seen.is_empty());
    for s in &seen {
        let mut words = s.split(' ');
        assert_eq!(words.next(), Some("0"), "restarted: {s}");
        assert_eq!(words.next(), Some(started.as_str()), "started again: {s}");
    }
    assert!(!n1.exists(&c.name), "the original is back on node1");

    // The same process goes on at node2, which keeps the policy.
    wait_for("counter on node2", WAIT, || {
        check_counter_resumed(&before, &parse_counter(&n2.logs(&c.name))?, 5)
    });
    assert_eq!(
        inspect(n2, &c.name, "{{.HostConfig.RestartPolicy.Name}}"),
        "always"
    );
    println!(
        "restart always: {} samples of the original, never restarted; node2 keeps the policy",
        seen.len()
    );
}

/// A counter on node1 with `opts`, or `None` when runc cannot give it the
/// capabilities it asks for on this host.
fn run_if_the_host_can(fleet: &DevFleet, opts: &[&str]) -> Option<Container> {
    let name = unique_name("refused");
    fleet.track(&name);
    match fleet.node(1).try_run_opts(&name, COUNTER_IMAGE, opts, &[]) {
        Ok(c) => Some(c),
        Err(e) if e.contains("unable to apply caps") => None,
        Err(e) => panic!("docker run {opts:?}: {e}"),
    }
}

#[test]
fn binds_devices_and_privileged_are_refused_while_the_container_runs() {
    let bed = Bed::require();
    let left = Leftovers::new(&bed);
    let fleet = DevFleet::new(bed);
    let host_dir = left.temp_dir("bind");
    let bind = format!("{}:/bound", host_dir.display());
    let _a1 = fleet.start_agent(1);
    // The target's own policy must allow the path too.
    let allowed = host_dir.display().to_string();
    let _a2 = fleet.start_agent_with(
        2,
        AgentOptions {
            extra: &["--allow-bind", &allowed],
            ..AgentOptions::default()
        },
    );
    let (n1, n2) = (fleet.node(1), fleet.node(2));

    let cases: [(&str, Vec<&str>, Option<Value>, &str); 4] = [
        ("bind mount", vec!["-v", &bind], None, "HostConfig.Binds"),
        (
            "device",
            vec!["--device", "/dev/null:/dev/ferry-null"],
            None,
            "HostConfig.Devices",
        ),
        (
            "privileged",
            vec!["--privileged"],
            None,
            "HostConfig.Privileged",
        ),
        // Devices stay refused whatever the job says about binds.
        (
            "device, binds present",
            vec!["--device", "/dev/null:/dev/ferry-null"],
            Some(json!({"bind_mounts": "present"})),
            "HostConfig.Devices",
        ),
    ];
    for (what, opts, options, field) in cases {
        let Some(c) = run_if_the_host_can(&fleet, &opts) else {
            // runc grants a privileged container every capability; a host
            // whose bounding set lacks one (here: CAP_SYS_RESOURCE) cannot
            // run it. The refusal itself is unit-tested in runtime::mounts.
            println!("{what}: SKIPPED, this host cannot run such a container (runc: unable to apply caps)");
            continue;
        };
        let job = fleet.send_migrate(&c, 2, options);
        let status = fleet.final_status(&n1.name, &job, JOB_TIMEOUT);
        let error = status["error"].as_str().unwrap_or("");
        println!("{what}: {error}");
        assert_eq!(status["state"], "failed", "{what}: {status}");
        assert!(
            error.starts_with("precheck: ") && error.contains(field),
            "{what}: {error}"
        );
        assert_eq!(status["timings_ms"]["checkpoint"], Value::Null, "{what}");
        // It never stopped: still counting from 0 without a gap.
        let n = counter_values(&c.logs()).len();
        wait_for(&format!("{what}: counter goes on"), WAIT, || {
            let v = parse_counter(&c.logs())?;
            let ok = v.iter().enumerate().all(|(i, x)| *x == i as u64);
            (ok && v.len() > n + 5 && c.is_running())
                .then_some(())
                .ok_or(format!("{} values", v.len()))
        });
        assert!(!n2.exists(&c.name), "{what}: created on node2");
    }

    // With bind_mounts "present", a bind mount moves (the path exists on
    // node2: both nodes share this host).
    let c = fleet.run_opts(1, "bound", COUNTER_IMAGE, &["-v", &bind], &[]);
    c.wait_counting(WAIT);
    let (out, status) = ferry_migrate(&fleet, &c, 2, &["--bind-mounts", "present"]);
    assert!(
        out.status.success(),
        "ferry migrate: {} {status}",
        out.stderr
    );
    assert!(n2.is_running(&c.name));
    assert_eq!(
        inspect(n2, &c.name, "{{range .Mounts}}{{.Source}}{{end}}"),
        host_dir.display().to_string()
    );
}
