//! Networks as on a device. The source records the networks its container
//! is attached to ([`attachments`]: aliases, fixed addresses, and each
//! user-defined network's definition); the target turns that and its own
//! situation into a [`CreatePlan`] ([`plan`], pure): which networks to
//! create, the create body (the first network with its aliases, published
//! ports bound on the target's address), and the other networks to connect
//! before the restore. [`create_placed`] carries the plan out on any
//! [`Engine`].
//!
//! - The default bridge, `host` and `none` exist on every node: nothing is
//!   created; on the bridge the container gets an address of the target's
//!   own bridge.
//! - A user-defined network missing on the target is created with the same
//!   driver, options, labels and flags; its IPAM subnets too, unless one of
//!   them overlaps a network of the target's engine or a route of the target
//!   host: then the engine picks the subnet and the plan says so.
//! - A published port whose `HostIp` is the source node's own address (the
//!   IP of its data address) is bound on the target's; other host IPs
//!   (`0.0.0.0`, empty, loopback) are kept.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use bollard::models::{
    ContainerInspectResponse, EndpointIpamConfig, EndpointSettings, Ipam, IpamConfig, Network,
    NetworkConnectRequest, NetworkCreateRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::docker::engine_err;
use super::{ContainerSpec, Docker, Engine, RuntimeError};

/// Networks every engine has; never created nor given aliases.
const BUILTIN: [&str; 3] = ["bridge", "host", "none"];

/// A user-defined network as the target creates it when it is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDef {
    pub name: String,
    pub driver: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub enable_ipv6: bool,
    #[serde(default)]
    pub ipam_driver: Option<String>,
    #[serde(default)]
    pub ipam_options: BTreeMap<String, String>,
    #[serde(default)]
    pub pools: Vec<Pool>,
}

/// One IPAM pool of a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub subnet: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub ip_range: Option<String>,
}

/// One network a container is attached to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    /// The aliases the user gave (not the ones the engine adds itself: the
    /// short container id and the hostname).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Addresses the user fixed (`--ip`, `--ip6`).
    #[serde(default)]
    pub ipv4: Option<String>,
    #[serde(default)]
    pub ipv6: Option<String>,
    /// The address the container has there, for the job status.
    #[serde(default)]
    pub address: Option<String>,
    /// For a user-defined network: how to create it.
    #[serde(default)]
    pub definition: Option<NetworkDef>,
}

/// What to connect a container with, on one network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub aliases: Vec<String>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
}

impl Endpoint {
    fn settings(&self) -> EndpointSettings {
        let ipam = (self.ipv4.is_some() || self.ipv6.is_some()).then(|| EndpointIpamConfig {
            ipv4_address: self.ipv4.clone(),
            ipv6_address: self.ipv6.clone(),
            ..Default::default()
        });
        EndpointSettings {
            aliases: (!self.aliases.is_empty()).then(|| self.aliases.clone()),
            ipam_config: ipam,
            ..Default::default()
        }
    }
}

fn is_builtin(network: &str) -> bool {
    BUILTIN.contains(&network)
}

