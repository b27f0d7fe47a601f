//! A recording fake [`Engine`] for unit tests of the migration drivers: it
//! keeps containers and checkpoint folders in memory and in a temp dir,
//! records every call, fails a call on request and runs a hook on each call
//! (for a cancel at an exact moment). Never used outside `cargo test`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::networks::{Endpoint, NetworkDef};
use super::{
    CheckpointOptions, CheckpointVia, Checkpointed, Container, ContainerSpec, Engine, EngineInfo,
    RuntimeError, TcpState,
};

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    image: String,
    running: bool,
    spec: ContainerSpec,
}

type Hook = Box<dyn Fn(&'static str) + Send + Sync>;

#[derive(Default)]
struct State {
    containers: HashMap<String, Entry>,
    images: HashSet<String>,
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
}

pub struct FakeEngine {
    root: PathBuf,
    arch: String,
    state: Mutex<State>,
    hook: Mutex<Option<Hook>>,
}

impl FakeEngine {
    /// An engine whose state lives under `root`, with `images` present.
    pub fn new(root: &Path, images: &[&str]) -> Self {
        let builtin = ["bridge", "host", "none"].map(|n| NetworkDef {
            name: n.into(),
            driver: n.into(),
            ..NetworkDef::default()
        });
        let state = State {
            images: images.iter().map(|s| s.to_string()).collect(),
            networks: builtin.to_vec(),
            ..State::default()
        };
        FakeEngine {
            root: root.to_path_buf(),
            arch: "x86_64".into(),
            state: Mutex::new(state),
            hook: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A running container, as `docker run` would leave it; returns its id.
    pub fn run(&self, name: &str, image: &str) -> String {
        let spec = ContainerSpec {
            name: name.into(),
            image: image.into(),
            create_body: serde_json::json!({ "Image": image }),
            networks: Vec::new(),
        };
        let id = self.add(&spec);
        self.state().containers.get_mut(&id).unwrap().running = true;
        id
    }

    fn add(&self, spec: &ContainerSpec) -> String {
        let mut s = self.state();
        s.next_id += 1;
        // Like Docker's: 64 hex digits, unrelated to the name.
        let id = format!("{:064x}", 0xfe00 + s.next_id);
        s.containers.insert(
            id.clone(),
            Entry {
                name: spec.name.clone(),
                image: spec.image.clone(),
                running: false,
                spec: spec.clone(),
            },
        );
        id
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

    async fn memory_usage(&self, id: &str) -> Result<u64, RuntimeError> {
        self.enter("memory_usage", id)?;
        Ok(64 * 1024)
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        self.enter("image_exists", image)?;
        Ok(self.state().images.contains(image))
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
        std::fs::write(dir.join("pages-1.img"), vec![0x5a; 600 * 1024])?;
        std::fs::write(dir.join("inventory.img"), format!("{}\n", e.name))?;
        self.set_running(id, false)?;
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

    async fn checkpoint_dir(&self, id: &str, checkpoint: &str) -> Result<PathBuf, RuntimeError> {
        self.enter("checkpoint_dir", id)?;
        Ok(self.dir(id, checkpoint))
    }

    async fn restore(&self, id: &str, checkpoint: &str) -> Result<(), RuntimeError> {
        self.enter("restore", id)?;
        self.stall("restore").await;
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
