//! What to do with a journaled job after a restart or a lost connection:
//! a pure function of the journal's phase and the peer's answer, so that
//! every crash point of the commit protocol is one row of a table the unit
//! tests read whole (README, "How a migration goes").
//!
//! The source is the only decider. It journals `Commit` or `Abort` before
//! acting on it; the target never removes a copy it restored on its own,
//! it asks until it learns the decision.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::journal::{Entry, Phase};
use super::protocol::{self, ToSource, ToTarget};
use super::{now_ms, Node};
use crate::mqtt::contract::{JobState, JobStatus, Role};
use crate::runtime::Engine;

/// What the target holds for a job, as it answers a source's `Outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holding {
    /// Restored and running: it waits for the decision.
    Running,
    /// Running, and the job is final here: it kept the copy.
    Kept,
    /// Still receiving or restoring: ask again.
    Busy,
    /// Nothing (never created, removed, or the job is unknown).
    Nothing,
}

/// The source's decision, as it answers a target's `Decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Commit,
    Abort,
    /// Not decided yet (the job is live on the source): ask again.
    Pending,
}

/// The peer's answer during recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Not asked: the phase decides alone.
    NotAsked,
    /// No answer (down, unreachable, refused the connection).
    Unreachable,
    Target(Holding),
    Source(Decision),
}

/// What recovery does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask the peer (first time, or again after a pause).
    Ask,
    // Source.
    /// The original never stopped: put its restart policy back.
    ResumeOriginal,
    /// Journal `Abort`, have the target remove any copy (confirmed), then
    /// restore the original from its checkpoint (or resume it if it runs).
    Abort,
    /// Journal `Commit`, tell the target, then remove the original.
    Commit,
    // Target.
    /// Keep the restored container; drop the checkpoint images.
    Keep,
    /// Remove what this job created: container, volumes, staging.
    Remove,
}

/// The recovery decision table.
pub fn decide(role: Role, phase: Phase, answer: Answer) -> Action {
    use Phase::*;
    match role {
        Role::Source => match (phase, answer) {
            // The original runs: nothing moved.
            (Started | PolicyPaused, _) => Action::ResumeOriginal,
            // No complete checkpoint reached the target: it cannot have
            // restored. It removes its copy when the connection ends.
            (Checkpointing, _) => Action::Abort,
            // The target may hold a verified, running copy: keep it rather
            // than restore (the original has stopped already).
            (Transferring | RestoreRequested, Answer::Target(Holding::Running | Holding::Kept)) => {
                Action::Commit
            }
            (Transferring | RestoreRequested, Answer::Target(Holding::Nothing)) => Action::Abort,
            (Transferring | RestoreRequested, _) => Action::Ask,
            // Decided: carried out to the end, whatever the target says; a
            // target that lost a committed copy is the one case the
            // original comes back after a commit.
            (Commit, Answer::Target(Holding::Nothing)) => Action::Abort,
            (Commit, _) => Action::Commit,
            (Abort, _) => Action::Abort,
            // Target phases in a source record: cannot be written.
            (Preparing | Creating | Receiving | Restoring | Restored, _) => Action::Abort,
        },
        Role::Target => match (phase, answer) {
            // Not restored: the source cannot have committed.
            (Preparing | Creating | Receiving, _) => Action::Remove,
            (Restoring | Restored, Answer::Source(Decision::Commit)) => Action::Keep,
            (Restoring | Restored, Answer::Source(Decision::Abort)) => Action::Remove,
            (Restoring | Restored, _) => Action::Ask,
            (Commit, _) => Action::Keep,
            (Abort, _) => Action::Remove,
            (Started | PolicyPaused | Checkpointing | Transferring | RestoreRequested, _) => {
                Action::Remove
            }
        },
    }
}

