//! In-process harness for the drivers (tests only): nodes on the recording
//! fake engine, statuses recorded instead of published, the data connection
//! an in-memory pipe, and scripted peers that speak the real protocol and
//! wire code. The tests below drive `source` and `target` end to end and
//! check that every failure ends in the state the README promises.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::DuplexStream;
use tokio::sync::watch;

use super::node::BoxFuture;
use super::protocol::{self, Prepare, ToSource, ToTarget};
use super::source::{self, MigrateJob};
use super::{
    checkpoint_name, target, Conn, Dial, JobRegistry, MigrationError, Node, Peers, Reporter,
    Timeouts,
};
use crate::mqtt::contract::{JobState, JobStatus, NodeStatus, Role};
use crate::runtime::fake::{FakeEngine, LAYER_BYTES};
use crate::runtime::policy::no_restart;
use crate::runtime::sockets::{CriuTcpOptions, TcpConn};
use crate::runtime::{CheckpointOptions, EngineInfo, TcpDump, TcpMode, TcpState};
use crate::stream::archive::UnpackLimits;
use crate::stream::testutil::TempDir;
use crate::stream::wire::{self, SendOptions, TransferHeader};
use bollard::models::{RestartPolicy, RestartPolicyNameEnum};

const IMAGE: &str = "ferry/counter:1";
const NAME: &str = "web";
/// `web`'s named volume, and its anonymous one (named by the engine).
const NAMED: &str = "web-data";
const ANON: &str = "4f1c0ffee";
/// What `web` wrote into its own filesystem after it started.
const WRITTEN: (&str, &str) = ("/data/written", "after start");

fn always() -> RestartPolicy {
    RestartPolicy {
        name: Some(RestartPolicyNameEnum::ALWAYS),
        maximum_retry_count: Some(0),
    }
}
const WAIT: Duration = Duration::from_secs(10);

/// Job statuses as a node would have published them.
#[derive(Clone)]
pub(crate) struct Statuses(Arc<watch::Sender<Vec<JobStatus>>>);

impl Statuses {
    fn new() -> Self {
        Statuses(Arc::new(watch::channel(Vec::new()).0))
    }

    fn all(&self) -> Vec<JobStatus> {
        self.0.borrow().clone()
    }

    /// The final status of `job`, waiting for it.
    async fn final_of(&self, job: &str) -> JobStatus {
        let mut rx = self.0.subscribe();
        let found = tokio::time::timeout(
            WAIT,
            rx.wait_for(|all| all.iter().any(|s| s.job_id == job && s.state.is_final())),
        )
        .await;
        assert!(found.is_ok(), "no final status for {job}: {:?}", self.all());
        let all = self.all();
        all.into_iter()
            .rev()
            .find(|s| s.job_id == job && s.state.is_final())
            .unwrap()
    }
}

impl Reporter for Statuses {
    fn job_status<'a>(&'a self, status: &'a JobStatus) -> BoxFuture<'a, ()> {
        self.0.send_modify(|all| all.push(status.clone()));
        Box::pin(async {})
    }
}

pub(crate) type Answer = Box<dyn Fn(DuplexStream) + Send + Sync>;

/// Dials by handing the far end of a pipe to `answer`.
struct PipeDialer(Answer);

impl Dial for PipeDialer {
    fn dial<'a>(
        &'a self,
        _target: &'a str,
        _addr: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Conn>, MigrationError>> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        (self.0)(far);
        Box::pin(async move { Ok(Box::new(near) as Box<dyn Conn>) })
    }
}

pub(crate) fn test_node(
    id: &str,
    dir: &TempDir,
    dialer: Answer,
) -> (Arc<Node<FakeEngine>>, Statuses) {
    let root = dir.join(format!("{id}-engine"));
    let work_dir = dir.join(format!("{id}-work"));
    std::fs::create_dir_all(&work_dir).unwrap();
    let statuses = Statuses::new();
    let node = Node {
        id: id.into(),
        engine: FakeEngine::new(&root, &[IMAGE]),
        engine_info: EngineInfo {
            arch: "x86_64".into(),
            kernel: "6.1".into(),
            version: "fake".into(),
            root_dir: root,
            experimental: true,
        },
        page_size: 4096,
        criu: Ok("4.2.1".into()),
        work_dir,
        // a on 127.0.0.11, b on 127.0.0.12, as on the bed.
        advertise: Some(SocketAddr::from((
            [127, 0, 0, 10 + (id == "b") as u8 + 1],
            7070,
        ))),
        journal: None,
        reporter: Box::new(statuses.clone()),
        dialer: Box::new(PipeDialer(dialer)),
        policy: Default::default(),
        timeouts: Timeouts {
            connect: WAIT,
            prepare: WAIT,
            restore: WAIT,
            commit: WAIT,
            progress_every: Duration::from_millis(20),
            prepare_wait: WAIT,
            commit_wait: WAIT,
            source_silence: WAIT,
            settle: Duration::ZERO,
        },
        peers: Peers::default(),
        jobs: JobRegistry::new(id),
        orders: crate::order::Orders::open(),
    };
    (Arc::new(node), statuses)
}

pub(crate) fn online(arch: &str) -> NodeStatus {
    NodeStatus {
        online: true,
        arch: arch.into(),
        page_size: 4096,
        criu: Some("4.2.1".into()),
        data_addr: Some("pipe".into()),
        ..NodeStatus::default()
    }
}

