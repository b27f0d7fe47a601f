//! Every yes/no decision about whether a migration may start, as pure
//! functions over what the drivers looked up: the one compatibility check
//! (engine arch, page size, CRIU) that the agent's early job check, the
//! source's precheck and the target's precheck all call; whether a source
//! is ready to send; whether a `Prepare` and a stream belong to the peer
//! that sent them; whether there is room.

use std::path::Path;

use super::protocol::Prepare;
use crate::mqtt::contract::{validate_id, ContractError, NodeStatus};
use crate::runtime::{Container, RuntimeError};
use crate::stream::wire::TransferHeader;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("container {container} not found on {node}")]
    NotFound { container: String, node: String },
    #[error("container {container} is not running on {node}")]
    NotRunning { container: String, node: String },
    #[error("cannot inspect container {container}: {source}")]
    Inspect {
        container: String,
        source: Box<RuntimeError>,
    },
    #[error("CRIU does not work on {node}: {why}")]
    Criu { node: String, why: String },
    #[error(
        "CRIU {criu} on {node} cannot dump TCP or UDP sockets on its kernel {kernel}: \
         kernels from {min_kernel} on allow SO_PASSCRED/SO_PASSSEC only on unix and netlink \
         sockets, which CRIU handles from {min_criu} on (CRIU issues 2705, 2718); install CRIU >= {min_criu}",
        min_kernel = crate::sysinfo::SOCKET_OPTS_KERNEL,
        min_criu = crate::sysinfo::SOCKET_OPTS_CRIU
    )]
    CriuSockets {
        node: String,
        criu: String,
        kernel: String,
    },
    #[error("target node {node} is unknown (no status seen)")]
    PeerUnknown { node: String },
    #[error("target node {node} is offline")]
    PeerOffline { node: String },
    #[error("target node {node} advertises no data address")]
    NoDataAddress { node: String },
    #[error("engine arch differs: source {source_node} runs {source_arch}, target {target_node} runs {target_arch}")]
    Arch {
        source_node: String,
        source_arch: String,
        target_node: String,
        target_arch: String,
    },
    #[error("kernel page size differs: source {source_node} has {source_size}, target {target_node} has {target_size}")]
    PageSize {
        source_node: String,
        source_size: u64,
        target_node: String,
        target_size: u64,
    },
    #[error("{node} has {free} bytes free in its {what} {dir} for a checkpoint of about {estimate} bytes")]
    NoRoom {
        node: String,
        what: &'static str,
        dir: String,
        free: u64,
        estimate: u64,
    },
    #[error("{node} offers {free} bytes of memory for a container using {need} bytes")]
    NoMemory { node: String, free: u64, need: u64 },
    #[error("{node} has {free} bytes free for staging a checkpoint of about {need} bytes")]
    NoStaging { node: String, free: u64, need: u64 },
    #[error("no candidate node fits: {}", describe_excluded(.excluded))]
    NoPlace {
        excluded: std::collections::BTreeMap<String, String>,
    },
    #[error(transparent)]
    InvalidId(#[from] ContractError),
    #[error("job is for node {target_node}, this is {node}")]
    WrongNode { target_node: String, node: String },
    #[error("peer certificate names {names:?}, not the job's source node {source_node}")]
    PeerNotSource {
        names: Vec<String>,
        source_node: String,
    },
    #[error("checkpoint name {checkpoint:?} does not belong to job {job_id}")]
    CheckpointName { checkpoint: String, job_id: String },
    #[error("image {image} is not present on {node}")]
    ImageMissing { image: String, node: String },
    #[error("cannot check image {image} on {node}: {source}")]
    ImageCheck {
        image: String,
        node: String,
        source: Box<RuntimeError>,
    },
    #[error("a container named {name} already exists on {node}")]
    NameTaken { name: String, node: String },
    #[error("cannot check for container {name} on {node}: {source}")]
    NameCheck {
        name: String,
        node: String,
        source: Box<RuntimeError>,
    },
    #[error("container {container}: {refusal}")]
    Tcp {
        container: String,
        refusal: crate::runtime::sockets::TcpRefusal,
    },
    #[error("{node} does not allow this container: {refusal}")]
    NotAllowed {
        node: String,
        refusal: crate::runtime::mounts::MountRefusal,
    },
    #[error("stream for job {job_id} from {source_node} does not match the prepared job {expected_job} from {expected_source}")]
    StreamMismatch {
        job_id: String,
        source_node: String,
        expected_job: String,
        expected_source: String,
    },
}

