//! Placement: which node a job whose target is `"auto"` or a list goes to,
//! as one pure function over the candidates' retained statuses.
//!
//! A candidate qualifies when [`check::target_ready`] passes (known, online,
//! a data address, the same engine arch and page size, a working CRIU on
//! both sides) and it offers enough memory and staging space for the
//! checkpoint. Of those, the one with the fewest jobs wins; ties go to the
//! most memory offered, then to the name, so the choice is deterministic.
//! Every candidate not chosen is named with the reason it was excluded.

use std::collections::BTreeMap;

use super::check::{self, CheckError, Facts};
use crate::mqtt::contract::NodeStatus;

/// What the container to place needs of its target, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The container's memory use: the restored process needs as much.
    pub memory: u64,
    /// The checkpoint staged in the target's work dir: about the memory.
    pub staging: u64,
}

/// The node chosen, and why each other candidate was not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub node: String,
    pub excluded: BTreeMap<String, String>,
}

/// Picks the target among `candidates` (node id, its last retained status
/// if any) for a checkpoint of `here`'s container needing `need`. The
/// source itself is never a candidate.
pub fn choose<'a>(
    here: &Facts,
    candidates: impl IntoIterator<Item = (&'a str, Option<&'a NodeStatus>)>,
    need: Need,
) -> Result<Choice, CheckError> {
    let mut excluded = BTreeMap::new();
    let mut fit: Vec<(&str, &NodeStatus)> = Vec::new();
    for (node, status) in candidates {
        if node == here.node {
            continue;
        }
        match qualifies(here, node, status, need) {
            Ok(s) => fit.push((node, s)),
            Err(e) => {
                excluded.insert(node.to_owned(), e.to_string());
            }
        }
    }
    fit.sort_by(|(a, sa), (b, sb)| {
        sa.jobs
            .cmp(&sb.jobs)
            .then(sb.free_mem.cmp(&sa.free_mem))
            .then(a.cmp(b))
    });
    let mut fit = fit.into_iter();
    let Some((node, _)) = fit.next() else {
        return Err(CheckError::NoPlace { excluded });
    };
    for (other, s) in fit {
        let busier = format!(
            "fits, but {node} was preferred ({other} has {} job(s) and offers {} bytes of memory)",
            s.jobs, s.free_mem
        );
        excluded.insert(other.to_owned(), busier);
    }
    Ok(Choice {
        node: node.to_owned(),
        excluded,
    })
}

fn qualifies<'s>(
    here: &Facts,
    node: &str,
    status: Option<&'s NodeStatus>,
    need: Need,
) -> Result<&'s NodeStatus, CheckError> {
    check::target_ready(here, node, status)?;
    let status = status.ok_or_else(|| CheckError::PeerUnknown {
        node: node.to_owned(),
    })?;
    if status.free_mem < need.memory {
        return Err(CheckError::NoMemory {
            node: node.to_owned(),
            free: status.free_mem,
            need: need.memory,
        });
    }
    if status.free_disk < need.staging {
        return Err(CheckError::NoStaging {
            node: node.to_owned(),
            free: status.free_disk,
            need: need.staging,
        });
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> Facts<'static> {
        Facts {
            node: "a",
            arch: "x86_64",
            page_size: 4096,
            criu: Ok(()),
            criu_version: Some("4.2.1"),
            kernel: Some("6.18.44"),
        }
    }

    fn status(jobs: u32, free_mem: u64) -> NodeStatus {
        NodeStatus {
            online: true,
            version: "0".into(),
            arch: "x86_64".into(),
            page_size: 4096,
            criu: Some("4.2.1".into()),
            criu_error: None,
            kernel: Some("6.18.44".into()),
            docker: None,
            data_addr: Some("127.0.0.1:7070".into()),
            free_mem,
            free_disk: 1 << 30,
            jobs,
            updated_ms: 0,
        }
    }

    const NEED: Need = Need {
        memory: 100 << 20,
        staging: 100 << 20,
    };

    #[test]
    fn the_only_compatible_node_is_chosen_and_the_others_are_named_with_their_reason() {
        let offline = NodeStatus {
            online: false,
            ..NodeStatus::default()
        };
        let small = status(0, 4096);
        let arm = NodeStatus {
            arch: "aarch64".into(),
            ..status(0, 1 << 30)
        };
        let mut full = status(0, 1 << 30);
        full.free_disk = 10;
        let good = status(3, 1 << 30);
        let candidates = [
            ("b", Some(&offline)),
            ("c", Some(&small)),
            ("d", Some(&good)),
            ("e", Some(&arm)),
            ("f", None),
            ("g", Some(&full)),
            ("a", Some(&good)),
        ];
        let choice = choose(&here(), candidates, NEED).unwrap();
        assert_eq!(choice.node, "d");
        let reasons: Vec<(&str, &str)> = choice
            .excluded
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("b", "target node b is offline"),
                (
                    "c",
                    "c offers 4096 bytes of memory for a container using 104857600 bytes"
                ),
                (
                    "e",
                    "engine arch differs: source a runs x86_64, target e runs aarch64"
                ),
                ("f", "target node f is unknown (no status seen)"),
                (
                    "g",
                    "g has 10 bytes free for staging a checkpoint of about 104857600 bytes"
                ),
            ]
        );
    }

    #[test]
    fn the_fewest_jobs_win_then_the_most_memory_then_the_name() {
        let (busy, idle_small, idle_big, idle_big2) = (
            status(2, 8 << 30),
            status(0, 1 << 30),
            status(0, 2 << 30),
            status(0, 2 << 30),
        );
        let choice = choose(
            &here(),
            [
                ("b", Some(&busy)),
                ("c", Some(&idle_small)),
                ("e", Some(&idle_big2)),
                ("d", Some(&idle_big)),
            ],
            NEED,
        )
        .unwrap();
        assert_eq!(choice.node, "d");
        assert!(
            choice.excluded["b"].starts_with("fits, but d was preferred (b has 2 job(s)"),
            "{:?}",
            choice.excluded
        );
        assert_eq!(choice.excluded.len(), 3);
    }

    #[test]
    fn no_fit_is_an_error_naming_every_candidate() {
        let small = status(0, 1);
        let e = choose(&here(), [("b", None), ("c", Some(&small))], NEED).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no candidate node fits: b: target node b is unknown (no status seen); \
             c: c offers 1 bytes of memory for a container using 104857600 bytes"
        );
        let e = choose(&here(), [("a", Some(&small))], NEED).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no candidate node fits: no other node is known"
        );
    }
}