/// What the source's peer is.
enum Peer {
    /// The real target driver on node `b`.
    Target,
    /// A scripted target that stops at `Stop`.
    Scripted(Stop),
}

/// Where a scripted target stops following the protocol.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Refuse,
    CloseBeforeAnswering,
    CloseAfterPrepared,
    FailRestore,
    CloseAfterCommit,
}

/// Node `a` runs container `web` (restart policy `always`, a named and an
/// anonymous volume, a file written); node `b` is its target.
struct Pair {
    a: Arc<Node<FakeEngine>>,
    b: Arc<Node<FakeEngine>>,
    /// The engine id of `web` on `a`.
    id: String,
    a_statuses: Statuses,
    b_statuses: Statuses,
    _dir: TempDir,
}

impl Pair {
    fn new(peer: Peer) -> Pair {
        let dir = TempDir::new("drivers");
        let (b, b_statuses) = test_node("b", &dir, Box::new(|_| panic!("b dials nobody")));
        let staging = dir.join("scripted-staging");
        let answer: Answer = match peer {
            Peer::Target => {
                let b = Arc::downgrade(&b);
                Box::new(move |far| {
                    let b = b.upgrade().expect("target node alive");
                    tokio::spawn(target::serve(b, far, Some(vec!["a".into()])));
                })
            }
            Peer::Scripted(stop) => Box::new(move |far| {
                tokio::spawn(scripted_target(far, stop, staging.clone()));
            }),
        };
        let (a, a_statuses) = test_node("a", &dir, answer);
        let id = a.engine.run_with(
            NAME,
            IMAGE,
            always(),
            &[
                (NAMED, false, "named contents"),
                (ANON, true, "anon contents"),
            ],
        );
        a.engine.write_file(NAME, WRITTEN.0, WRITTEN.1);
        a.peers.update("b", online("x86_64"));
        Pair {
            a,
            b,
            id,
            a_statuses,
            b_statuses,
            _dir: dir,
        }
    }

    /// Runs job `j1` on the source to its end; returns its final status.
    async fn migrate(&self) -> JobStatus {
        self.migrate_with(TcpMode::Close).await
    }

    /// [`Pair::migrate`] with the job's `tcp` mode.
    async fn migrate_with(&self, tcp: TcpMode) -> JobStatus {
        let guard = self
            .a
            .jobs
            .try_register("j1", &self.id, Role::Source)
            .unwrap();
        let job = MigrateJob {
            job_id: "j1".into(),
            container: NAME.into(),
            target: "b".into(),
            rate_limit: None,
            zstd_level: 3,
            tcp,
            bind_mounts: Default::default(),
            excluded: Default::default(),
            parent: None,
            order: None,
            precopy: Default::default(),
        };
        let status = tokio::time::timeout(WAIT, source::run(self.a.clone(), job, guard))
            .await
            .expect("the source driver ended");
        assert_eq!(
            status,
            self.a_statuses.all().pop().unwrap(),
            "final status published"
        );
        assert!(self.a.jobs.is_empty(), "the job is deregistered");
        status
    }

    fn a_image_id(&self) -> String {
        self.a
            .engine
            .tagged(IMAGE)
            .expect("the source has the image")
    }

    /// `web` on the source as it was before the job: running, its policy,
    /// its file and volumes; never started afresh by the engine.
    fn assert_source_whole(&self, what: &str) {
        let e = &self.a.engine;
        assert_eq!(e.running(NAME), Some(true), "{what}: not running");
        assert_eq!(e.restarts(NAME), Some(0), "{what}: the engine restarted it");
        assert_eq!(e.policy(NAME), Some(always()), "{what}: policy");
        let files = e.files(NAME).unwrap_or_default();
        assert_eq!(files.get(WRITTEN.0).map(String::as_str), Some(WRITTEN.1));
        assert_eq!(e.volume(NAMED).as_deref(), Some("named contents"), "{what}");
        assert_eq!(e.volume(ANON).as_deref(), Some("anon contents"), "{what}");
    }

    /// Nothing of the job left on the target: no container, no volume.
    fn assert_target_empty(&self, what: &str) {
        let e = &self.b.engine;
        assert_eq!(
            e.running(NAME),
            None,
            "{what}: container left on the target"
        );
        assert_eq!(e.volume(NAMED), None, "{what}: volume left on the target");
        assert_eq!(e.volume(ANON), None, "{what}: volume left on the target");
    }

    /// Cancels `j1` on the source when the engine of `on` sees `call`.
    fn cancel_at(&self, on: &Arc<Node<FakeEngine>>, call: &'static str) {
        let a: Weak<Node<FakeEngine>> = Arc::downgrade(&self.a);
        on.engine.on_call(move |c| {
            if c == call {
                if let Some(a) = a.upgrade() {
                    a.jobs.cancel("j1").expect("cancel accepted");
                }
            }
        });
    }
}

