//! A recording fake [`Engine`] for unit tests of the migration drivers: it
//! keeps containers and checkpoint folders in memory and in a temp dir,
//! records every call, fails a call on request and runs a hook on each call
//! (for a cancel at an exact moment). Never used outside `cargo test`.
//!
//! Its [`StateEngine`] side is as small as the drivers allow: a container's
//! files are a map written as JSON into the checkpoint's state folder,
//! volumes are named strings, images are ids with layer digests, and a
//! restart policy other than `no` starts the original again after a
//! checkpoint, as the real engine does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bollard::models::RestartPolicy;

use super::images::{chain_ids, layers_to_leave_out, ImageExport, ImageRef};
use super::mounts::BindMounts;
use super::networks::{Endpoint, NetworkDef};
use super::policy::{no_restart, restarts};
use super::rootfs::{ApplyStats, PackStats};
use super::state::{
    discard_state, ApplyReport, PackReport, StateEngine, StateError, StatePlan, ROOTFS_TAR,
    STATE_DIR,
};
use super::volumes::{volume_tar, VolumeSpec};
use super::{
    CheckpointOptions, CheckpointVia, Checkpointed, Container, ContainerSpec, Engine, EngineInfo,
    RuntimeError, TcpState,
};

/// Bytes a fake image layer weighs in an export.
pub const LAYER_BYTES: usize = 100 * 1024;

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    image: String,
    running: bool,
    spec: ContainerSpec,
    policy: RestartPolicy,
    /// Its own filesystem's changes: path -> contents.
    files: BTreeMap<String, String>,
    volumes: Vec<VolumeSpec>,
    /// Times the engine started it afresh because of its restart policy.
    restarts: u32,
}