impl NetworkDef {
    /// A network as the engine's inspect output describes it.
    pub fn of(n: &Network) -> NetworkDef {
        let ipam = n.ipam.clone().unwrap_or_default();
        let sorted = |m: &Option<HashMap<String, String>>| {
            m.iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        NetworkDef {
            name: n.name.clone().unwrap_or_default(),
            driver: n.driver.clone().unwrap_or_else(|| "bridge".into()),
            options: sorted(&n.options),
            labels: sorted(&n.labels),
            internal: n.internal.unwrap_or(false),
            attachable: n.attachable.unwrap_or(false),
            enable_ipv6: n.enable_ipv6.unwrap_or(false),
            ipam_driver: ipam.driver.filter(|d| !d.is_empty()),
            ipam_options: sorted(&ipam.options),
            pools: ipam
                .config
                .iter()
                .flatten()
                .filter_map(|c| {
                    Some(Pool {
                        subnet: c.subnet.clone().filter(|s| !s.is_empty())?,
                        gateway: c.gateway.clone().filter(|s| !s.is_empty()),
                        ip_range: c.ip_range.clone().filter(|s| !s.is_empty()),
                    })
                })
                .collect(),
        }
    }

    /// The engine's create request; without pools when `keep_pools` is
    /// false (the engine then picks a subnet).
    fn create_request(&self, keep_pools: bool) -> NetworkCreateRequest {
        let map = |m: &BTreeMap<String, String>| {
            (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        };
        let config = keep_pools.then(|| {
            self.pools
                .iter()
                .map(|p| IpamConfig {
                    subnet: Some(p.subnet.clone()),
                    gateway: p.gateway.clone(),
                    ip_range: p.ip_range.clone(),
                    ..Default::default()
                })
                .collect()
        });
        NetworkCreateRequest {
            name: self.name.clone(),
            driver: Some(self.driver.clone()),
            internal: Some(self.internal),
            attachable: Some(self.attachable),
            enable_ipv6: Some(self.enable_ipv6),
            ipam: Some(Ipam {
                driver: self.ipam_driver.clone(),
                config,
                options: map(&self.ipam_options),
            }),
            options: map(&self.options),
            labels: map(&self.labels),
            ..Default::default()
        }
    }
}

/// The networks an inspected container is attached to, its first network
/// (`HostConfig.NetworkMode`) first; `networks` are the inspect outputs of
/// its user-defined networks.
pub fn attachments(c: &ContainerInspectResponse, networks: &[Network]) -> Vec<Attachment> {
    let short_id: String =
        c.id.as_deref()
            .unwrap_or_default()
            .chars()
            .take(12)
            .collect();
    let hostname = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.hostname.clone())
        .unwrap_or_default();
    let endpoints: BTreeMap<String, EndpointSettings> = c
        .network_settings
        .as_ref()
        .and_then(|s| s.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let first = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        .map(|mode| network_name(mode, &endpoints));
    let mut out: Vec<Attachment> = endpoints
        .iter()
        .map(|(name, ep)| {
            let ipam = ep.ipam_config.clone().unwrap_or_default();
            let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
            Attachment {
                network: name.clone(),
                aliases: ep
                    .aliases
                    .iter()
                    .flatten()
                    .filter(|a| **a != short_id && **a != hostname)
                    .cloned()
                    .collect(),
                ipv4: nonempty(&ipam.ipv4_address),
                ipv6: nonempty(&ipam.ipv6_address),
                address: nonempty(&ep.ip_address),
                definition: (!is_builtin(name))
                    .then(|| {
                        networks
                            .iter()
                            .find(|n| n.name.as_deref() == Some(name.as_str()))
                            .map(NetworkDef::of)
                    })
                    .flatten(),
            }
        })
        .collect();
    // `--network none` and `host` have an endpoint too; `container:ID` none.
    if let Some(first) = first {
        if let Some(i) = out.iter().position(|a| a.network == first) {
            let a = out.remove(i);
            out.insert(0, a);
        }
    }
    out
}

/// The network a `NetworkMode` names: `default` is the bridge, and an id
/// (or its prefix) is replaced by the network's name, which the target
/// knows where it does not know the id.
fn network_name(mode: &str, endpoints: &BTreeMap<String, EndpointSettings>) -> String {
    if mode == "default" {
        return "bridge".into();
    }
    if endpoints.contains_key(mode) {
        return mode.into();
    }
    endpoints
        .iter()
        .find(|(_, ep)| {
            ep.network_id
                .as_deref()
                .is_some_and(|id| mode.len() >= 12 && id.starts_with(mode))
        })
        .map(|(name, _)| name.clone())
        .unwrap_or_else(|| mode.into())
}

/// The container's address on each network that gave it one.
pub fn addresses(attachments: &[Attachment]) -> BTreeMap<String, String> {
    attachments
        .iter()
        .filter_map(|a| Some((a.network.clone(), a.address.clone()?)))
        .collect()
}

/// Where the container moves: what the target knows of both nodes.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The IP of the source node's data address.
    pub source_ip: Option<IpAddr>,
    /// The IP of this (the target) node's data address.
    pub target_ip: Option<IpAddr>,
    /// The networks of this node's engine.
    pub existing: Vec<NetworkDef>,
    /// Subnets this host routes (`10.1.0.0/16`), e.g. [`crate::sysinfo::ipv4_routes`].
    pub host_routes: Vec<String>,
}

impl Placement {
    /// The IP of a `host:port` data address, if it is one.
    pub fn ip_of(data_addr: Option<&str>) -> Option<IpAddr> {
        data_addr?.parse::<SocketAddr>().ok().map(|a| a.ip())
    }
}

/// What the target does to create the container.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatePlan {
    /// The spec to create, with its body rewritten.
    pub spec: ContainerSpec,
    /// Missing networks, each with whether its subnets are kept.
    pub create_networks: Vec<(NetworkDef, bool)>,
    /// Networks to connect after the create, before the restore.
    pub connect: Vec<(String, Endpoint)>,
    /// What differs from the source, for the log.
    pub notes: Vec<String>,
}