async fn scripted_target(mut conn: DuplexStream, stop: Stop, staging: PathBuf) {
    let Ok(ToTarget::Prepare(p)) = protocol::recv::<_, ToTarget>(&mut conn).await else {
        return;
    };
    let reply = match stop {
        Stop::CloseBeforeAnswering => return,
        Stop::Refuse => ToSource::Refused {
            reason: "no room for it".into(),
        },
        _ => ToSource::Prepared {
            container_id: "remote".into(),
        },
    };
    protocol::send(&mut conn, &reply).await.unwrap();
    if matches!(stop, Stop::Refuse | Stop::CloseAfterPrepared) {
        return;
    }
    // Keepalives while the source checkpoints, then the stream.
    loop {
        match protocol::recv::<_, ToTarget>(&mut conn).await.unwrap() {
            ToTarget::Progress { .. } => {}
            ToTarget::Sending => break,
            other => panic!("expected progress or sending, got {other:?}"),
        }
    }
    let limits = UnpackLimits::default();
    let staging = staging.join(&p.job_id);
    wire::receive_checkpoint(&mut conn, &staging, &limits, |_| Ok(()))
        .await
        .unwrap();
    if let Stop::FailRestore = stop {
        let reason = "restore exploded".into();
        let _ = protocol::send(&mut conn, &ToSource::Failed { reason }).await;
        return;
    }
    protocol::send(&mut conn, &ToSource::Restored)
        .await
        .unwrap();
    let commit = protocol::recv::<_, ToTarget>(&mut conn).await;
    assert!(matches!(commit, Ok(ToTarget::Commit)), "{commit:?}");
    // CloseAfterCommit: the `Committed` never arrives.
}

fn state_and_error(s: &JobStatus) -> (JobState, String) {
    (s.state, s.error.clone().unwrap_or_default())
}

/// A container on a user-defined network (alias, subnet, label) and on the
/// bridge, publishing a port on the source node's address.
#[tokio::test]
async fn the_target_recreates_networks_rebinds_ports_and_reports_addresses() {
    use crate::runtime::networks::{Attachment, Endpoint, NetworkDef, Pool};
    let p = Pair::new(Peer::Target);
    crate::runtime::Engine::remove(&p.a.engine, &p.id)
        .await
        .unwrap();
    let appnet = NetworkDef {
        name: "appnet".into(),
        driver: "bridge".into(),
        labels: BTreeMap::from([("tier".into(), "edge".into())]),
        pools: vec![Pool {
            subnet: "10.231.7.0/24".into(),
            gateway: None,
            ip_range: None,
        }],
        ..NetworkDef::default()
    };
    let spec = crate::runtime::ContainerSpec {
        name: NAME.into(),
        image: IMAGE.into(),
        create_body: serde_json::json!({
            "Image": IMAGE,
            "HostConfig": {
                "NetworkMode": "appnet",
                "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.11", "HostPort": "8080"}]},
            },
        }),
        networks: vec![
            Attachment {
                network: "appnet".into(),
                aliases: vec!["api".into()],
                address: Some("10.231.7.2".into()),
                definition: Some(appnet.clone()),
                ..Attachment::default()
            },
            Attachment {
                network: "bridge".into(),
                address: Some("10.200.1.2".into()),
                ..Attachment::default()
            },
        ],
    };
    p.a.engine.run_spec(&spec);
    let mut a_status = online("x86_64");
    a_status.data_addr = Some("127.0.0.11:7070".into());
    p.b.peers.update("a", a_status);

    let status = p.migrate().await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    let old = BTreeMap::from([
        ("appnet".to_string(), "10.231.7.2".to_string()),
        ("bridge".to_string(), "10.200.1.2".to_string()),
    ]);
    assert_eq!(status.old_addresses, old);
    let b = p.b_statuses.final_of("j1").await;
    assert_eq!(b.old_addresses, old);
    assert_eq!(
        b.new_addresses,
        BTreeMap::from([
            ("appnet".to_string(), "10.88.0.1".to_string()),
            ("bridge".to_string(), "10.88.1.1".to_string()),
        ])
    );
    assert!(p.b.engine.network_names().contains(&"appnet".to_string()));
    let created = p.b.engine.spec_of(NAME).unwrap().create_body;
    assert_eq!(
        created["HostConfig"]["PortBindings"]["80/tcp"][0]["HostIp"],
        "127.0.0.12"
    );
    assert_eq!(
        created["NetworkingConfig"]["EndpointsConfig"]["appnet"]["Aliases"],
        serde_json::json!(["api"])
    );
    assert_eq!(
        p.b.engine.connected(),
        [("bridge".to_string(), Endpoint::default())]
    );
}

