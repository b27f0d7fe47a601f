//! The state-transfer building blocks (`ferry_agent::runtime::state`) on two
//! real dockerd nodes of the bed, driven through the library directly: a
//! container's written and deleted files, its named and anonymous volumes
//! and its image arrive on the other node as they were; the image travels
//! without the layers the target already has; the restart policy stays off
//! while the original is checkpointed.
//!
//! Needs the bed (`tests/bed/bed up 2`) and Debian's `busybox-static`
//! (`apt-get install busybox-static`) for the test image.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_agent::runtime::images::chain_ids;
use ferry_agent::runtime::mounts::BindMounts;
use ferry_agent::runtime::state::{StateEngine, STATE_DIR};
use ferry_agent::runtime::volumes::name_anonymous_volumes;
use ferry_agent::runtime::{Docker, Engine};
use ferry_tests::{copy_dir, parse_counter, unique_name, wait_for, Bed, Node};

const BUSYBOX: &str = "/bin/busybox";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn connect(rt: &tokio::runtime::Runtime, node: &Node) -> Docker {
    rt.block_on(Docker::connect(&node.docker_host))
        .unwrap_or_else(|e| panic!("{}: {e}", node.name))
}

/// Removes what a test made on the nodes, also when it fails.
#[derive(Default)]
struct Cleanup {
    steps: Vec<(Node, Vec<String>)>,
    paths: Vec<PathBuf>,
}