/// The plan for creating `spec` (taken on the source) at `place`.
pub fn plan(spec: &ContainerSpec, place: &Placement) -> CreatePlan {
    let mut body = spec.create_body.clone();
    let mut notes = Vec::new();
    let mut create_networks = Vec::new();
    let mut endpoints = Vec::new();
    for a in &spec.networks {
        let mut keep_addresses = true;
        let exists = place.existing.iter().any(|n| n.name == a.network);
        if let (false, Some(def)) = (exists, &a.definition) {
            let clash = def.pools.iter().find_map(|p| {
                let what = clash_of(&p.subnet, place)?;
                Some(format!("subnet {} overlaps {what}", p.subnet))
            });
            if let Some(clash) = &clash {
                notes.push(format!(
                    "network {}: {clash} here; the engine picks its subnet",
                    a.network
                ));
                keep_addresses = false;
            }
            create_networks.push((def.clone(), clash.is_none()));
        }
        let fixed = a.ipv4.is_some() || a.ipv6.is_some();
        if fixed && !keep_addresses {
            notes.push(format!(
                "network {}: the fixed address {} is dropped with its subnet",
                a.network,
                a.ipv4.as_deref().or(a.ipv6.as_deref()).unwrap_or_default()
            ));
        }
        let endpoint = Endpoint {
            // The engine refuses aliases on its built-in networks.
            aliases: if is_builtin(&a.network) {
                Vec::new()
            } else {
                a.aliases.clone()
            },
            ipv4: a.ipv4.clone().filter(|_| keep_addresses),
            ipv6: a.ipv6.clone().filter(|_| keep_addresses),
        };
        endpoints.push((a.network.clone(), endpoint));
    }
    let mut endpoints = endpoints.into_iter();
    if let (Some((first, endpoint)), Some(obj)) = (endpoints.next(), body.as_object_mut()) {
        let host = obj.entry("HostConfig").or_insert_with(|| json!({}));
        // `default` stays `default`; an id becomes the network's name.
        let mode = host.get("NetworkMode").and_then(Value::as_str);
        if !(first == "bridge" && mode == Some("default")) {
            host["NetworkMode"] = json!(first);
        }
        if endpoint != Endpoint::default() {
            let settings = serde_json::to_value(endpoint.settings()).unwrap_or(Value::Null);
            obj.insert(
                "NetworkingConfig".into(),
                json!({ "EndpointsConfig": { first: settings } }),
            );
        }
    }
    rewrite_host_ips(&mut body, place);
    CreatePlan {
        spec: ContainerSpec {
            create_body: body,
            ..spec.clone()
        },
        create_networks,
        connect: endpoints.collect(),
        notes,
    }
}

/// Publishes on the target's address what the source published on its own.
fn rewrite_host_ips(body: &mut Value, place: &Placement) {
    let (Some(from), Some(to)) = (place.source_ip, place.target_ip) else {
        return;
    };
    if from.is_unspecified() || to.is_unspecified() || from == to {
        return;
    }
    let Some(bindings) = body
        .pointer_mut("/HostConfig/PortBindings")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for binding in bindings
        .values_mut()
        .filter_map(Value::as_array_mut)
        .flatten()
    {
        let ip = binding.get("HostIp").and_then(Value::as_str);
        if ip.and_then(|s| s.parse::<IpAddr>().ok()) == Some(from) {
            binding["HostIp"] = json!(to.to_string());
        }
    }
}