fn describe_excluded(excluded: &std::collections::BTreeMap<String, String>) -> String {
    if excluded.is_empty() {
        return "no other node is known".into();
    }
    excluded
        .iter()
        .map(|(node, why)| format!("{node}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What decides whether a checkpoint taken on one node restores on another.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub node: &'a str,
    /// The engine's architecture: what containers run as.
    pub arch: &'a str,
    pub page_size: u64,
    /// `Err(why)` when CRIU cannot checkpoint or restore on that node.
    pub criu: Result<(), &'a str>,
    /// CRIU's version and the kernel release, when known: together they
    /// say whether CRIU can dump sockets there.
    pub criu_version: Option<&'a str>,
    pub kernel: Option<&'a str>,
}

impl<'a> Facts<'a> {
    /// A peer as its retained status describes it.
    pub fn of_status(node: &'a str, status: &'a NodeStatus) -> Self {
        Facts {
            node,
            arch: &status.arch,
            page_size: status.page_size,
            criu: match (&status.criu, &status.criu_error) {
                (_, Some(why)) => Err(why),
                (Some(_), None) => Ok(()),
                (None, None) => Err("its status reports no working CRIU"),
            },
            criu_version: status.criu.as_deref(),
            kernel: status.kernel.as_deref(),
        }
    }

    /// The source as its `Prepare` describes it. It sends a `Prepare` only
    /// after its own precheck found CRIU working.
    pub fn of_prepare(prepare: &'a Prepare) -> Self {
        Facts {
            node: &prepare.source_node,
            arch: &prepare.arch,
            page_size: prepare.page_size,
            criu: Ok(()),
            criu_version: None,
            kernel: None,
        }
    }
}

/// CRIU works on that node, and can dump sockets on its kernel. The node
/// status reports the outcome for its own node; [`compatible`] checks both
/// sides with it.
pub fn criu_usable(side: &Facts) -> Result<(), CheckError> {
    if let Err(why) = side.criu {
        return Err(CheckError::Criu {
            node: side.node.to_owned(),
            why: why.to_owned(),
        });
    }
    if let (Some(kernel), Some(criu)) = (side.kernel, side.criu_version) {
        if !crate::sysinfo::criu_dumps_sockets(kernel, criu) {
            return Err(CheckError::CriuSockets {
                node: side.node.to_owned(),
                criu: criu.to_owned(),
                kernel: kernel.to_owned(),
            });
        }
    }
    Ok(())
}

/// The compatibility check: a checkpoint of `source` can be restored on
/// `target`. Every side that decides calls this one function.
pub fn compatible(source: &Facts, target: &Facts) -> Result<(), CheckError> {
    for side in [source, target] {
        criu_usable(side)?;
    }
    if source.arch != target.arch {
        return Err(CheckError::Arch {
            source_node: source.node.to_owned(),
            source_arch: source.arch.to_owned(),
            target_node: target.node.to_owned(),
            target_arch: target.arch.to_owned(),
        });
    }
    if source.page_size != target.page_size {
        return Err(CheckError::PageSize {
            source_node: source.node.to_owned(),
            source_size: source.page_size,
            target_node: target.node.to_owned(),
            target_size: target.page_size,
        });
    }
    Ok(())
}

/// The job's container exists here (`asked`: the name or id the job gave).
pub fn found(
    asked: &str,
    here: &str,
    inspect: Result<Container, RuntimeError>,
) -> Result<Container, CheckError> {
    inspect.map_err(|e| match e {
        RuntimeError::NotFound(_) => CheckError::NotFound {
            container: asked.to_owned(),
            node: here.to_owned(),
        },
        source => CheckError::Inspect {
            container: asked.to_owned(),
            source: Box::new(source),
        },
    })
}

/// A container can only be checkpointed while it runs.
pub fn running(asked: &str, here: &str, container: &Container) -> Result<(), CheckError> {
    if !container.running {
        return Err(CheckError::NotRunning {
            container: asked.to_owned(),
            node: here.to_owned(),
        });
    }
    Ok(())
}

/// The source may send to `target` as `peer` (its last retained status)
/// describes it: the early job check and the source's precheck.
pub fn target_ready(
    here: &Facts,
    target: &str,
    peer: Option<&NodeStatus>,
) -> Result<(), CheckError> {
    let peer = peer.ok_or_else(|| CheckError::PeerUnknown {
        node: target.to_owned(),
    })?;
    if !peer.online {
        return Err(CheckError::PeerOffline {
            node: target.to_owned(),
        });
    }
    if peer.data_addr.is_none() {
        return Err(CheckError::NoDataAddress {
            node: target.to_owned(),
        });
    }
    compatible(here, &Facts::of_status(target, peer))
}

/// `free` bytes in `dir` hold a checkpoint of about `estimate` bytes.
pub fn room(
    node: &str,
    what: &'static str,
    dir: &Path,
    free: u64,
    estimate: u64,
) -> Result<(), CheckError> {
    if free < estimate {
        return Err(CheckError::NoRoom {
            node: node.to_owned(),
            what,
            dir: dir.display().to_string(),
            free,
            estimate,
        });
    }
    Ok(())
}

/// The `Prepare` is well-formed, meant for this node, and sent by the node
/// it names as its source (`peer_names`: the identities of the peer's
/// certificate; `None` only on an insecure plain-TCP port).
pub fn prepare_identity(
    prepare: &Prepare,
    here: &str,
    peer_names: Option<&[String]>,
) -> Result<(), CheckError> {
    for (kind, v) in [
        ("job id", &prepare.job_id),
        ("source node", &prepare.source_node),
        ("container name", &prepare.spec.name),
    ] {
        validate_id(kind, v)?;
    }
    if prepare.target_node != here {
        return Err(CheckError::WrongNode {
            target_node: prepare.target_node.clone(),
            node: here.to_owned(),
        });
    }
    if let Some(names) = peer_names {
        if !names.iter().any(|n| n == &prepare.source_node) {
            return Err(CheckError::PeerNotSource {
                names: names.to_vec(),
                source_node: prepare.source_node.clone(),
            });
        }
    }
    if prepare.checkpoint != super::checkpoint_name(&prepare.job_id) {
        return Err(CheckError::CheckpointName {
            checkpoint: prepare.checkpoint.clone(),
            job_id: prepare.job_id.clone(),
        });
    }
    Ok(())
}

/// This node's own policy allows the container the `Prepare` asks for: its
/// create body and the volumes of its state plan.
pub fn allowed(
    prepare: &Prepare,
    here: &str,
    policy: &crate::runtime::admission::HostPolicy,
) -> Result<(), CheckError> {
    let volumes = prepare
        .state
        .as_ref()
        .map(|s| s.volumes.as_slice())
        .unwrap_or_default();
    policy
        .admit(&prepare.spec, volumes)
        .map_err(|refusal| CheckError::NotAllowed {
            node: here.to_owned(),
            refusal,
        })
}

/// The image the container needs is on this node.
pub fn image_present(
    image: &str,
    here: &str,
    exists: Result<bool, RuntimeError>,
) -> Result<(), CheckError> {
    match exists {
        Ok(true) => Ok(()),
        Ok(false) => Err(CheckError::ImageMissing {
            image: image.to_owned(),
            node: here.to_owned(),
        }),
        Err(source) => Err(CheckError::ImageCheck {
            image: image.to_owned(),
            node: here.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// No container on this node has the name the migrated one needs.
pub fn name_free(
    name: &str,
    here: &str,
    inspect: Result<Container, RuntimeError>,
) -> Result<(), CheckError> {
    match inspect {
        Ok(_) => Err(CheckError::NameTaken {
            name: name.to_owned(),
            node: here.to_owned(),
        }),
        Err(RuntimeError::NotFound(_)) => Ok(()),
        Err(source) => Err(CheckError::NameCheck {
            name: name.to_owned(),
            node: here.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// The stream's header names the job and the source that prepared it.
pub fn stream_matches(
    header: &TransferHeader,
    expected_job: &str,
    expected_source: &str,
) -> Result<(), CheckError> {
    if header.job_id != expected_job || header.source_node != expected_source {
        return Err(CheckError::StreamMismatch {
            job_id: header.job_id.clone(),
            source_node: header.source_node.clone(),
            expected_job: expected_job.to_owned(),
            expected_source: expected_source.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(node: &'a str, arch: &'a str, page_size: u64) -> Facts<'a> {
        Facts {
            node,
            arch,
            page_size,
            criu: Ok(()),
            criu_version: Some("4.2.1"),
            kernel: Some("6.18.44"),
        }
    }

    fn status(online: bool, arch: &str, criu: bool) -> NodeStatus {
        NodeStatus {
            online,
            version: "0".into(),
            arch: arch.into(),
            page_size: 4096,
            criu: criu.then(|| "4.2".into()),
            criu_error: None,
            kernel: Some("6.18.44".into()),
            docker: None,
            data_addr: Some("127.0.0.1:7070".into()),
            free_mem: 0,
            free_disk: 0,
            jobs: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn compatibility_names_the_first_difference_and_both_nodes() {
        let a = facts("a", "x86_64", 4096);
        assert!(compatible(&a, &facts("b", "x86_64", 4096)).is_ok());
        let e = compatible(&a, &facts("b", "aarch64", 4096)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "engine arch differs: source a runs x86_64, target b runs aarch64"
        );
        let e = compatible(&a, &facts("b", "x86_64", 16384)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel page size differs: source a has 4096, target b has 16384"
        );
        let broken = Facts {
            criu: Err("criu check failed"),
            ..facts("b", "aarch64", 4096)
        };
        // CRIU first: without it nothing else matters.
        let e = compatible(&a, &broken).unwrap_err();
        assert_eq!(e.to_string(), "CRIU does not work on b: criu check failed");
    }

    #[test]
    fn a_criu_that_cannot_dump_sockets_on_its_kernel_is_refused_with_the_reason() {
        let old_criu = Facts {
            criu_version: Some("4.1.1"),
            ..facts("b", "x86_64", 4096)
        };
        let e = compatible(&facts("a", "x86_64", 4096), &old_criu).unwrap_err();
        assert!(matches!(e, CheckError::CriuSockets { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "CRIU 4.1.1 on b cannot dump TCP or UDP sockets on its kernel 6.18.44: kernels \
             from 6.16.0 on allow SO_PASSCRED/SO_PASSSEC only on unix and netlink sockets, \
             which CRIU handles from 4.2.0 on (CRIU issues 2705, 2718); install CRIU >= 4.2.0"
        );
        // The source is checked the same way.
        let e = compatible(&old_criu, &facts("a", "x86_64", 4096)).unwrap_err();
        assert!(e.to_string().starts_with("CRIU 4.1.1 on b "), "{e}");
        // The same CRIU on a Raspberry Pi kernel of today is fine.
        let pi = Facts {
            kernel: Some("6.12.34+rpt-rpi-v8"),
            ..old_criu
        };
        assert!(compatible(&facts("a", "x86_64", 4096), &pi).is_ok());
        // A peer reports its reason in its status, and an older peer that
        // reports only versions is judged on them.
        let mut peer = status(true, "x86_64", false);
        peer.criu_error = Some("CRIU 4.1.1 on b cannot dump TCP or UDP sockets".into());
        let e = target_ready(&facts("a", "x86_64", 4096), "b", Some(&peer)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CRIU does not work on b: CRIU 4.1.1 on b cannot dump TCP or UDP sockets"
        );
        let mut older = status(true, "x86_64", true);
        older.criu = Some("4.1.1".into());
        let e = target_ready(&facts("a", "x86_64", 4096), "b", Some(&older)).unwrap_err();
        assert!(matches!(e, CheckError::CriuSockets { .. }), "{e:?}");
    }

    #[test]
    fn target_readiness_comes_from_its_status() {
        let a = facts("a", "x86_64", 4096);
        let cases: [(Option<NodeStatus>, &str); 4] = [
            (None, "target node b is unknown (no status seen)"),
            (
                Some(status(false, "x86_64", true)),
                "target node b is offline",
            ),
            (
                Some(status(true, "x86_64", false)),
                "CRIU does not work on b: its status reports no working CRIU",
            ),
            (
                Some(status(true, "aarch64", true)),
                "engine arch differs: source a runs x86_64, target b runs aarch64",
            ),
        ];
        for (peer, want) in cases {
            let e = target_ready(&a, "b", peer.as_ref()).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let mut no_addr = status(true, "x86_64", true);
        no_addr.data_addr = None;
        assert!(matches!(
            target_ready(&a, "b", Some(&no_addr)),
            Err(CheckError::NoDataAddress { .. })
        ));
        assert!(target_ready(&a, "b", Some(&status(true, "x86_64", true))).is_ok());
    }

    #[test]
    fn room_compares_free_bytes_with_the_estimate() {
        let dir = Path::new("/var/lib/ferry");
        assert!(room("a", "work dir", dir, 10, 10).is_ok());
        let e = room("a", "work dir", dir, 9, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a has 9 bytes free in its work dir /var/lib/ferry for a checkpoint of about 10 bytes"
        );
    }
}