impl Cleanup {
    fn docker(&mut self, node: &Node, args: &[&str]) {
        self.steps
            .push((node.clone(), args.iter().map(|s| s.to_string()).collect()));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (node, args) in self.steps.iter().rev() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = node.docker(&args);
        }
        for p in &self.paths {
            let _ = std::fs::remove_dir_all(p);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A one-layer image on `node` from a rootfs holding Debian's static
/// busybox, `/etc/motd` and `/opt/keep/{a,b}`.
fn import_busybox_image(node: &Node, reference: &str, cleanup: &mut Cleanup) {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: apt-get install -y busybox-static"
    );
    let dir = std::env::temp_dir().join(unique_name("rootfs"));
    cleanup.paths.push(dir.clone());
    let root = dir.join("root");
    for d in ["bin", "etc", "tmp", "opt/keep", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("etc/motd"), "from the image\n").unwrap();
    std::fs::write(root.join("opt/keep/a"), "a\n").unwrap();
    std::fs::write(root.join("opt/keep/b"), "b\n").unwrap();
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of the test rootfs failed");
    node.docker_ok(&["import", tar.to_str().unwrap(), reference]);
    cleanup.docker(node, &["rmi", "-f", reference]);
}

fn image_id(node: &Node, reference: &str) -> String {
    node.docker_ok(&["image", "inspect", "-f", "{{.Id}}", reference])
        .trim()
        .to_string()
}

fn exec(node: &Node, name: &str, script: &str) -> String {
    node.docker_ok(&["exec", name, "/bin/busybox", "sh", "-c", script])
}

#[test]
fn files_volumes_and_image_move_with_a_checkpoint() {
    let bed = Bed::require();
    let (n1, n2) = (bed.node(1), bed.node(2));
    let rt = rt();
    let (d1, d2) = (connect(&rt, n1), connect(&rt, n2));
    let mut cleanup = Cleanup::default();

    let name = unique_name("state");
    let image = format!("ferry-test/{name}:v1");
    let named = format!("{name}-named");
    import_busybox_image(n1, &image, &mut cleanup);
    let script = "set -e; echo new > /etc/newfile; chown 1234:5678 /etc/newfile; \
                  chmod 640 /etc/newfile; rm /etc/motd; rm -rf /opt/keep; mkdir /opt/keep; \
                  echo c > /opt/keep/c; ln -s /etc/newfile /etc/link; echo v > /named/v; \
                  echo w > /anon/w; i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done";
    cleanup.docker(n1, &["volume", "rm", "-f", &named]);
    cleanup.docker(n1, &["rm", "-f", &name]);
    n1.docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        "--restart",
        "always",
        "-v",
        &format!("{named}:/named"),
        "-v",
        "/anon",
        &image,
        "/bin/sh",
        "-c",
        script,
    ]);
    wait_for(
        "the workload to write and count",
        Duration::from_secs(20),
        || {
            let logs = n1.logs(&name);
            match parse_counter(&logs) {
                Ok(v) if v.len() >= 5 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );

    // Source, precheck: the spec before the policy changes, and the plan.
    let container = rt.block_on(d1.inspect(&name)).unwrap();
    let plan = rt.block_on(d1.survey(&name, BindMounts::Refuse)).unwrap();
    assert_eq!(plan.volumes.len(), 2, "{:?}", plan.volumes);
    let anon = plan
        .volumes
        .iter()
        .find(|v| v.anonymous)
        .expect("an anonymous volume")
        .clone();
    assert!(plan.volumes.iter().any(|v| v.name == named && !v.anonymous));
    assert_eq!(plan.image.id, image_id(n1, &image));
    assert_eq!(plan.image.reference, image);
    cleanup.docker(n1, &["volume", "rm", "-f", &anon.name]);
    // Cleanup runs backwards: the container goes before its volumes.
    cleanup.docker(n1, &["rm", "-f", &name]);

    // Source, before the checkpoint: no restarts.
    let before = rt.block_on(d1.pause_restart_policy(&container.id)).unwrap();
    assert_eq!(before, plan.restart_policy);
    assert_eq!(
        n1.docker_ok(&["inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", &name])
            .trim(),
        "no"
    );
    let checkpoint = "ferry-state-test";
    let options = ferry_agent::runtime::CheckpointOptions {
        tcp: ferry_agent::runtime::TcpDump::Plain,
    };
    let dir = rt
        .block_on(d1.checkpoint(&container.id, checkpoint, options))
        .unwrap()
        .dir;
    let estimate = rt
        .block_on(StateEngine::estimate_state_bytes(&d1, &container.id, &plan))
        .unwrap();
    let pack = rt
        .block_on(d1.pack_state(&container.id, &plan, &dir))
        .unwrap();
    eprintln!(
        "packed: rootfs {} B ({} files, {} whiteouts, {} opaque), volumes {:?}, {} B in {:.3} s",
        pack.rootfs.tar_bytes,
        pack.rootfs.files,
        pack.rootfs.whiteouts,
        pack.rootfs.opaque_dirs,
        pack.volumes
            .iter()
            .map(|(n, s)| (n.as_str(), s.files))
            .collect::<Vec<_>>(),
        pack.bytes(),
        pack.elapsed.as_secs_f64()
    );
    assert!(
        estimate >= pack.bytes(),
        "estimate {estimate} B < packed {} B",
        pack.bytes()
    );
    assert_eq!(pack.rootfs.whiteouts, 1, "{:?}", pack.rootfs);
    assert_eq!(pack.rootfs.opaque_dirs, 1, "{:?}", pack.rootfs);
    assert_eq!(pack.volumes.len(), 2);
    // The engine did not start the checkpointed original again.
    let state = n1.docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.RestartCount}}",
        &name,
    ]);
    assert_eq!(state.trim(), "false 0", "original after the checkpoint");

    // The image only node1 has: sent whole (node2 has no layer of it).
    let have = rt
        .block_on(d2.missing_image(&plan.image))
        .unwrap()
        .expect("node2 lacks the image");
    assert!(have.is_empty());
    let work = n1.dir.join(format!("{name}-work"));
    std::fs::create_dir_all(&work).unwrap();
    cleanup.paths.push(work.clone());
    let image_tar = work.join("image.tar");
    let export = rt
        .block_on(d1.export_image(&plan.image, &have, &image_tar))
        .unwrap();
    eprintln!("image sent whole: {} B", export.tar_bytes);
    cleanup.docker(n2, &["rmi", "-f", &image]);
    rt.block_on(d2.load_image(&plan.image, &image_tar)).unwrap();
    rt.block_on(d2.tag_image(&plan.image)).unwrap();
    assert_eq!(image_id(n2, &image), plan.image.id);

    // Target: volumes, then the container from the same spec.
    cleanup.docker(n2, &["volume", "rm", "-f", &named]);
    cleanup.docker(n2, &["volume", "rm", "-f", &anon.name]);
    let created = rt.block_on(d2.create_volumes(&plan.volumes)).unwrap();
    assert_eq!(created.len(), 2);
    let mut spec = container.spec.clone();
    name_anonymous_volumes(&mut spec.create_body, &plan.volumes);
    cleanup.docker(n2, &["rm", "-f", &name]);
    let id2 = rt.block_on(d2.create(&spec)).unwrap();

    // The stream's part, done by hand: the checkpoint folder arrives in staging.
    let staging = n2.dir.join(format!("{name}-staging"));
    cleanup.paths.push(staging.clone());
    copy_dir(&dir, &staging).unwrap();
    let applied = rt.block_on(d2.apply_state(&id2, &plan, &staging)).unwrap();
    eprintln!(
        "applied: rootfs {} files, volumes {:?} in {:.3} s",
        applied.rootfs.files,
        applied
            .volumes
            .iter()
            .map(|(n, s)| (n.as_str(), s.files))
            .collect::<Vec<_>>(),
        applied.elapsed.as_secs_f64()
    );
    assert!(
        !staging.join(STATE_DIR).exists(),
        "state folder left in staging"
    );
    let engine_dir = rt.block_on(d2.checkpoint_dir(&id2, checkpoint)).unwrap();
    copy_dir(&staging, &engine_dir).unwrap();
    rt.block_on(d2.restore(&id2, checkpoint)).unwrap();

    // Everything as on node1, in the same process.
    let last_on_source = *parse_counter(&n1.logs(&name)).unwrap().last().unwrap();
    wait_for(
        "the counter to go on on node2",
        Duration::from_secs(20),
        || {
            let v = parse_counter(&n2.logs(&id2))?;
            match v.first() {
                Some(&first) if first == last_on_source + 1 && v.len() >= 3 => Ok(()),
                _ => Err(format!(
                    "node2 printed {v:?}, node1 stopped at {last_on_source}"
                )),
            }
        },
    );
    assert_eq!(exec(n2, &name, "cat /etc/newfile"), "new\n");
    assert_eq!(
        exec(n2, &name, "stat -c '%u:%g %a' /etc/newfile").trim(),
        "1234:5678 640"
    );
    assert_eq!(
        exec(n2, &name, "test -e /etc/motd && echo present || echo gone").trim(),
        "gone"
    );
    assert_eq!(exec(n2, &name, "ls /opt/keep").trim(), "c");
    assert_eq!(exec(n2, &name, "readlink /etc/link").trim(), "/etc/newfile");
    assert_eq!(exec(n2, &name, "cat /named/v /anon/w"), "v\nw\n");
    let mounts = n2.docker_ok(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Name}}={{.Destination}} {{end}}",
        &name,
    ]);
    assert!(mounts.contains(&format!("{named}=/named")), "{mounts}");
    assert!(mounts.contains(&format!("{}=/anon", anon.name)), "{mounts}");
    assert_eq!(
        n2.docker_ok(&["inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", &name])
            .trim(),
        "always"
    );

    // Seconds later, the original has still not been started again.
    let state = n1.docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.RestartCount}} {{.HostConfig.RestartPolicy.Name}}",
        &name,
    ]);
    assert_eq!(state.trim(), "false 0 no", "original during the migration");

    // Source, after the commit: the original goes, then the volumes no
    // other container uses; a volume still used elsewhere stays.
    let user = format!("{name}-user");
    cleanup.docker(n1, &["rm", "-f", &user]);
    n1.docker_ok(&[
        "create",
        "--name",
        &user,
        "--network",
        "none",
        "-v",
        &format!("{named}:/x"),
        &image,
        "true",
    ]);
    rt.block_on(d1.remove(&container.id)).unwrap();
    let removed = rt
        .block_on(d1.remove_unused_volumes(&plan.volumes))
        .unwrap();
    assert_eq!(removed, vec![anon.name.clone()]);
    let left = n1.docker_ok(&["volume", "ls", "-q"]);
    assert!(left.lines().any(|l| l == named), "{left}");
    assert!(!left.lines().any(|l| l == anon.name), "{left}");
}