/// The source's answer to a target that asks for the decision on a job,
/// from its journal record (`None`: no record, the job ended or never
/// reached `Prepare` here).
pub fn answer_decision(record: Option<Phase>) -> Decision {
    match record {
        Some(Phase::Commit) => Decision::Commit,
        Some(Phase::Abort) => Decision::Abort,
        // Not decided: the live driver, or recovery, decides soon.
        Some(_) => Decision::Pending,
        // The source journals before `Prepare` and forgets a job only
        // once the target confirmed the decision: no record, no commit.
        None => Decision::Abort,
    }
}

/// Drives every journaled job to a final state after a restart and
/// publishes it, retained. Asks the peer over the data port as long as the
/// table says so (every 2 s); the job's record goes only once it is final.
pub async fn recover<E: Engine>(node: &Node<E>, entry: Entry) {
    let mut answer = Answer::NotAsked;
    let mut tries = 0u32;
    loop {
        let action = decide(entry.role, entry.phase, answer);
        info!(job = %entry.job_id, role = ?entry.role, phase = ?entry.phase, ?answer, ?action, "recovering a journaled job");
        if action != Action::Ask {
            let (state, error) = act(node, &entry, action).await;
            if action == Action::Commit {
                // The record stays until the target kept the copy: it asks
                // for the decision meanwhile.
                confirm_kept(node, &entry).await;
            }
            let mut status = JobStatus::new(
                &entry.job_id,
                &node.id,
                entry.role,
                &entry.container,
                match entry.role {
                    Role::Source => node.id.as_str(),
                    Role::Target => entry.peer_node.as_str(),
                },
                match entry.role {
                    Role::Source => entry.peer_node.as_str(),
                    Role::Target => node.id.as_str(),
                },
                now_ms(),
            );
            status.state = state;
            status.error = error;
            node.publish_job(&status).await;
            node.journal_remove(&entry);
            info!(job = %entry.job_id, ?state, error = ?status.error, "journaled job recovered");
            return;
        }
        if tries > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        tries += 1;
        answer = match entry.role {
            Role::Source => ask_target(node, &entry).await,
            Role::Target => {
                match super::target::ask_decision(node, &entry.job_id, &entry.peer_node).await {
                    Ok(d) => Answer::Source(d),
                    Err(_) => Answer::Unreachable,
                }
            }
        };
    }
}

/// Asks the target until it holds the copy as final (or nothing: a copy
/// it lost cannot be helped by the source any more).
async fn confirm_kept<E>(node: &Node<E>, entry: &Entry) {
    loop {
        match ask_target(node, entry).await {
            Answer::Target(Holding::Kept | Holding::Nothing) => return,
            _ => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
        }
    }
}

async fn ask_target<E>(node: &Node<E>, entry: &Entry) -> Answer {
    ask_holding(
        node,
        &entry.peer_node,
        entry.peer_addr.clone(),
        &entry.job_id,
        &entry.container,
    )
    .await
}

/// Asks `target` (at its announced data address, else `known_addr`) what
/// it holds of `container` for job `job_id`.
pub(super) async fn ask_holding<E>(
    node: &Node<E>,
    target: &str,
    known_addr: Option<String>,
    job_id: &str,
    container: &str,
) -> Answer {
    let addr = node
        .peers
        .get(target)
        .and_then(|p| p.data_addr)
        .or(known_addr);
    let Some(addr) = addr else {
        return Answer::Unreachable;
    };
    let Ok(mut conn) = node.dialer.dial(target, &addr).await else {
        return Answer::Unreachable;
    };
    let ask = ToTarget::Outcome {
        job_id: job_id.to_owned(),
        container: container.to_owned(),
    };
    if protocol::send(&mut conn, &ask).await.is_err() {
        return Answer::Unreachable;
    }
    match tokio::time::timeout(
        node.timeouts.prepare,
        protocol::recv::<_, ToSource>(&mut conn),
    )
    .await
    {
        Ok(Ok(ToSource::Holding { holding })) => Answer::Target(holding),
        _ => Answer::Unreachable,
    }
}

const RESTARTED: &str = "agent restarted mid-job";

