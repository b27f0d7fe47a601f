//! What to do with a journaled job after a restart or a lost connection:
//! a pure function of the journal's phase and the peer's answer, so that
//! every crash point of the commit protocol is one row of a table the unit
//! tests read whole (README, "How a migration goes").
//!
//! The source is the only decider. It journals `Commit` or `Abort` before
//! acting on it; the target never removes a copy it restored on its own,
//! it asks until it learns the decision.

use serde::{Deserialize, Serialize};

use super::journal::Phase;
use crate::mqtt::contract::Role;

/// What the target holds for a job, as it answers a source's `Outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holding {
    /// Restored and running: it waits for the decision.
    Running,
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
            (Transferring | RestoreRequested, Answer::Target(Holding::Running)) => Action::Commit,
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

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    const ANSWERS: [Answer; 9] = [
        Answer::NotAsked,
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