#[test]
fn restart_policy_comes_back_on_rollback() {
    let bed = Bed::require();
    let n1 = bed.node(1);
    let rt = rt();
    let d1 = connect(&rt, n1);
    let mut cleanup = Cleanup::default();
    let name = unique_name("policy");
    let image = format!("ferry-test/{name}:v1");
    import_busybox_image(n1, &image, &mut cleanup);
    cleanup.docker(n1, &["rm", "-f", &name]);
    n1.docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        "--restart",
        "on-failure:3",
        &image,
        "/bin/sh",
        "-c",
        "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done",
    ]);
    let c = rt.block_on(d1.inspect(&name)).unwrap();
    let before = rt.block_on(d1.pause_restart_policy(&c.id)).unwrap();
    let checkpoint = "ferry-policy-test";
    let options = ferry_agent::runtime::CheckpointOptions {
        tcp: ferry_agent::runtime::TcpDump::Plain,
    };
    let dir = rt
        .block_on(d1.checkpoint(&c.id, checkpoint, options))
        .unwrap()
        .dir;
    let policy = |n: &Node| {
        n.docker_ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}}:{{.HostConfig.RestartPolicy.MaximumRetryCount}} {{.State.Running}}",
            &name,
        ])
        .trim()
        .to_string()
    };
    assert_eq!(policy(n1), "no:0 false");
    // Rollback: drop the state folder, restore the original, policy back.
    ferry_agent::runtime::state::discard_state(&dir).unwrap();
    // containerd 1.6 refuses a restore of the checkpoint it has just
    // written ("content sha256:... already exists") until its garbage
    // collector dropped the checkpoint's content, about a second later.
    wait_for(
        "the original to restore on node1",
        Duration::from_secs(20),
        || {
            rt.block_on(d1.restore(&c.id, checkpoint))
                .map_err(|e| e.to_string())
        },
    );
    rt.block_on(d1.set_restart_policy(&c.id, &before)).unwrap();
    assert_eq!(policy(n1), "on-failure:3 true");
}