/// What `subnet` overlaps on the target, if anything.
fn clash_of(subnet: &str, place: &Placement) -> Option<String> {
    let ours = Cidr::parse(subnet)?;
    for n in &place.existing {
        if let Some(p) = n
            .pools
            .iter()
            .find(|p| Cidr::parse(&p.subnet).is_some_and(|theirs| theirs.overlaps(&ours)))
        {
            return Some(format!("network {} ({})", n.name, p.subnet));
        }
    }
    place
        .host_routes
        .iter()
        .find(|r| Cidr::parse(r).is_some_and(|theirs| theirs.overlaps(&ours)))
        .map(|r| format!("the host route {r}"))
}

/// An IPv4 or IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(text: &str) -> Option<Cidr> {
        let (addr, len) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Cidr { addr, len })
    }

    /// Two prefixes overlap when they agree on the shorter one's bits.
    fn overlaps(&self, other: &Cidr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32u8),
            IpAddr::V6(v6) => (u128::from(v6), 128u8),
        };
        let ((a, fa), (b, fb)) = (bits(self.addr), bits(other.addr));
        if fa != fb {
            return false;
        }
        let len = u32::from(self.len.min(other.len));
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        a & mask == b & mask
    }
}

/// Creates the container on this node as [`plan`] says: the missing
/// networks, the container, then its other networks. A container created
/// here is removed again if connecting it fails. Returns its id and the
/// plan's notes.
pub async fn create_placed<E: Engine>(
    engine: &E,
    spec: &ContainerSpec,
    mut place: Placement,
) -> Result<(String, Vec<String>), RuntimeError> {
    if spec.networks.iter().any(|a| a.definition.is_some()) {
        place.existing = engine.networks().await?;
    }
    let plan = plan(spec, &place);
    for (def, keep_pools) in &plan.create_networks {
        engine.create_network(def, *keep_pools).await?;
    }
    let id = engine.create(&plan.spec).await?;
    for (network, endpoint) in &plan.connect {
        if let Err(e) = engine.connect(&id, network, endpoint).await {
            let _ = engine.remove(&id).await;
            return Err(e);
        }
    }
    Ok((id, plan.notes))
}