/// Carries out `action`; returns the job's final state and reason.
async fn act<E: Engine>(
    node: &Node<E>,
    entry: &Entry,
    action: Action,
) -> (JobState, Option<String>) {
    let why = |what: &str| {
        Some(format!(
            "{RESTARTED} (journal phase {:?}): {what}",
            entry.phase
        ))
    };
    let id = entry
        .container_id
        .clone()
        .unwrap_or(entry.container.clone());
    match action {
        Action::Ask => (JobState::Failed, why("undecided")),
        Action::ResumeOriginal | Action::Abort if entry.role == Role::Source => {
            if entry.phase != Phase::Abort && action == Action::Abort {
                let mut decided = entry.clone();
                decided.phase = Phase::Abort;
                if let Err(e) = node.journal_write(&decided) {
                    return (JobState::Failed, why(&e.to_string()));
                }
            }
            // The target holds nothing by now (or never restored): the
            // original comes back from its checkpoint if it stopped.
            let mut problems = Vec::new();
            match node.engine.inspect(&id).await {
                Ok(c) if !c.running => {
                    if let Ok(dir) = node.engine.checkpoint_dir(&id, &entry.checkpoint).await {
                        let _ = crate::runtime::state::discard_state(&dir);
                    }
                    if let Err(e) = node.engine.restore(&id, &entry.checkpoint).await {
                        problems.push(format!("cannot restore the original: {e}"));
                    }
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("cannot inspect the original: {e}")),
            }
            let _ = node.engine.delete_checkpoint(&id, &entry.checkpoint).await;
            if let Some(policy) = entry
                .restart_policy
                .clone()
                .and_then(|p| serde_json::from_value(p).ok())
            {
                if let Err(e) = node.engine.set_restart_policy(&id, &policy).await {
                    problems.push(format!("cannot put the restart policy back: {e}"));
                }
            }
            if problems.is_empty() {
                (JobState::RolledBack, why("the original runs here again"))
            } else {
                (JobState::Failed, why(&problems.join("; ")))
            }
        }
        Action::Commit => {
            let mut decided = entry.clone();
            decided.phase = Phase::Commit;
            if let Err(e) = node.journal_write(&decided) {
                return (JobState::Failed, why(&e.to_string()));
            }
            // Removing the stopped original also removes its checkpoint.
            if let Err(e) = node.engine.remove(&id).await {
                // Gone already: a commit carried out before the crash.
                if node.engine.inspect(&id).await.is_ok() {
                    return (
                        JobState::Failed,
                        why(&format!("committed, but cannot remove the original: {e}")),
                    );
                }
            }
            // Known limit: the original's volumes stay (the journal holds
            // their names, not the specs `remove_unused_volumes` checks).
            (
                JobState::Succeeded,
                why("the target runs the container; committed"),
            )
        }
        Action::Keep => {
            let _ = node.engine.delete_checkpoint(&id, &entry.checkpoint).await;
            (
                JobState::Succeeded,
                why("the source committed; the container runs here"),
            )
        }
        Action::Remove | Action::ResumeOriginal | Action::Abort => {
            let mut problems = Vec::new();
            // Only what this job created: by id, or by name if still only created.
            let found = node.engine.inspect(&id).await;
            match found {
                Ok(c) if entry.container_id.is_some() || !c.running => {
                    if let Err(e) = node.engine.remove(&c.id).await {
                        problems.push(format!("cannot remove the container: {e}"));
                    }
                }
                _ => {}
            }
            if !entry.volumes.is_empty() {
                if let Err(e) = node.engine.remove_volumes(&entry.volumes).await {
                    problems.push(format!("cannot remove the volumes: {e}"));
                }
            }
            if let Some(staging) = &entry.staging {
                let _ = tokio::fs::remove_dir_all(staging).await;
            }
            (
                JobState::Failed,
                why(&if problems.is_empty() {
                    "removed what this node created".to_string()
                } else {
                    problems.join("; ")
                }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    const ANSWERS: [Answer; 10] = [
        Answer::NotAsked,
        Answer::Target(Holding::Kept),
        Answer::Unreachable,
        Answer::Target(Holding::Running),
        Answer::Target(Holding::Busy),
        Answer::Target(Holding::Nothing),
        Answer::Source(Decision::Commit),
        Answer::Source(Decision::Abort),
        Answer::Source(Decision::Pending),
        Answer::Unreachable,
    ];

    #[test]
    fn the_source_table() {
        let s = |p, a| decide(Role::Source, p, a);
        for a in ANSWERS {
            assert_eq!(s(Started, a), Action::ResumeOriginal);
            assert_eq!(s(PolicyPaused, a), Action::ResumeOriginal);
            assert_eq!(s(Checkpointing, a), Action::Abort);
            assert_eq!(s(Abort, a), Action::Abort);
        }
        for p in [Transferring, RestoreRequested] {
            assert_eq!(s(p, Answer::NotAsked), Action::Ask);
            assert_eq!(s(p, Answer::Unreachable), Action::Ask);
            assert_eq!(s(p, Answer::Target(Holding::Busy)), Action::Ask);
            assert_eq!(s(p, Answer::Target(Holding::Running)), Action::Commit);
            assert_eq!(s(p, Answer::Target(Holding::Nothing)), Action::Abort);
        }
        assert_eq!(s(Commit, Answer::NotAsked), Action::Commit);
        assert_eq!(s(Commit, Answer::Unreachable), Action::Commit);
        assert_eq!(s(Commit, Answer::Target(Holding::Running)), Action::Commit);
        assert_eq!(s(Commit, Answer::Target(Holding::Nothing)), Action::Abort);
    }

    #[test]
    fn the_target_table() {
        let t = |p, a| decide(Role::Target, p, a);
        for a in ANSWERS {
            assert_eq!(t(Preparing, a), Action::Remove);
            assert_eq!(t(Creating, a), Action::Remove);
            assert_eq!(t(Receiving, a), Action::Remove);
            assert_eq!(t(Commit, a), Action::Keep);
            assert_eq!(t(Abort, a), Action::Remove);
        }
        for p in [Restoring, Restored] {
            assert_eq!(t(p, Answer::NotAsked), Action::Ask);
            assert_eq!(t(p, Answer::Unreachable), Action::Ask);
            assert_eq!(t(p, Answer::Source(Decision::Pending)), Action::Ask);
            assert_eq!(t(p, Answer::Source(Decision::Commit)), Action::Keep);
            assert_eq!(t(p, Answer::Source(Decision::Abort)), Action::Remove);
        }
    }

    /// The invariant the table exists for: a restored copy on the target
    /// is never removed unless the source decided abort, and the source
    /// never restores its original while the target says it runs a copy.
    #[test]
    fn never_zero_never_two() {
        let phases = [
            Started,
            PolicyPaused,
            Checkpointing,
            Transferring,
            RestoreRequested,
            Preparing,
            Creating,
            Receiving,
            Restoring,
            Restored,
            Commit,
            Abort,
        ];
        for p in phases {
            for a in ANSWERS {
                if matches!(p, Restoring | Restored) && decide(Role::Target, p, a) == Action::Remove
                {
                    assert_eq!(a, Answer::Source(Decision::Abort), "{p:?}");
                }
                if matches!(p, Transferring | RestoreRequested | Commit)
                    && a == Answer::Target(Holding::Running)
                {
                    assert_eq!(decide(Role::Source, p, a), Action::Commit, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn the_source_answers_a_target() {
        assert_eq!(answer_decision(Some(Commit)), Decision::Commit);
        assert_eq!(answer_decision(Some(Abort)), Decision::Abort);
        assert_eq!(answer_decision(Some(RestoreRequested)), Decision::Pending);
        assert_eq!(answer_decision(Some(Transferring)), Decision::Pending);
        assert_eq!(answer_decision(None), Decision::Abort);
    }
}