#[test]
fn image_travels_without_the_layers_the_target_has() {
    let bed = Bed::require();
    let (n1, n2) = (bed.node(1), bed.node(2));
    let rt = rt();
    let (d1, d2) = (connect(&rt, n1), connect(&rt, n2));
    let mut cleanup = Cleanup::default();
    let name = unique_name("image");
    let base = format!("ferry-test/{name}-base:v1");
    let top = format!("ferry-test/{name}-top:v1");
    import_busybox_image(n1, &base, &mut cleanup);
    // A second image sharing all but its top layer.
    let builder = format!("{name}-builder");
    cleanup.docker(n1, &["rm", "-f", &builder]);
    n1.docker_ok(&[
        "run",
        "--name",
        &builder,
        "--network",
        "none",
        &base,
        "/bin/sh",
        "-c",
        "echo top > /top; dd if=/dev/urandom of=/blob bs=1024 count=200 2>/dev/null",
    ]);
    n1.docker_ok(&["commit", &builder, &top]);
    cleanup.docker(n1, &["rmi", "-f", &top]);
    let reference = |image: &str| {
        let id = image_id(n1, image);
        rt.block_on(d1.image_ref(&id, image)).unwrap()
    };
    let (base_ref, top_ref) = (reference(&base), reference(&top));
    assert_eq!(top_ref.diff_ids.len(), 2);
    assert_eq!(top_ref.diff_ids[0], base_ref.diff_ids[0]);

    let work = n1.dir.join(format!("{name}-work"));
    std::fs::create_dir_all(&work).unwrap();
    cleanup.paths.push(work.clone());
    cleanup.docker(n2, &["rmi", "-f", &base]);
    cleanup.docker(n2, &["rmi", "-f", &top]);

    // What the top image costs when the target has nothing.
    let whole_top = rt
        .block_on(d1.export_image(&top_ref, &HashSet::new(), &work.join("top-whole.tar")))
        .unwrap();

    // The base image arrives whole, with the same id.
    let have = rt.block_on(d2.missing_image(&base_ref)).unwrap().unwrap();
    assert!(have.is_empty());
    let t = Instant::now();
    let sent_base = rt
        .block_on(d1.export_image(&base_ref, &have, &work.join("base.tar")))
        .unwrap();
    let export_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    rt.block_on(d2.load_image(&base_ref, &work.join("base.tar")))
        .unwrap();
    rt.block_on(d2.tag_image(&base_ref)).unwrap();
    eprintln!(
        "base image: {} B sent (export {export_s:.2} s, load {:.2} s)",
        sent_base.tar_bytes,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(image_id(n2, &base), base_ref.id);
    assert_eq!(rt.block_on(d2.missing_image(&base_ref)).unwrap(), None);

    // node2 has another image under the top image's tag.
    n2.docker_ok(&["tag", &base, &top]);
    let have = rt.block_on(d2.missing_image(&top_ref)).unwrap().unwrap();
    assert_eq!(
        have,
        HashSet::from([chain_ids(&top_ref.diff_ids)[0].clone()])
    );
    let sent_top = rt
        .block_on(d1.export_image(&top_ref, &have, &work.join("top.tar")))
        .unwrap();
    rt.block_on(d2.load_image(&top_ref, &work.join("top.tar")))
        .unwrap();
    rt.block_on(d2.tag_image(&top_ref)).unwrap();
    eprintln!(
        "top image: {} B sent whole, {} B when only the top layer differs ({} layer(s), {} B left out)",
        whole_top.tar_bytes, sent_top.tar_bytes, sent_top.layers_left_out, sent_top.bytes_left_out
    );
    assert_eq!(
        image_id(n2, &top),
        top_ref.id,
        "the tag moved to the same id"
    );
    assert_eq!((sent_top.layers_sent, sent_top.layers_left_out), (1, 1));
    assert!(
        sent_top.tar_bytes + sent_base.tar_bytes / 2 < whole_top.tar_bytes,
        "the delta ({} B) should be smaller than the whole image ({} B) by about the base layer ({} B)",
        sent_top.tar_bytes,
        whole_top.tar_bytes,
        sent_base.tar_bytes
    );
    // The loaded image runs and holds the top layer's file.
    let out = n2.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        &top,
        "/bin/busybox",
        "cat",
        "/top",
    ]);
    assert_eq!(out, "top\n");
}