#[tokio::test]
async fn a_migration_moves_the_container_and_both_sides_succeed() {
    let p = Pair::new(Peer::Target);
    let status = p.migrate().await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert!(status.bytes_raw > 600 * 1024, "{status:?}");
    assert!(status.bytes_wire > 0 && status.bytes_wire < status.bytes_raw);
    assert!(status.bytes_state > 0, "{status:?}");
    assert_eq!(status.bytes_image, 0, "the target had the image");
    assert_eq!(p.a.engine.running(NAME), None, "the original is removed");
    // Files, volumes and the restart policy arrived; the source's volumes
    // went after the commit.
    let b = &p.b.engine;
    let files = b.files(NAME).unwrap();
    assert_eq!(files.get(WRITTEN.0).map(String::as_str), Some(WRITTEN.1));
    assert_eq!(b.volume(NAMED).as_deref(), Some("named contents"));
    assert_eq!(b.volume(ANON).as_deref(), Some("anon contents"));
    let mut mounted = b.mounted(NAME);
    mounted.sort();
    assert_eq!(
        mounted,
        [ANON, NAMED],
        "the anonymous volume is mounted by name"
    );
    assert_eq!(b.policy(NAME), Some(always()));
    assert_eq!(
        (p.a.engine.volume(NAMED), p.a.engine.volume(ANON)),
        (None, None)
    );
    // The engine could not start the original again: its policy was `no`
    // from before the checkpoint on.
    let calls = p.a.engine.calls();
    let at = |c| calls.iter().position(|x| *x == c).unwrap();
    assert!(at("pause_restart_policy") < at("checkpoint"), "{calls:?}");
    assert!(at("remove") < at("remove_unused_volumes"), "{calls:?}");
    assert!(!calls.contains(&"restore"), "{calls:?}");
    assert_eq!(
        p.b.engine.running(NAME),
        Some(true),
        "it runs on the target"
    );
    assert!(!p.b.engine.has_checkpoint(NAME, &checkpoint_name("j1")));
    let b = p.b_statuses.final_of("j1").await;
    assert_eq!((b.state, b.role), (JobState::Succeeded, Role::Target));
    assert!(p.b.jobs.is_empty());
    assert!(!p.b.work_dir.join("staging").join("j1").exists());
    // The source reported every phase in order.
    let phases: Vec<_> = p.a_statuses.all().iter().filter_map(|s| s.phase).collect();
    let mut seen = phases.clone();
    seen.dedup();
    use crate::mqtt::contract::Phase::*;
    assert_eq!(
        seen,
        [Precheck, Precopy, Checkpoint, Transfer, Restore, Cleanup]
    );
    // The fake engine cannot leave a container running: no rounds, and
    // the status says why.
    let precopy = status.precopy.clone().expect("the source reports pre-copy");
    assert!(precopy.rounds.is_empty() && precopy.final_round.is_none());
    assert!(
        precopy
            .note
            .as_deref()
            .unwrap_or("")
            .contains("cannot dump a running container"),
        "{precopy:?}"
    );
}