impl Docker {
    /// The inspect output of the user-defined networks `c` is attached to.
    pub(super) async fn attached_networks(
        &self,
        c: &ContainerInspectResponse,
    ) -> Result<Vec<Network>, RuntimeError> {
        let names: Vec<String> = c
            .network_settings
            .as_ref()
            .and_then(|s| s.networks.as_ref())
            .map(|n| n.keys().filter(|k| !is_builtin(k)).cloned().collect())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let n = self
                .api()
                .inspect_network(&name, None)
                .await
                .map_err(engine_err("inspect network", &name))?;
            // The same engine JSON; `Network` is the type the list returns.
            let n = serde_json::to_value(n)
                .and_then(serde_json::from_value)
                .map_err(|e| RuntimeError::Engine {
                    call: "inspect network",
                    subject: name.clone(),
                    message: e.to_string(),
                })?;
            out.push(n);
        }
        Ok(out)
    }

    pub(super) async fn list_networks(&self) -> Result<Vec<NetworkDef>, RuntimeError> {
        let all = self
            .api()
            .list_networks(None)
            .await
            .map_err(engine_err("list networks", "engine"))?;
        Ok(all.iter().map(NetworkDef::of).collect())
    }

    pub(super) async fn create_network_like(
        &self,
        def: &NetworkDef,
        keep_pools: bool,
    ) -> Result<(), RuntimeError> {
        self.api()
            .create_network(def.create_request(keep_pools))
            .await
            .map_err(engine_err("create network", &def.name))?;
        Ok(())
    }

    pub(super) async fn connect_network(
        &self,
        id: &str,
        network: &str,
        endpoint: &Endpoint,
    ) -> Result<(), RuntimeError> {
        let request = NetworkConnectRequest {
            container: id.to_string(),
            endpoint_config: Some(endpoint.settings()),
        };
        self.api()
            .connect_network(network, request)
            .await
            .map_err(engine_err("connect network", network))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker inspect` and `docker network inspect` output taken on a bed
    /// node (Docker 20.10): `fx-bridge` on the default bridge publishing
    /// 80 on the node's address and 81 on all; `fx-user` on `fxnet`
    /// (10.200.60.0/24, aliases web and www, label, mtu) and `fxnet2`
    /// (engine-picked subnet, alias second-alias), publishing 80 on the
    /// node's address; `fx-host` and `fx-none`.
    fn fixture(name: &str) -> Value {
        let text = match name {
            "fx-bridge" => include_str!("testdata/fx-bridge.json"),
            "fx-user" => include_str!("testdata/fx-user.json"),
            "fx-host" => include_str!("testdata/fx-host.json"),
            "fx-none" => include_str!("testdata/fx-none.json"),
            "networks" => include_str!("testdata/networks.json"),
            _ => unreachable!(),
        };
        serde_json::from_str(text).unwrap()
    }

    const NODE1: &str = "127.0.0.11";
    const NODE2: &str = "127.0.0.12";

    /// The spec the source's inspect makes of a fixture.
    fn spec_of(name: &str) -> ContainerSpec {
        let v = fixture(name);
        let c: ContainerInspectResponse = serde_json::from_value(v.clone()).unwrap();
        let networks: Vec<Network> = serde_json::from_value(fixture("networks")).unwrap();
        let mut body = v["Config"].clone();
        body["HostConfig"] = v["HostConfig"].clone();
        ContainerSpec {
            name: name.into(),
            image: v["Config"]["Image"].as_str().unwrap().into(),
            create_body: body,
            networks: attachments(&c, &networks),
        }
    }

    fn node2(existing: Vec<NetworkDef>, routes: &[&str]) -> Placement {
        Placement {
            source_ip: NODE1.parse().ok(),
            target_ip: NODE2.parse().ok(),
            existing,
            host_routes: routes.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The target's engine as the bed's node2 has it: its default bridge.
    fn bridge_only() -> Vec<NetworkDef> {
        let networks: Vec<Network> = serde_json::from_value(fixture("networks")).unwrap();
        networks
            .iter()
            .filter(|n| n.name.as_deref() == Some("bridge"))
            .map(|n| NetworkDef {
                pools: vec![Pool {
                    subnet: "10.200.2.0/24".into(),
                    gateway: None,
                    ip_range: None,
                }],
                ..NetworkDef::of(n)
            })
            .collect()
    }

    #[test]
    fn the_source_records_networks_aliases_and_addresses() {
        let spec = spec_of("fx-user");
        let names: Vec<&str> = spec.networks.iter().map(|a| a.network.as_str()).collect();
        assert_eq!(names, ["fxnet", "fxnet2"], "the first network first");
        let fxnet = &spec.networks[0];
        // The engine's own aliases (short id, hostname) are left out.
        assert_eq!(fxnet.aliases, ["web", "www"]);
        assert_eq!(spec.networks[1].aliases, ["second-alias"]);
        assert_eq!(fxnet.ipv4, None);
        let def = fxnet.definition.as_ref().unwrap();
        assert_eq!(def.driver, "bridge");
        assert_eq!(def.labels["purpose"], "ferry-fixture");
        assert_eq!(def.options["com.docker.network.driver.mtu"], "1400");
        assert_eq!(def.pools[0].subnet, "10.200.60.0/24");
        assert_eq!(def.pools[0].gateway.as_deref(), Some("10.200.60.1"));
        assert_eq!(
            addresses(&spec.networks),
            BTreeMap::from([
                ("fxnet".to_string(), "10.200.60.2".to_string()),
                ("fxnet2".to_string(), "172.17.0.2".to_string()),
            ])
        );

        let bridge = spec_of("fx-bridge");
        assert_eq!(bridge.networks.len(), 1);
        assert_eq!(bridge.networks[0].network, "bridge");
        assert_eq!(bridge.networks[0].definition, None);
        assert_eq!(
            bridge.networks[0].address.as_deref(),
            Some("10.200.1.2"),
            "the source bridge's address"
        );
        for (name, network) in [("fx-host", "host"), ("fx-none", "none")] {
            let s = spec_of(name);
            assert_eq!(s.networks.len(), 1, "{name}");
            assert_eq!(s.networks[0].network, network);
            assert!(addresses(&s.networks).is_empty(), "{name}");
        }
    }

    #[test]
    fn a_bridge_container_binds_its_ports_on_the_target_address() {
        let spec = spec_of("fx-bridge");
        let p = plan(&spec, &node2(bridge_only(), &[]));
        assert!(p.create_networks.is_empty());
        assert!(p.connect.is_empty());
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        let host = &p.spec.create_body["HostConfig"];
        assert_eq!(host["NetworkMode"], "default");
        assert_eq!(
            host["PortBindings"],
            json!({
                "80/tcp": [{"HostIp": NODE2, "HostPort": "18080"}],
                "81/tcp": [{"HostIp": "", "HostPort": "18081"}],
            })
        );
        assert_eq!(p.spec.create_body.get("NetworkingConfig"), None);
        // Everything else in the body is the source's.
        let mut back = p.spec.create_body.clone();
        back["HostConfig"]["PortBindings"]["80/tcp"][0]["HostIp"] = json!(NODE1);
        assert_eq!(back, spec.create_body);
        // The engine's body type takes it.
        let _: bollard::models::ContainerCreateBody =
            serde_json::from_value(p.spec.create_body).unwrap();
    }

    #[test]
    fn host_ips_other_than_the_source_address_are_kept() {
        let spec = spec_of("fx-bridge");
        for (from, to) in [
            (Some("127.0.0.99"), Some(NODE2)),
            (Some(NODE1), None),
            (None, Some(NODE2)),
            (Some("0.0.0.0"), Some(NODE2)),
        ] {
            let place = Placement {
                source_ip: from.and_then(|s| s.parse().ok()),
                target_ip: to.and_then(|s| s.parse().ok()),
                ..Placement::default()
            };
            let p = plan(&spec, &place);
            assert_eq!(
                p.spec.create_body["HostConfig"]["PortBindings"],
                spec.create_body["HostConfig"]["PortBindings"],
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn missing_user_networks_are_created_alike_and_aliases_kept() {
        let spec = spec_of("fx-user");
        let p = plan(&spec, &node2(bridge_only(), &["10.200.2.0/24"]));
        let created: Vec<(&str, bool)> = p
            .create_networks
            .iter()
            .map(|(d, keep)| (d.name.as_str(), *keep))
            .collect();
        // fxnet2's 172.17.0.0/16 is free here too.
        assert_eq!(created, [("fxnet", true), ("fxnet2", true)]);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        let request = p.create_networks[0].0.create_request(true);
        let request = serde_json::to_value(&request).unwrap();
        assert_eq!(request["Driver"], "bridge");
        assert_eq!(request["Labels"], json!({"purpose": "ferry-fixture"}));
        assert_eq!(
            request["Options"]["com.docker.network.driver.mtu"],
            json!("1400")
        );
        assert_eq!(
            request["IPAM"]["Config"],
            json!([{"Subnet": "10.200.60.0/24", "Gateway": "10.200.60.1"}])
        );
        let body = &p.spec.create_body;
        assert_eq!(body["HostConfig"]["NetworkMode"], "fxnet");
        assert_eq!(
            body["NetworkingConfig"],
            json!({"EndpointsConfig": {"fxnet": {"Aliases": ["web", "www"]}}})
        );
        assert_eq!(
            body["HostConfig"]["PortBindings"]["80/tcp"][0]["HostIp"],
            NODE2
        );
        assert_eq!(
            p.connect,
            [(
                "fxnet2".to_string(),
                Endpoint {
                    aliases: vec!["second-alias".into()],
                    ..Endpoint::default()
                }
            )]
        );
        let _: bollard::models::ContainerCreateBody = serde_json::from_value(body.clone()).unwrap();
    }

    #[test]
    fn a_clashing_subnet_is_left_to_the_engine_and_said() {
        let spec = spec_of("fx-user");
        // On a bed the source's bridge for fxnet is a route of the same host.
        let p = plan(&spec, &node2(bridge_only(), &["10.200.60.0/24"]));
        assert!(!p.create_networks[0].1, "fxnet's subnet dropped");
        assert!(p.create_networks[1].1);
        assert_eq!(
            p.notes,
            ["network fxnet: subnet 10.200.60.0/24 overlaps the host route 10.200.60.0/24 here; the engine picks its subnet"]
        );
        let request = serde_json::to_value(p.create_networks[0].0.create_request(false)).unwrap();
        assert_eq!(request["IPAM"].get("Config"), None);
        assert_eq!(request["Labels"], json!({"purpose": "ferry-fixture"}));

        // A network of the target's engine counts too, by overlap.
        let mut existing = bridge_only();
        existing.push(NetworkDef {
            name: "lan".into(),
            pools: vec![Pool {
                subnet: "10.200.0.0/16".into(),
                gateway: None,
                ip_range: None,
            }],
            ..NetworkDef::default()
        });
        let p = plan(&spec, &node2(existing, &[]));
        assert_eq!(
            p.notes,
            ["network fxnet: subnet 10.200.60.0/24 overlaps network lan (10.200.0.0/16) here; the engine picks its subnet"]
        );
    }

    #[test]
    fn an_existing_network_is_used_as_it_is() {
        let spec = spec_of("fx-user");
        let mut existing = bridge_only();
        existing.push(NetworkDef {
            name: "fxnet".into(),
            ..NetworkDef::default()
        });
        let p = plan(&spec, &node2(existing, &["10.200.60.0/24"]));
        let created: Vec<&str> = p
            .create_networks
            .iter()
            .map(|(d, _)| d.name.as_str())
            .collect();
        assert_eq!(created, ["fxnet2"]);
        assert!(p.notes.is_empty());
    }

    #[test]
    fn a_fixed_address_goes_with_its_subnet() {
        let mut spec = spec_of("fx-user");
        spec.networks[0].ipv4 = Some("10.200.60.9".into());
        let p = plan(&spec, &node2(bridge_only(), &[]));
        assert_eq!(
            p.spec.create_body["NetworkingConfig"]["EndpointsConfig"]["fxnet"]["IPAMConfig"],
            json!({"IPv4Address": "10.200.60.9"})
        );
        let p = plan(&spec, &node2(bridge_only(), &["10.200.60.0/24"]));
        assert_eq!(
            p.spec.create_body["NetworkingConfig"]["EndpointsConfig"]["fxnet"].get("IPAMConfig"),
            None
        );
        assert!(
            p.notes[1].contains("fixed address 10.200.60.9 is dropped"),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn host_and_none_keep_their_mode() {
        for (name, mode) in [("fx-host", "host"), ("fx-none", "none")] {
            let spec = spec_of(name);
            let p = plan(&spec, &node2(bridge_only(), &[]));
            assert_eq!(p.spec.create_body["HostConfig"]["NetworkMode"], mode);
            assert_eq!(p.spec.create_body.get("NetworkingConfig"), None, "{name}");
            assert!(p.create_networks.is_empty() && p.connect.is_empty());
        }
    }

    #[test]
    fn a_network_given_by_id_is_created_by_name() {
        let mut v = fixture("fx-user");
        v["HostConfig"]["NetworkMode"] = json!("7b29c5b8cf12");
        let c: ContainerInspectResponse = serde_json::from_value(v).unwrap();
        let networks: Vec<Network> = serde_json::from_value(fixture("networks")).unwrap();
        let a = attachments(&c, &networks);
        assert_eq!(a[0].network, "fxnet");
    }

    #[test]
    fn prefixes_overlap_by_their_common_bits() {
        let c = |s| Cidr::parse(s).unwrap();
        assert!(c("10.200.60.0/24").overlaps(&c("10.200.0.0/16")));
        assert!(c("10.200.0.0/16").overlaps(&c("10.200.60.0/24")));
        assert!(!c("10.200.60.0/24").overlaps(&c("10.200.61.0/24")));
        assert!(c("172.17.0.0/16").overlaps(&c("0.0.0.0/0")));
        assert!(!c("fd00::/64").overlaps(&c("10.0.0.0/8")));
        assert!(c("fd00::/8").overlaps(&c("fd00:1::/64")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "fd00::/129"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }
}