/// Pack and apply times of a container's written files, 10 and 100 MB.
#[test]
fn rootfs_pack_and_apply_times() {
    let bed = Bed::require();
    let (n1, n2) = (bed.node(1), bed.node(2));
    let rt = rt();
    let (d1, d2) = (connect(&rt, n1), connect(&rt, n2));
    let mut cleanup = Cleanup::default();
    let name = unique_name("sizes");
    let image = format!("ferry-test/{name}:v1");
    import_busybox_image(n1, &image, &mut cleanup);
    import_busybox_image(n2, &image, &mut cleanup);
    let work = n1.dir.join(format!("{name}-work"));
    std::fs::create_dir_all(&work).unwrap();
    cleanup.paths.push(work.clone());
    for mb in [10u32, 100] {
        let src = format!("{name}-{mb}");
        cleanup.docker(n1, &["rm", "-f", &src]);
        cleanup.docker(n2, &["rm", "-f", &src]);
        // 1 MiB files of random data, as a workload writing its data would.
        n1.docker_ok(&[
            "run", "--name", &src, "--network", "none", &image, "/bin/sh", "-c",
            &format!("mkdir -p /data/out; i=0; while [ $i -lt {mb} ]; do dd if=/dev/urandom of=/data/out/f$i bs=1048576 count=1 2>/dev/null; i=$((i+1)); done"),
        ]);
        let id1 = container_id(n1, &src);
        let tar = work.join(format!("rootfs-{mb}.tar"));
        let t = Instant::now();
        let packed = rt.block_on(d1.pack_rootfs(&id1, &tar)).unwrap();
        let pack_s = t.elapsed().as_secs_f64();
        let id2 = n2
            .docker_ok(&[
                "create",
                "--name",
                &src,
                "--network",
                "none",
                &image,
                "true",
            ])
            .trim()
            .to_string();
        let t = Instant::now();
        let applied = rt.block_on(d2.apply_rootfs(&id2, &tar)).unwrap();
        let apply_s = t.elapsed().as_secs_f64();
        eprintln!(
            "{mb} MiB written: tar {} B, pack {pack_s:.3} s, apply {apply_s:.3} s",
            packed.tar_bytes
        );
        assert_eq!(applied.file_bytes, u64::from(mb) << 20);
        let up1 = rt.block_on(d1.upper_dir(&id1)).unwrap();
        let up2 = rt.block_on(d2.upper_dir(&id2)).unwrap();
        for i in [0, mb - 1] {
            let rel = format!("data/out/f{i}");
            assert!(
                std::fs::read(up1.join(&rel)).unwrap() == std::fs::read(up2.join(&rel)).unwrap(),
                "{rel} differs"
            );
        }
    }
}

fn container_id(node: &Node, name: &str) -> String {
    node.docker_ok(&["inspect", "-f", "{{.Id}}", name])
        .trim()
        .to_string()
}