/// Pre-copy through both drivers: two rounds while the container runs (the
/// second carries only the block that changed), a final dump sent as
/// references but for that block, and the target restores the final dump's
/// images byte for byte, leaving no pre-copy folder on either side.
#[tokio::test]
async fn pre_copy_rounds_then_a_final_delta_restore_the_final_images() {
    let p = Pair::new(Peer::Target);
    p.a.engine.allow_dump_running();
    let status = p.migrate().await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    let pre = status.precopy.clone().expect("the source reports pre-copy");
    assert_eq!(pre.rounds.len(), 2, "{pre:?}");
    let pages = crate::runtime::fake::fake_pages(0).len() as u64;
    assert_eq!(
        (pre.rounds[0].bytes_pages, pre.rounds[0].bytes_new),
        (pages, pages)
    );
    assert_eq!(pre.rounds[1].bytes_new, 4096, "{pre:?}");
    let last = pre.final_round.expect("the final dump went as deltas");
    assert_eq!((last.bytes_pages, last.bytes_new), (pages, 4096));
    assert_eq!(status.bytes_wire, last.bytes_wire);
    // Two dumps left it running, the third stopped it; the target restored
    // the third's images.
    assert_eq!(p.a.engine.dumps(), 3);
    assert_eq!(
        p.b.engine.restored_pages(),
        Some(crate::runtime::fake::fake_pages(2))
    );
    assert!(!p.a.work_dir.join("precopy").join("j1").exists());
    let staging: Vec<_> = std::fs::read_dir(p.b.work_dir.join("staging"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "{staging:?}");
}

/// Every failure injected at every step before the target confirms: the
/// job ends `failed` with the container untouched before the checkpoint,
/// `rolled_back` with the original running again after it; the target
/// keeps nothing either way.
#[tokio::test]
async fn every_failure_before_the_commit_ends_with_the_workload_on_the_source() {
    use JobState::{Failed, RolledBack};
    type Setup = fn(&Pair);
    let cases: [(&str, Peer, Setup, JobState, &str); 21] = [
        (
            "source inspect",
            Peer::Target,
            |p| p.a.engine.fail("inspect"),
            Failed,
            "precheck: cannot inspect container web",
        ),
        (
            "target offline",
            Peer::Target,
            |p| p.a.peers.update("b", NodeStatus::default()),
            Failed,
            "precheck: target node b is offline",
        ),
        (
            "other arch",
            Peer::Target,
            |p| p.a.peers.update("b", online("aarch64")),
            Failed,
            "engine arch differs",
        ),
        (
            "mounts refused",
            Peer::Target,
            |p| p.a.engine.fail("survey"),
            Failed,
            "precheck: engine call survey",
        ),
        (
            "target image",
            Peer::Target,
            |p| p.b.engine.fail("missing_image"),
            Failed,
            "target b refused: image ferry/counter:1: engine call missing_image",
        ),
        (
            "image export",
            Peer::Target,
            |p| {
                p.b.engine.remove_image(IMAGE);
                p.a.engine.fail("export_image");
            },
            Failed,
            "image for b: engine call export_image",
        ),
        (
            "image load",
            Peer::Target,
            |p| {
                p.b.engine.remove_image(IMAGE);
                p.b.engine.fail("load_image");
            },
            Failed,
            "target b refused: image ferry/counter:1: engine call load_image",
        ),
        (
            "volume create",
            Peer::Target,
            |p| p.b.engine.fail("create_volumes"),
            Failed,
            "target b refused: cannot create the volumes of web on b",
        ),
        (
            "pre-copy dump",
            Peer::Target,
            |p| {
                p.a.engine.allow_dump_running();
                p.a.engine.fail("dump_running");
            },
            Failed,
            "pre-copy round 1: dump of the running container: engine call dump_running",
        ),
        (
            "policy pause",
            Peer::Target,
            |p| p.a.engine.fail("pause_restart_policy"),
            Failed,
            "restart policy: cannot set it to no before the checkpoint",
        ),
        (
            "target create",
            Peer::Target,
            |p| p.b.engine.fail("create"),
            Failed,
            "target b refused: cannot create container web on b",
        ),
        (
            "refused",
            Peer::Scripted(Stop::Refuse),
            |_| {},
            Failed,
            "target b refused: no room for it",
        ),
        (
            "no answer",
            Peer::Scripted(Stop::CloseBeforeAnswering),
            |_| {},
            Failed,
            "prepare on b: peer closed",
        ),
        (
            "checkpoint",
            Peer::Target,
            |p| p.a.engine.fail_checkpoint_after_stopping(),
            RolledBack,
            "checkpoint: engine call checkpoint",
        ),
        (
            "source images",
            Peer::Target,
            |p| p.a.engine.fail("checkpoint_dir"),
            RolledBack,
            "transfer: engine call checkpoint_dir",
        ),
        (
            "pack state",
            Peer::Target,
            |p| p.a.engine.fail("pack_state"),
            RolledBack,
            "checkpoint: packing files and volumes: engine call pack_state",
        ),
        (
            "state apply",
            Peer::Target,
            |p| p.b.engine.fail("apply_state"),
            RolledBack,
            "restore on target failed: restore: applying files and volumes",
        ),
        (
            "target placing images",
            Peer::Target,
            |p| p.b.engine.fail("checkpoint_dir"),
            RolledBack,
            "restore on target failed: restore: engine call checkpoint_dir",
        ),
        (
            "target restore",
            Peer::Target,
            |p| p.b.engine.fail("restore"),
            RolledBack,
            "restore on target failed: restore on b:",
        ),
        (
            "lost after prepared",
            Peer::Scripted(Stop::CloseAfterPrepared),
            |_| {},
            RolledBack,
            "peer closed the data connection",
        ),
        (
            "target says failed",
            Peer::Scripted(Stop::FailRestore),
            |_| {},
            RolledBack,
            "restore on target failed: restore exploded",
        ),
    ];
    for (what, peer, setup, end, error) in cases {
        let p = Pair::new(peer);
        setup(&p);
        let (state, got) = state_and_error(&p.migrate().await);
        // A connection lost after `Prepared` is noticed during pre-copy
        // (nothing stopped yet: failed) or at the checkpoint (rolled back),
        // as the keepalive and the dump race.
        let end = if what == "lost after prepared" && state == Failed {
            Failed
        } else {
            end
        };
        assert_eq!(state, end, "{what}: {got}");
        assert!(got.contains(error), "{what}: {got:?} lacks {error:?}");
        p.assert_source_whole(what);
        let checkpointed = p.a.engine.calls().contains(&"checkpoint");
        assert_eq!(checkpointed, end == RolledBack, "{what}");
        assert!(
            !p.a.engine.has_checkpoint(NAME, &checkpoint_name("j1")),
            "{what}: checkpoint left"
        );
        if !p.b_statuses.all().is_empty() {
            let b = p.b_statuses.final_of("j1").await;
            assert_eq!(b.state, Failed, "{what}: target {b:?}");
            assert!(!p.b.work_dir.join("staging").join("j1").exists(), "{what}");
        }
        p.assert_target_empty(what);
        let staging = p.a.work_dir.join("staging");
        let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{what}: the exported image is left");
    }
}

/// One established connection; restores here get `tcp-close` if `close`.
fn connected(close: bool) -> TcpState {
    TcpState {
        established: vec![TcpConn {
            local: "10.0.0.2:40000".parse().unwrap(),
            remote: "10.0.0.1:1883".parse().unwrap(),
        }],
        restore: CriuTcpOptions {
            tcp_close: close,
            tcp_established: false,
        },
        restore_config: "/etc/criu/runc.conf".into(),
    }
}

#[tokio::test]
async fn an_open_connection_is_closed_at_the_checkpoint_where_restores_allow_it() {
    let p = Pair::new(Peer::Target);
    p.a.engine.set_tcp(connected(true));
    let status = p.migrate().await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(status.checkpoint_via.as_deref(), Some("runc"));
    assert_eq!(
        p.a.engine.checkpoints(),
        [CheckpointOptions {
            tcp: TcpDump::Close
        }]
    );
}

#[tokio::test]
async fn without_connections_the_dump_takes_no_tcp_option() {
    let p = Pair::new(Peer::Target);
    let status = p.migrate_with(TcpMode::Refuse).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(
        p.a.engine.checkpoints(),
        [CheckpointOptions {
            tcp: TcpDump::Plain
        }]
    );
}

#[tokio::test]
async fn connections_the_job_or_the_node_cannot_carry_stop_it_before_anything_stops() {
    for (tcp, restore_close, want) in [
        (TcpMode::Refuse, true, "job says tcp=refuse"),
        (
            TcpMode::Close,
            false,
            "needs `tcp-close` in /etc/criu/runc.conf",
        ),
        (TcpMode::Established, true, "needs `tcp-established`"),
    ] {
        let p = Pair::new(Peer::Target);
        p.a.engine.set_tcp(connected(restore_close));
        let (state, error) = state_and_error(&p.migrate_with(tcp).await);
        assert_eq!(state, JobState::Failed, "{tcp}");
        assert!(error.starts_with("precheck: container web: the container holds 1 established TCP connection(s) (10.0.0.2:40000 -> 10.0.0.1:1883)"), "{error}");
        assert!(error.contains(want), "{tcp}: {error}");
        assert!(p.a.engine.checkpoints().is_empty(), "{tcp}: no checkpoint");
        assert_eq!(p.a.engine.running(NAME), Some(true), "{tcp}");
        assert_eq!(p.b.engine.running(NAME), None, "{tcp}");
    }
}

#[tokio::test]
async fn an_image_only_the_source_has_travels_without_the_layers_the_target_has() {
    // Missing altogether: both layers travel.
    let p = Pair::new(Peer::Target);
    p.b.engine.remove_image(IMAGE);
    let whole = p.migrate().await;
    assert_eq!(whole.state, JobState::Succeeded, "{whole:?}");
    let id = p.a_image_id();
    assert_eq!(p.b.engine.tagged(IMAGE), Some(id.clone()), "same image id");
    assert_eq!(p.b.engine.running(NAME), Some(true));
    let b = p.b_statuses.final_of("j1").await;
    assert_eq!(
        b.bytes_image, whole.bytes_image,
        "the target counted the same"
    );

    // Another image under the same tag, sharing the base layer: only the
    // top layer travels, and the tag moves to the source's image.
    let p = Pair::new(Peer::Target);
    p.b.engine.remove_image(IMAGE);
    let other = ["sha256:base".to_string(), "sha256:other-top".to_string()];
    let other_id = p.b.engine.add_image(IMAGE, &other);
    let delta = p.migrate().await;
    assert_eq!(delta.state, JobState::Succeeded, "{delta:?}");
    assert_eq!(p.b.engine.tagged(IMAGE), Some(id));
    assert_ne!(p.b.engine.tagged(IMAGE), Some(other_id));
    println!(
        "image bytes on the wire: whole {}, top layer only {}",
        whole.bytes_image, delta.bytes_image
    );
    let layer = LAYER_BYTES as u64;
    assert!(whole.bytes_image > 2 * layer, "{whole:?}");
    assert!(
        delta.bytes_image > layer && delta.bytes_image < 2 * layer,
        "{delta:?}"
    );
}

#[tokio::test]
async fn a_volume_another_container_uses_stays_on_the_source() {
    let p = Pair::new(Peer::Target);
    p.a.engine
        .run_with("sidecar", IMAGE, no_restart(), &[(NAMED, false, "")]);
    let status = p.migrate().await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!(p.a.engine.volume(NAMED).as_deref(), Some("named contents"));
    assert_eq!(p.a.engine.volume(ANON), None);
    assert_eq!(p.b.engine.volume(NAMED).as_deref(), Some("named contents"));
}

#[tokio::test]
async fn a_cancel_as_the_policy_is_paused_puts_it_back() {
    let p = Pair::new(Peer::Target);
    let a = p.a.clone();
    p.cancel_at(&a, "pause_restart_policy");
    let (state, _) = state_and_error(&p.migrate().await);
    assert_eq!(state, JobState::Canceled);
    assert!(!p.a.engine.calls().contains(&"checkpoint"));
    p.assert_source_whole("canceled at the pause");
    assert_eq!(p.b_statuses.final_of("j1").await.state, JobState::Failed);
    p.assert_target_empty("canceled at the pause");
}

#[tokio::test]
async fn a_failed_rollback_ends_failed_with_the_first_reason() {
    let p = Pair::new(Peer::Target);
    p.b.engine.fail("restore");
    p.a.engine.fail("restore");
    let (state, error) = state_and_error(&p.migrate().await);
    assert_eq!(state, JobState::Failed);
    assert!(error.starts_with("restore on target failed"), "{error}");
    assert_eq!(p.a.engine.running(NAME), Some(false));
    assert_eq!(p.b.engine.running(NAME), None);
}

#[tokio::test]
async fn after_the_commit_the_job_only_goes_forward() {
    // The original cannot be removed: the workload still runs on the target.
    let p = Pair::new(Peer::Target);
    p.a.engine.fail("remove");
    let (state, error) = state_and_error(&p.migrate().await);
    assert_eq!(state, JobState::Failed);
    assert!(
        error.starts_with("cleanup: the workload runs on the target"),
        "{error}"
    );
    assert_eq!(p.b.engine.running(NAME), Some(true));
    assert_eq!(p.b_statuses.final_of("j1").await.state, JobState::Succeeded);
    assert_eq!(
        p.a.engine.running(NAME),
        Some(false),
        "no rollback after the commit"
    );

    // The target never confirms: the stopped original and its checkpoint stay.
    let p = Pair::new(Peer::Scripted(Stop::CloseAfterCommit));
    let (state, error) = state_and_error(&p.migrate().await);
    assert_eq!(state, JobState::Failed);
    assert!(
        error.starts_with("target did not confirm the commit"),
        "{error}"
    );
    assert_eq!(p.a.engine.running(NAME), Some(false));
    assert!(p.a.engine.has_checkpoint(NAME, &checkpoint_name("j1")));
}

#[tokio::test]
async fn a_cancel_before_the_checkpoint_leaves_the_container_running() {
    let p = Pair::new(Peer::Target);
    // The target's create runs while the source waits for `Prepared`.
    p.cancel_at(&p.b, "create");
    let (state, error) = state_and_error(&p.migrate().await);
    assert_eq!(
        (state, error.as_str()),
        (JobState::Canceled, "canceled by request")
    );
    assert_eq!(p.a.engine.running(NAME), Some(true));
    assert!(!p.a.engine.calls().contains(&"checkpoint"));
    assert_eq!(p.b_statuses.final_of("j1").await.state, JobState::Failed);
    assert_eq!(p.b.engine.running(NAME), None);
}

#[tokio::test]
async fn a_cancel_during_the_checkpoint_restores_the_original() {
    let p = Pair::new(Peer::Target);
    let a = p.a.clone();
    p.cancel_at(&a, "checkpoint");
    let (state, _) = state_and_error(&p.migrate().await);
    assert_eq!(state, JobState::Canceled);
    assert_eq!(p.a.engine.running(NAME), Some(true));
    assert!(p.a.engine.calls().contains(&"restore"), "rolled back");
    assert_eq!(p.b_statuses.final_of("j1").await.state, JobState::Failed);
    assert_eq!(p.b.engine.running(NAME), None);
}

/// The real race: a cancel from another thread at about the moment the
/// target confirms the restore. Whoever wins, the workload runs on exactly
/// one node and the canceler was told the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_the_commit_ends_on_exactly_one_node() {
    let mut seen = std::collections::BTreeMap::new();
    for round in 0..40u64 {
        let p = Pair::new(Peer::Target);
        let (tx, rx) = std::sync::mpsc::channel();
        let a = Arc::downgrade(&p.a);
        // The target's restore runs just before it answers `Restored`.
        p.b.engine.on_call(move |call| {
            if call == "restore" {
                let (a, tx) = (a.clone(), tx.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_micros(round * 50));
                    let answer = a.upgrade().map(|a| a.jobs.cancel("j1"));
                    let _ = tx.send(answer);
                });
            }
        });
        let status = p.migrate().await;
        let answer = rx
            .recv_timeout(WAIT)
            .expect("the cancel ran")
            .expect("node alive");
        assert!(p.b_statuses.final_of("j1").await.state.is_final());
        let (on_a, on_b) = (p.a.engine.running(NAME), p.b.engine.running(NAME));
        match &answer {
            Ok(()) => {
                assert_eq!(status.state, JobState::Canceled, "round {round}");
                assert_eq!((on_a, on_b), (Some(true), None), "round {round}");
            }
            Err(e) => {
                // Committed, or already over by the time it arrived.
                assert!(
                    matches!(
                        e,
                        super::CancelError::Committed { .. }
                            | super::CancelError::NotRunning { .. }
                    ),
                    "round {round}: {e}"
                );
                assert_eq!(status.state, JobState::Succeeded, "round {round}");
                assert_eq!((on_a, on_b), (None, Some(true)), "round {round}");
            }
        }
        *seen.entry(format!("{:?}", status.state)).or_insert(0) += 1;
    }
    println!("cancel vs commit over 40 rounds: {seen:?}");
}