type Hook = Box<dyn Fn(&'static str) + Send + Sync>;

#[derive(Default)]
struct State {
    containers: HashMap<String, Entry>,
    /// Image id -> its layers' diff ids.
    images: HashMap<String, Vec<String>>,
    /// Reference -> image id.
    tags: HashMap<String, String>,
    /// Volume name -> contents.
    volumes: HashMap<String, String>,
    networks: Vec<NetworkDef>,
    /// (container id, network, endpoint) for each `connect`.
    connected: Vec<(String, String, Endpoint)>,
    calls: Vec<&'static str>,
    failing: HashSet<&'static str>,
    /// Calls that never return (a hung engine).
    hanging: HashSet<&'static str>,
    /// `checkpoint` fails only after it stopped the container.
    fail_after_stopping: bool,
    next_id: u64,
    /// What `tcp_state` reports.
    tcp: TcpState,
    /// The options of every checkpoint taken.
    checkpoints: Vec<CheckpointOptions>,
    /// `dump_running` works (off: the trait's default refusal).
    dumps_running: bool,
    /// Dumps taken so far, running or not: page images change with it.
    dumps: u64,
    /// `pages-1.img` of the last checkpoint restored.
    restored_pages: Option<Vec<u8>>,
}

/// The page image of the `n`-th dump: 150 distinct blocks (600 KiB), the
/// first of which changes from dump to dump as a running workload's would.
pub fn fake_pages(n: u64) -> Vec<u8> {
    let mut pages = Vec::with_capacity(150 * 4096);
    for block in 0..150u64 {
        let tag = if block == 0 { n + 1 } else { 0 };
        pages.extend_from_slice(&block.to_le_bytes());
        pages.extend_from_slice(&tag.to_le_bytes());
        pages.resize(pages.len() + 4096 - 16, (block * 31 + tag) as u8);
    }
    pages
}

pub struct FakeEngine {
    root: PathBuf,
    arch: String,
    state: Mutex<State>,
    hook: Mutex<Option<Hook>>,
}

impl FakeEngine {
    /// An engine whose state lives under `root`, with `images` present
    /// (each [`FakeEngine::layers_of`] its reference).
    pub fn new(root: &Path, images: &[&str]) -> Self {
        let builtin = ["bridge", "host", "none"].map(|n| NetworkDef {
            name: n.into(),
            driver: n.into(),
            ..NetworkDef::default()
        });
        let state = State {
            networks: builtin.to_vec(),
            ..State::default()
        };
        let engine = FakeEngine {
            root: root.to_path_buf(),
            arch: "x86_64".into(),
            state: Mutex::new(state),
            hook: Mutex::new(None),
        };
        for image in images {
            engine.add_image(image, &Self::layers_of(image));
        }
        engine
    }

    /// The layers of a test image: a base shared by every image, and one
    /// of its own.
    pub fn layers_of(reference: &str) -> Vec<String> {
        vec!["sha256:base".into(), format!("sha256:top-{reference}")]
    }

    /// An image id made from its layers, as an engine's is from its config.
    pub fn image_id(layers: &[String]) -> String {
        format!("sha256:id-{}", layers.join("+"))
    }

    /// Adds an image with these layers under `reference`; returns its id.
    pub fn add_image(&self, reference: &str, layers: &[String]) -> String {
        let id = Self::image_id(layers);
        let mut s = self.state();
        s.images.insert(id.clone(), layers.to_vec());
        s.tags.insert(reference.into(), id.clone());
        id
    }

    /// Removes the image `reference` names, and the tag.
    pub fn remove_image(&self, reference: &str) {
        let mut s = self.state();
        if let Some(id) = s.tags.remove(reference) {
            s.images.remove(&id);
        }
    }

    /// The image id `reference` names here.
    pub fn tagged(&self, reference: &str) -> Option<String> {
        self.state().tags.get(reference).cloned()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A running container with no restart policy and no volumes, as
    /// `docker run -d --name NAME IMAGE` would leave it; returns its id.
    pub fn run(&self, name: &str, image: &str) -> String {
        self.run_with(name, image, no_restart(), &[])
    }

    /// A running container with a restart policy and volumes (name,
    /// anonymous?, contents), as `docker run --restart P -v ...` would
    /// leave it; returns its id.
    pub fn run_with(
        &self,
        name: &str,
        image: &str,
        policy: RestartPolicy,
        volumes: &[(&str, bool, &str)],
    ) -> String {
        let binds: Vec<String> = volumes
            .iter()
            .filter(|(_, anonymous, _)| !anonymous)
            .map(|(v, _, _)| format!("{v}:/{v}"))
            .collect();
        let spec = ContainerSpec {
            name: name.into(),
            image: image.into(),
            create_body: serde_json::json!({
                "Image": image,
                "HostConfig": { "Binds": binds, "RestartPolicy": policy },
            }),
            networks: Vec::new(),
        };
        for (v, _, contents) in volumes {
            self.state()
                .volumes
                .entry(v.to_string())
                .or_insert_with(|| contents.to_string());
        }
        let id = self.add(&spec);
        let mut s = self.state();
        let e = s.containers.get_mut(&id).unwrap();
        e.running = true;
        e.policy = policy;
        e.volumes = volumes
            .iter()
            .map(|(v, anonymous, _)| volume_spec(v, *anonymous))
            .collect();
        id
    }

    fn add(&self, spec: &ContainerSpec) -> String {
        let mut s = self.state();
        s.next_id += 1;
        // Like Docker's: 64 hex digits, unrelated to the name.
        let id = format!("{:064x}", 0xfe00 + s.next_id);
        // The engine mounts what the create body names, creating a missing
        // volume empty.
        let binds = spec.create_body["HostConfig"]["Binds"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut volumes = Vec::new();
        for b in binds.iter().filter_map(|b| b.as_str()) {
            let name = b.split(':').next().unwrap_or("");
            if !name.is_empty() && !name.starts_with('/') {
                s.volumes.entry(name.into()).or_default();
                volumes.push(volume_spec(name, false));
            }
        }
        let policy = spec.create_body["HostConfig"]["RestartPolicy"].clone();
        s.containers.insert(
            id.clone(),
            Entry {
                name: spec.name.clone(),
                image: spec.image.clone(),
                running: false,
                spec: spec.clone(),
                policy: serde_json::from_value(policy).unwrap_or_else(|_| no_restart()),
                files: BTreeMap::new(),
                volumes,
                restarts: 0,
            },
        );
        id
    }

    /// What the container `name` wrote into its own filesystem.
    pub fn write_file(&self, name: &str, path: &str, contents: &str) {
        let id = self.find(name).expect("container").0;
        let mut s = self.state();
        let e = s.containers.get_mut(&id).unwrap();
        e.files.insert(path.into(), contents.into());
    }

    pub fn files(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.find(name).map(|(_, e)| e.files)
    }

    pub fn policy(&self, name: &str) -> Option<RestartPolicy> {
        self.find(name).map(|(_, e)| e.policy)
    }

    /// How often the engine started `name` afresh after it ended.
    pub fn restarts(&self, name: &str) -> Option<u32> {
        self.find(name).map(|(_, e)| e.restarts)
    }

    /// The contents of volume `name`, if it exists.
    pub fn volume(&self, name: &str) -> Option<String> {
        self.state().volumes.get(name).cloned()
    }

    /// Names of the volumes container `name` mounts.
    pub fn mounted(&self, name: &str) -> Vec<String> {
        self.find(name)
            .map(|(_, e)| e.volumes.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Every call named `call` (the trait method's name) fails from now on.
    pub fn fail(&self, call: &'static str) {
        self.state().failing.insert(call);
    }

    /// Every call named `call` never returns from now on.
    pub fn hang(&self, call: &'static str) {
        self.state().hanging.insert(call);
    }

    /// `checkpoint` stops the container, then reports a failure: what a
    /// CRIU error after the dump looks like.
    pub fn fail_checkpoint_after_stopping(&self) {
        self.state().fail_after_stopping = true;
    }

    /// Lets `dump_running` work, for pre-copy.
    pub fn allow_dump_running(&self) {
        self.state().dumps_running = true;
    }

    /// How many dumps were taken, running or not.
    pub fn dumps(&self) -> u64 {
        self.state().dumps
    }

    /// `pages-1.img` of the last checkpoint restored.
    pub fn restored_pages(&self) -> Option<Vec<u8>> {
        self.state().restored_pages.clone()
    }

    /// Runs `hook` with the call's name at the start of every call.
    pub fn on_call(&self, hook: impl Fn(&'static str) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(hook));
    }

    /// What `tcp_state` reports from now on.
    pub fn set_tcp(&self, tcp: TcpState) {
        self.state().tcp = tcp;
    }

    /// The options each checkpoint was taken with.
    pub fn checkpoints(&self) -> Vec<CheckpointOptions> {
        self.state().checkpoints.clone()
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.state().calls.clone()
    }

    /// Runs a container as [`FakeEngine::run`] with `spec`'s body and
    /// networks; returns its id.
    pub fn run_spec(&self, spec: &ContainerSpec) -> String {
        let id = self.add(spec);
        self.state().containers.get_mut(&id).unwrap().running = true;
        id
    }

    /// The spec a container was created with.
    pub fn spec_of(&self, name: &str) -> Option<ContainerSpec> {
        self.find(name).map(|(_, e)| e.spec)
    }

    pub fn network_names(&self) -> Vec<String> {
        self.state()
            .networks
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// (network, endpoint) of every `connect`, in order.
    pub fn connected(&self) -> Vec<(String, Endpoint)> {
        let s = self.state();
        s.connected
            .iter()
            .map(|(_, n, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// `Some(running)` for the container with this name, `None` if absent.
    pub fn running(&self, name: &str) -> Option<bool> {
        let s = self.state();
        s.containers
            .values()
            .find(|e| e.name == name)
            .map(|e| e.running)
    }

    fn dir(&self, id: &str, checkpoint: &str) -> PathBuf {
        self.root
            .join("containers")
            .join(id)
            .join("checkpoints")
            .join(checkpoint)
    }

    /// Whether a checkpoint folder of `name`'s container is left.
    pub fn has_checkpoint(&self, name: &str, checkpoint: &str) -> bool {
        let id = self.find(name).map(|(id, _)| id);
        id.is_some_and(|id| self.dir(&id, checkpoint).exists())
    }

    fn find(&self, name_or_id: &str) -> Option<(String, Entry)> {
        let s = self.state();
        s.containers
            .iter()
            .find(|(id, e)| *id == name_or_id || e.name == name_or_id)
            .map(|(id, e)| (id.clone(), e.clone()))
    }

    fn entry_mut<T>(&self, id: &str, f: impl FnOnce(&mut Entry) -> T) -> Result<T, RuntimeError> {
        let mut s = self.state();
        let e = s
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        Ok(f(e))
    }

    /// Records the call, runs the hook, and fails it if asked to.
    fn enter(&self, call: &'static str, subject: &str) -> Result<(), RuntimeError> {
        let failing = {
            let mut s = self.state();
            s.calls.push(call);
            s.failing.contains(call)
        };
        if let Some(hook) = &*self.hook.lock().unwrap() {
            hook(call);
        }
        if failing {
            return Err(injected(call, subject));
        }
        Ok(())
    }

    /// Never returns if `call` hangs.
    async fn stall(&self, call: &'static str) {
        if self.state().hanging.contains(call) {
            std::future::pending::<()>().await;
        }
    }

    fn set_running(&self, id: &str, running: bool) -> Result<(), RuntimeError> {
        let mut s = self.state();
        let e = s
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        e.running = running;
        Ok(())
    }
}

fn volume_spec(name: &str, anonymous: bool) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        destination: format!("/{name}"),
        anonymous,
        driver: "local".into(),
        labels: HashMap::new(),
        options: HashMap::new(),
        copy: true,
    }
}

fn io_err<'a>(path: &'a Path, verb: &str) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    let verb = verb.to_string();
    move |e| StateError::io(path, &verb, e)
}

fn injected(call: &'static str, subject: &str) -> RuntimeError {
    RuntimeError::Engine {
        call,
        subject: subject.into(),
        message: "injected failure".into(),
    }
}

impl Engine for FakeEngine {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        self.enter("info", "engine")?;
        Ok(EngineInfo {
            arch: self.arch.clone(),
            kernel: "6.1".into(),
            version: "fake".into(),
            root_dir: self.root.clone(),
            experimental: true,
        })
    }

    async fn inspect(&self, name: &str) -> Result<Container, RuntimeError> {
        self.enter("inspect", name)?;
        self.stall("inspect").await;
        let (id, e) = self
            .find(name)
            .ok_or_else(|| RuntimeError::NotFound(name.into()))?;
        Ok(Container {
            id,
            name: e.name,
            image: e.image,
            running: e.running,
            spec: e.spec,
        })
    }

    async fn list_running(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        self.enter("list_running", key)?;
        let s = self.state();
        let mut out: Vec<(String, String)> = s
            .containers
            .iter()
            .filter(|(_, e)| e.running && e.spec.create_body["Labels"][key].as_str() == Some(value))
            .map(|(id, e)| (id.clone(), e.name.clone()))
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    async fn memory_usage(&self, id: &str) -> Result<u64, RuntimeError> {
        self.enter("memory_usage", id)?;
        Ok(64 * 1024)
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        self.enter("image_exists", image)?;
        Ok(self.state().tags.contains_key(image))
    }

    async fn networks(&self) -> Result<Vec<NetworkDef>, RuntimeError> {
        self.enter("networks", "engine")?;
        Ok(self.state().networks.clone())
    }

    async fn create_network(&self, def: &NetworkDef, keep_pools: bool) -> Result<(), RuntimeError> {
        self.enter("create_network", &def.name)?;
        let mut def = def.clone();
        if !keep_pools {
            def.pools.clear();
        }
        self.state().networks.push(def);
        Ok(())
    }

    async fn connect(
        &self,
        id: &str,
        network: &str,
        endpoint: &Endpoint,
    ) -> Result<(), RuntimeError> {
        self.enter("connect", network)?;
        let mut s = self.state();
        if !s.networks.iter().any(|n| n.name == network) {
            return Err(RuntimeError::NotFound(network.into()));
        }
        s.connected
            .push((id.into(), network.into(), endpoint.clone()));
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.enter("create", &spec.name)?;
        if !self.state().tags.contains_key(&spec.image) {
            return Err(RuntimeError::Engine {
                call: "create",
                subject: spec.name.clone(),
                message: format!("no such image: {}", spec.image),
            });
        }
        if self.find(&spec.name).is_some() {
            return Err(RuntimeError::Engine {
                call: "create",
                subject: spec.name.clone(),
                message: "name in use".into(),
            });
        }
        // The engine gives the new container addresses of its own.
        let mut spec = spec.clone();
        let n = self.state().next_id + 1;
        for (i, a) in spec.networks.iter_mut().enumerate() {
            if a.network != "host" && a.network != "none" {
                a.address = Some(format!("10.88.{i}.{n}"));
            }
        }
        Ok(self.add(&spec))
    }

    async fn checkpoint(
        &self,
        id: &str,
        checkpoint: &str,
        options: CheckpointOptions,
    ) -> Result<Checkpointed, RuntimeError> {
        self.state().checkpoints.push(options);
        let after_stopping = self.state().fail_after_stopping;
        if !after_stopping {
            self.enter("checkpoint", id)?;
        } else {
            self.state().calls.push("checkpoint");
        }
        let (_, e) = self
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        if !e.running {
            return Err(injected("checkpoint", "a stopped container"));
        }
        let dir = self.dir(id, checkpoint);
        std::fs::create_dir_all(&dir)?;
        // A few image files, one of them large enough for several frames.
        let n = {
            let mut s = self.state();
            s.dumps += 1;
            s.dumps - 1
        };
        std::fs::write(dir.join("pages-1.img"), fake_pages(n))?;
        std::fs::write(dir.join("inventory.img"), format!("{}\n", e.name))?;
        self.set_running(id, false)?;
        // The engine applies the restart policy when the process ends.
        self.entry_mut(id, |e| {
            if restarts(&e.policy) {
                e.running = true;
                e.restarts += 1;
            }
        })?;
        if after_stopping {
            return Err(injected("checkpoint", id));
        }
        Ok(Checkpointed {
            dir,
            via: CheckpointVia::Runc,
        })
    }

    async fn tcp_state(&self, id: &str) -> Result<TcpState, RuntimeError> {
        self.enter("tcp_state", id)?;
        Ok(self.state().tcp.clone())
    }

    async fn dump_running(
        &self,
        id: &str,
        _name: &str,
        images: &Path,
        options: CheckpointOptions,
    ) -> Result<(), RuntimeError> {
        if !self.state().dumps_running {
            return Err(RuntimeError::Unsupported(
                "this engine cannot dump a running container".into(),
            ));
        }
        self.enter("dump_running", id)?;
        self.state().checkpoints.push(options);
        let (_, e) = self
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        if !e.running {
            return Err(injected("dump_running", "a stopped container"));
        }
        let n = {
            let mut s = self.state();
            s.dumps += 1;
            s.dumps - 1
        };
        std::fs::create_dir_all(images)?;
        std::fs::write(images.join("pages-1.img"), fake_pages(n))?;
        std::fs::write(images.join("inventory.img"), format!("{}\n", e.name))?;
        Ok(())
    }

    async fn checkpoint_dir(&self, id: &str, checkpoint: &str) -> Result<PathBuf, RuntimeError> {
        self.enter("checkpoint_dir", id)?;
        Ok(self.dir(id, checkpoint))
    }

    async fn restore(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        self.enter("restore", id)?;
        self.state().restored_pages =
            std::fs::read(self.dir(id, checkpoint).join("pages-1.img")).ok();
        self.stall("restore").await;
        if self.entry_mut(id, |e| e.running)? {
            return Err(RuntimeError::Engine {
                call: "restore",
                subject: id.into(),
                message: "container is already running".into(),
            });
        }
        if self.dir(id, checkpoint).join(STATE_DIR).exists() {
            return Err(RuntimeError::Engine {
                call: "restore",
                subject: id.into(),
                message: format!("{STATE_DIR} left in the checkpoint images"),
            });
        }
        let images = self.dir(id, checkpoint).join("pages-1.img");
        if !images.is_file() {
            return Err(RuntimeError::Engine {
                call: "restore",
                subject: id.into(),
                message: format!("no checkpoint images at {}", images.display()),
            });
        }
        self.set_running(id, true)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.enter("remove", id)?;
        self.state()
            .containers
            .remove(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        let _ = std::fs::remove_dir_all(self.root.join("containers").join(id));
        Ok(())
    }

    async fn delete_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        self.enter("delete_checkpoint", id)?;
        std::fs::remove_dir_all(self.dir(id, checkpoint))?;
        Ok(())
    }
}

impl StateEngine for FakeEngine {
    async fn survey(&self, container: &str, _: BindMounts) -> Result<StatePlan, StateError> {
        self.enter("survey", container)?;
        let (_, e) = self
            .find(container)
            .ok_or_else(|| RuntimeError::NotFound(container.into()))?;
        let s = self.state();
        let id = s.tags.get(&e.image).cloned().unwrap_or_default();
        let diff_ids = s.images.get(&id).cloned().unwrap_or_default();
        Ok(StatePlan {
            image: ImageRef {
                id,
                reference: e.image.clone(),
                size: (diff_ids.len() * LAYER_BYTES) as u64,
                diff_ids,
            },
            volumes: e.volumes.clone(),
            restart_policy: e.policy.clone(),
        })
    }

    async fn estimate_state_bytes(&self, id: &str, plan: &StatePlan) -> Result<u64, StateError> {
        self.enter("estimate_state_bytes", id)?;
        let files = self.entry_mut(id, |e| e.files.values().map(String::len).sum::<usize>())?;
        let s = self.state();
        let volumes: usize = plan
            .volumes
            .iter()
            .filter_map(|v| s.volumes.get(&v.name))
            .map(String::len)
            .sum();
        Ok((files + volumes) as u64 + 1024)
    }

    async fn pause_restart_policy(&self, id: &str) -> Result<RestartPolicy, StateError> {
        self.enter("pause_restart_policy", id)?;
        self.stall("pause_restart_policy").await;
        Ok(self.entry_mut(id, |e| std::mem::replace(&mut e.policy, no_restart()))?)
    }

    async fn set_restart_policy(&self, id: &str, policy: &RestartPolicy) -> Result<(), StateError> {
        self.enter("set_restart_policy", id)?;
        Ok(self.entry_mut(id, |e| e.policy = policy.clone())?)
    }

    async fn pack_state(
        &self,
        id: &str,
        plan: &StatePlan,
        checkpoint_dir: &Path,
    ) -> Result<PackReport, StateError> {
        self.enter("pack_state", id)?;
        let files = self.entry_mut(id, |e| e.files.clone())?;
        let dir = checkpoint_dir.join(STATE_DIR);
        std::fs::create_dir_all(dir.join(super::state::VOLUMES_DIR))
            .map_err(io_err(&dir, "creating"))?;
        let rootfs = serde_json::to_vec(&files).unwrap_or_default();
        let path = dir.join(ROOTFS_TAR);
        std::fs::write(&path, &rootfs).map_err(io_err(&path, "writing"))?;
        let mut report = PackReport {
            rootfs: PackStats {
                files: files.len() as u64,
                tar_bytes: rootfs.len() as u64,
                ..PackStats::default()
            },
            volumes: Vec::new(),
            elapsed: Duration::ZERO,
        };
        for v in plan.volumes.iter().filter(|v| v.copy) {
            let contents = self.volume(&v.name).unwrap_or_default();
            let path = volume_tar(&dir, &v.name);
            std::fs::write(&path, &contents).map_err(io_err(&path, "writing"))?;
            let stats = PackStats {
                tar_bytes: contents.len() as u64,
                ..PackStats::default()
            };
            report.volumes.push((v.name.clone(), stats));
        }
        Ok(report)
    }

    async fn missing_image(&self, image: &ImageRef) -> Result<Option<HashSet<String>>, StateError> {
        self.enter("missing_image", &image.id)?;
        let s = self.state();
        if s.images.contains_key(&image.id) {
            return Ok(None);
        }
        let wanted: HashSet<String> = chain_ids(&image.diff_ids).into_iter().collect();
        Ok(Some(
            s.images
                .values()
                .flat_map(|layers| chain_ids(layers))
                .filter(|c| wanted.contains(c))
                .collect(),
        ))
    }

    async fn export_image(
        &self,
        image: &ImageRef,
        have: &HashSet<String>,
        out: &Path,
    ) -> Result<ImageExport, StateError> {
        self.enter("export_image", &image.id)?;
        let leave_out = layers_to_leave_out(&image.diff_ids, have);
        let sent: Vec<&String> = image
            .diff_ids
            .iter()
            .filter(|d| !leave_out.contains(*d))
            .collect();
        // The image's identity, then a layer's weight of incompressible
        // bytes per layer sent.
        let mut tar = serde_json::to_vec(image).unwrap_or_default();
        tar.push(b'\n');
        for (i, _) in sent.iter().enumerate() {
            tar.extend(crate::stream::testutil::noise(LAYER_BYTES, i as u64 + 1));
        }
        std::fs::write(out, &tar).map_err(io_err(out, "writing"))?;
        Ok(ImageExport {
            tar_bytes: tar.len() as u64,
            layers_sent: sent.len() as u64,
            layers_left_out: leave_out.len() as u64,
            bytes_left_out: (leave_out.len() * LAYER_BYTES) as u64,
        })
    }

    async fn load_image(&self, image: &ImageRef, tar: &Path) -> Result<(), StateError> {
        self.enter("load_image", &image.id)?;
        let data = std::fs::read(tar).map_err(io_err(tar, "reading"))?;
        let head = data.split(|b| *b == b'\n').next().unwrap_or_default();
        let sent: ImageRef = serde_json::from_slice(head).map_err(|e| StateError::Image {
            image: image.id.clone(),
            reason: format!("not an export: {e}"),
        })?;
        if sent.id != image.id {
            return Err(StateError::Image {
                image: image.id.clone(),
                reason: format!("the tar holds {}", sent.id),
            });
        }
        self.state()
            .images
            .insert(image.id.clone(), image.diff_ids.clone());
        Ok(())
    }

    async fn tag_image(&self, image: &ImageRef) -> Result<(), StateError> {
        self.enter("tag_image", &image.reference)?;
        let mut s = self.state();
        if !s.images.contains_key(&image.id) {
            return Err(StateError::Image {
                image: image.id.clone(),
                reason: "no such image to tag".into(),
            });
        }
        s.tags.insert(image.reference.clone(), image.id.clone());
        Ok(())
    }

    async fn create_volumes(&self, volumes: &[VolumeSpec]) -> Result<Vec<String>, StateError> {
        self.enter("create_volumes", "volumes")?;
        let mut s = self.state();
        if let Some(v) = volumes.iter().find(|v| s.volumes.contains_key(&v.name)) {
            return Err(StateError::VolumeExists(v.name.clone()));
        }
        for v in volumes {
            s.volumes.insert(v.name.clone(), String::new());
        }
        Ok(volumes.iter().map(|v| v.name.clone()).collect())
    }

    async fn apply_state(
        &self,
        id: &str,
        plan: &StatePlan,
        staging: &Path,
    ) -> Result<ApplyReport, StateError> {
        self.enter("apply_state", id)?;
        let dir = staging.join(STATE_DIR);
        let path = dir.join(ROOTFS_TAR);
        let rootfs = std::fs::read(&path).map_err(io_err(&path, "reading"))?;
        let files: BTreeMap<String, String> =
            serde_json::from_slice(&rootfs).map_err(|e| StateError::Archive(e.to_string()))?;
        let count = files.len() as u64;
        self.entry_mut(id, |e| e.files = files)?;
        let mut report = ApplyReport {
            rootfs: ApplyStats {
                files: count,
                ..ApplyStats::default()
            },
            ..ApplyReport::default()
        };
        for v in plan.volumes.iter().filter(|v| v.copy) {
            let path = volume_tar(&dir, &v.name);
            let contents = std::fs::read_to_string(&path).map_err(io_err(&path, "reading"))?;
            let stats = ApplyStats {
                file_bytes: contents.len() as u64,
                ..ApplyStats::default()
            };
            self.state().volumes.insert(v.name.clone(), contents);
            report.volumes.push((v.name.clone(), stats));
        }
        discard_state(staging)?;
        Ok(report)
    }

    async fn remove_volumes(&self, names: &[String]) -> Result<(), StateError> {
        self.enter("remove_volumes", "volumes")?;
        let mut s = self.state();
        for n in names {
            s.volumes.remove(n);
        }
        Ok(())
    }

    async fn remove_unused_volumes(
        &self,
        volumes: &[VolumeSpec],
    ) -> Result<Vec<String>, StateError> {
        self.enter("remove_unused_volumes", "volumes")?;
        let mut s = self.state();
        let mut removed = Vec::new();
        for v in volumes {
            let used = s
                .containers
                .values()
                .any(|e| e.volumes.iter().any(|m| m.name == v.name));
            if !used && s.volumes.remove(&v.name).is_some() {
                removed.push(v.name.clone());
            }
        }
        Ok(removed)
    }
}