// --- the target driver against a scripted source

/// Where a scripted source stops following the protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SourceStop {
    CloseAfterPrepared,
    /// The target's agent drains while the source checkpoints.
    TargetDrains,
    ForeignStream,
    CloseAfterRestored,
    Commit,
}

fn prepare(job: &str) -> Prepare {
    Prepare {
        job_id: job.into(),
        source_node: "a".into(),
        target_node: "b".into(),
        checkpoint: checkpoint_name(job),
        spec: crate::runtime::ContainerSpec {
            name: NAME.into(),
            image: IMAGE.into(),
            create_body: serde_json::json!({ "Image": IMAGE }),
            networks: Vec::new(),
        },
        state: None,
        estimate_bytes: 1 << 20,
        arch: "x86_64".into(),
        page_size: 4096,
        container_id: String::new(),
        order: None,
    }
}

/// Plays the source against `target::serve`; returns what it was told.
async fn scripted_source(
    b: &Arc<Node<FakeEngine>>,
    prep: Prepare,
    images: &Path,
    stop: SourceStop,
) -> Vec<ToSource> {
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(target::serve(b.clone(), far, Some(vec!["a".into()])));
    let mut told = vec![];
    let job = prep.job_id.clone();
    protocol::send(&mut near, &ToTarget::Prepare(Box::new(prep)))
        .await
        .unwrap();
    let answer = protocol::recv::<_, ToSource>(&mut near).await.unwrap();
    let prepared = matches!(answer, ToSource::Prepared { .. });
    told.push(answer);
    if prepared && stop == SourceStop::TargetDrains {
        let progress = ToTarget::Progress {
            phase: "checkpoint".into(),
            bytes: 1,
        };
        protocol::send(&mut near, &progress).await.unwrap();
        b.jobs.cancel_incoming();
        told.push(protocol::recv::<_, ToSource>(&mut near).await.unwrap());
    } else if prepared && stop != SourceStop::CloseAfterPrepared {
        let header = TransferHeader {
            job_id: if stop == SourceStop::ForeignStream {
                "other".into()
            } else {
                job.clone()
            },
            source_node: "a".into(),
            target_node: "b".into(),
            container: NAME.into(),
            checkpoint: checkpoint_name(&job),
        };
        let progress = ToTarget::Progress {
            phase: "checkpoint".into(),
            bytes: 1,
        };
        protocol::send(&mut near, &progress).await.unwrap();
        protocol::send(&mut near, &ToTarget::Sending).await.unwrap();
        let sent =
            wire::send_checkpoint(&mut near, &header, images, &SendOptions::default(), |_| {})
                .await;
        if sent.is_ok() {
            told.push(protocol::recv::<_, ToSource>(&mut near).await.unwrap());
            if stop == SourceStop::Commit {
                protocol::send(&mut near, &ToTarget::Commit).await.unwrap();
                told.push(protocol::recv::<_, ToSource>(&mut near).await.unwrap());
            }
        }
    }
    drop(near);
    tokio::time::timeout(WAIT, served)
        .await
        .expect("serve ended")
        .unwrap();
    told
}

fn images(dir: &TempDir) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("pages-1.img"), vec![7u8; 300 * 1024]).unwrap();
    images
}

#[tokio::test]
async fn the_target_keeps_the_container_only_after_the_commit() {
    let dir = TempDir::new("target-driver");
    let imgs = images(&dir);
    for stop in [
        SourceStop::CloseAfterPrepared,
        SourceStop::TargetDrains,
        SourceStop::ForeignStream,
        SourceStop::CloseAfterRestored,
        SourceStop::Commit,
    ] {
        let (b, statuses) = test_node("b", &dir, Box::new(|_| unreachable!()));
        let job = format!("{stop:?}").to_lowercase();
        let told = scripted_source(&b, prepare(&job), &imgs, stop).await;
        let last = statuses.final_of(&job).await;
        let kept = b.engine.running(NAME);
        if stop == SourceStop::Commit {
            assert_eq!(told.last(), Some(&ToSource::Committed), "{told:?}");
            assert_eq!((last.state, kept), (JobState::Succeeded, Some(true)));
            assert!(!b.engine.has_checkpoint(NAME, &checkpoint_name(&job)));
        } else {
            assert_eq!(last.state, JobState::Failed, "{stop:?}: {last:?}");
            assert_eq!(kept, None, "{stop:?}: the created container is left");
            assert!(b.engine.calls().contains(&"remove"), "{stop:?}");
        }
        if stop == SourceStop::CloseAfterRestored {
            assert_eq!(
                last.error.as_deref(),
                Some("source closed the connection before committing")
            );
        }
        if stop == SourceStop::TargetDrains {
            let reason = "target agent stopping".to_string();
            assert_eq!(told.last(), Some(&ToSource::Failed { reason }), "{told:?}");
            assert_eq!(last.error.as_deref(), Some("target agent stopping"));
        }
        if stop == SourceStop::ForeignStream {
            let error = last.error.unwrap_or_default();
            assert!(error.contains("does not match the prepared job"), "{error}");
        }
        assert!(
            !b.work_dir.join("staging").join(&job).exists(),
            "{stop:?}: staging left"
        );
        assert!(b.jobs.is_empty(), "{stop:?}: still registered");
        // b's engine and work dir are reused: start the next case clean.
        std::fs::remove_dir_all(&b.engine_info.root_dir).ok();
    }
}

#[tokio::test]
async fn the_target_refuses_what_is_not_for_it_and_publishes_nothing() {
    let dir = TempDir::new("target-refusals");
    let imgs = images(&dir);
    let (b, statuses) = test_node("b", &dir, Box::new(|_| unreachable!()));
    let mut wrong_node = prepare("j2");
    wrong_node.target_node = "c".into();
    let mut wrong_source = prepare("j3");
    wrong_source.source_node = "c".into();
    let mut wrong_checkpoint = prepare("j4");
    wrong_checkpoint.checkpoint = "ferry-j1".into();
    let _running = b.jobs.try_register("j5", "x", Role::Target).unwrap();
    let cases = [
        (wrong_node, "job is for node c, this is b"),
        (wrong_source, "not the job's source node c"),
        (wrong_checkpoint, "does not belong to job j4"),
        (prepare("j5"), "job j5 is already running on b"),
    ];
    for (prep, reason) in cases {
        let told = scripted_source(&b, prep, &imgs, SourceStop::Commit).await;
        assert!(
            matches!(&told[..], [ToSource::Refused { reason: r }] if r.contains(reason)),
            "{told:?} lacks {reason:?}"
        );
    }
    assert!(statuses.all().is_empty(), "{:?}", statuses.all());
    assert!(b.engine.calls().is_empty(), "{:?}", b.engine.calls());
}
