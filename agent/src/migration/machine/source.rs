//! The source side of a migration: what to do next, when to roll back and
//! what to report. The driver in `migration::source` performs each step and
//! feeds back what happened.
//!
//! ```text
//! Precheck -> PrepareTarget -> Checkpoint -> Transfer -> AwaitRestore -> Commit -> done
//!     \____________\_____ fail/cancel: Abort     \___________\__ fail/cancel: RollBack
//! ```
//! Before the checkpoint the container never stopped, so a failure only
//! tells the target to forget the job. Between the checkpoint and the
//! target's confirmation, the original is restored from its local
//! checkpoint. Once the target confirms (the point of no return, settled
//! against a cancel by the job's `CommitGate`), the job can only go forward.

use std::collections::BTreeMap;

use super::{Outcome, Report};
use crate::migration::MigrationError;
use crate::mqtt::contract::{JobState, JobStatus, Phase};
use crate::runtime::CheckpointVia;

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Precheck,
    PrepareTarget,
    /// Not interruptible: a cancel meanwhile is reported once it returns.
    Checkpoint,
    Transfer,
    /// Wait for `Restored`, then pass the commit gate.
    AwaitRestore,
    /// Tell the target to keep the container, then remove the original.
    Commit,
    /// The container never stopped: release the target's reservation.
    Abort,
    /// Restore the original on this node from its local checkpoint.
    RollBack,
    /// Final state reached; publish it and stop.
    Finish,
}

#[derive(Debug)]
pub struct SourceMachine {
    report: Report,
    step: Step,
    /// Why the migration stopped going forward, reported in the final state.
    failure: Option<MigrationError>,
    canceled: bool,
}

impl SourceMachine {
    pub fn new(status: JobStatus, now_ms: u64) -> Self {
        Self {
            report: Report::start(status, now_ms),
            step: Step::Precheck,
            failure: None,
            canceled: false,
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// What to publish now.
    pub fn status(&self) -> &JobStatus {
        &self.report.status
    }

    /// The container's addresses on the source, once inspected.
    pub fn old_addresses(&mut self, addresses: BTreeMap<String, String>) {
        self.report.status.old_addresses = addresses;
    }

    /// Transfer counters, as the stream reports them.
    pub fn progress(&mut self, bytes_raw: u64, bytes_wire: u64, rate_bps: u64, now_ms: u64) {
        let s = &mut self.report.status;
        s.bytes_raw = bytes_raw;
        s.bytes_wire = bytes_wire;
        s.rate_bps = rate_bps;
        s.updated_ms = now_ms;
    }

    /// How the checkpoint was taken, for the status.
    pub fn checkpointed(&mut self, via: &CheckpointVia, now_ms: u64) {
        let s = &mut self.report.status;
        (s.checkpoint_via, s.checkpoint_fallback) = match via {
            CheckpointVia::Runc => (Some("runc".into()), None),
            CheckpointVia::Engine { reason } => (Some("engine".into()), Some(reason.clone())),
        };
        s.updated_ms = now_ms;
    }

    fn enter(&mut self, step: Step, phase: Option<Phase>, now_ms: u64) -> Step {
        self.report.enter(phase, now_ms);
        self.step = step;
        step
    }

    fn finish(&mut self, state: JobState, now_ms: u64) -> Step {
        self.report.finish(state, self.failure.as_ref(), now_ms);
        self.step = Step::Finish;
        Step::Finish
    }

    /// How a job that stopped going forward ends once its undo step is done.
    fn undone(&self, otherwise: JobState) -> JobState {
        if self.canceled {
            JobState::Canceled
        } else {
            otherwise
        }
    }

    /// Feeds the outcome of the current step; returns the next step.
    pub fn on(&mut self, outcome: Outcome, now_ms: u64) -> Step {
        match outcome {
            Outcome::Done => self.forward(now_ms),
            // The gate refuses a cancel once the commit passed it: the
            // driver never reports one from here on.
            Outcome::Canceled if self.step == Step::Commit => self.forward(now_ms),
            Outcome::Canceled => {
                self.canceled = true;
                self.failure.get_or_insert(MigrationError::Canceled);
                self.backward(now_ms)
            }
            Outcome::Failed(reason) => {
                self.failure.get_or_insert(reason);
                self.backward(now_ms)
            }
        }
    }

    fn forward(&mut self, now_ms: u64) -> Step {
        match self.step {
            Step::Precheck => self.enter(Step::PrepareTarget, None, now_ms),
            Step::PrepareTarget => self.enter(Step::Checkpoint, Some(Phase::Checkpoint), now_ms),
            Step::Checkpoint => self.enter(Step::Transfer, Some(Phase::Transfer), now_ms),
            Step::Transfer => self.enter(Step::AwaitRestore, Some(Phase::Restore), now_ms),
            Step::AwaitRestore => self.enter(Step::Commit, Some(Phase::Cleanup), now_ms),
            Step::Commit => self.finish(JobState::Succeeded, now_ms),
            Step::Abort => self.finish(self.undone(JobState::Failed), now_ms),
            Step::RollBack => self.finish(self.undone(JobState::RolledBack), now_ms),
            Step::Finish => Step::Finish,
        }
    }

    fn backward(&mut self, now_ms: u64) -> Step {
        match self.step {
            Step::Precheck | Step::PrepareTarget => self.enter(Step::Abort, None, now_ms),
            // A failed checkpoint call may still have stopped the container;
            // the rollback step restores it if so.
            Step::Checkpoint | Step::Transfer | Step::AwaitRestore => {
                self.enter(Step::RollBack, Some(Phase::Cleanup), now_ms)
            }
            // Forward-only from here, no rollback: the target may already
            // own the workload. The original stays stopped with its
            // checkpoint, and the error says what is unconfirmed.
            Step::Commit => self.finish(JobState::Failed, now_ms),
            Step::Abort => self.finish(self.undone(JobState::Failed), now_ms),
            // The original could not be restored either.
            Step::RollBack => self.finish(JobState::Failed, now_ms),
            Step::Finish => Step::Finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::contract::Role;

    fn machine() -> SourceMachine {
        SourceMachine::new(
            JobStatus::new("j1", "a", Role::Source, "counter", "a", "b", 0),
            1_000,
        )
    }

    fn failed(reason: &str) -> Outcome {
        Outcome::Failed(MigrationError::RestoreFailedOnTarget {
            reason: reason.into(),
        })
    }

    fn run_to(m: &mut SourceMachine, step: Step) {
        while m.step() != step {
            m.on(Outcome::Done, 2_000);
        }
    }

    #[test]
    fn happy_path_succeeds_with_timings_per_phase() {
        let mut m = machine();
        let mut steps = vec![m.step()];
        for i in 1..=6 {
            steps.push(m.on(Outcome::Done, 1_000 + 100 * i));
        }
        use Step::*;
        assert_eq!(
            steps,
            [
                Precheck,
                PrepareTarget,
                Checkpoint,
                Transfer,
                AwaitRestore,
                Commit,
                Finish
            ]
        );
        let s = m.status();
        assert_eq!(s.state, JobState::Succeeded);
        assert_eq!(s.error, None);
        assert_eq!(s.timings_ms.get(&Phase::Precheck), Some(&200));
        for p in [
            Phase::Checkpoint,
            Phase::Transfer,
            Phase::Restore,
            Phase::Cleanup,
        ] {
            assert_eq!(s.timings_ms.get(&p), Some(&100), "{p:?}");
        }
    }

    #[test]
    fn a_failure_aborts_before_the_checkpoint_and_rolls_back_after_it() {
        use Step::*;
        for (failing, undo, end) in [
            (Precheck, Abort, JobState::Failed),
            (PrepareTarget, Abort, JobState::Failed),
            (Checkpoint, RollBack, JobState::RolledBack),
            (Transfer, RollBack, JobState::RolledBack),
            (AwaitRestore, RollBack, JobState::RolledBack),
        ] {
            let mut m = machine();
            run_to(&mut m, failing);
            assert_eq!(m.on(failed("no image"), 2_100), undo, "{failing:?}");
            assert_eq!(m.on(Outcome::Done, 2_200), Finish);
            assert_eq!(m.status().state, end, "{failing:?}");
            assert_eq!(
                m.status().error.as_deref(),
                Some("restore on target failed: no image")
            );
        }
    }

    #[test]
    fn the_status_says_how_the_checkpoint_was_taken() {
        let mut m = machine();
        assert_eq!(m.status().checkpoint_via, None);
        m.checkpointed(&CheckpointVia::Runc, 1_500);
        assert_eq!(m.status().checkpoint_via.as_deref(), Some("runc"));
        assert_eq!(m.status().checkpoint_fallback, None);
        let why = "runc state of container c not found".to_string();
        m.checkpointed(
            &CheckpointVia::Engine {
                reason: why.clone(),
            },
            1_600,
        );
        assert_eq!(m.status().checkpoint_via.as_deref(), Some("engine"));
        assert_eq!(m.status().checkpoint_fallback, Some(why));
        let json = serde_json::to_value(m.status()).unwrap();
        assert_eq!(json["checkpoint_via"], "engine");
    }

    #[test]
    fn failed_rollback_is_failed_and_keeps_first_reason() {
        let mut m = machine();
        run_to(&mut m, Step::Transfer);
        m.on(failed("checksum mismatch"), 2_100);
        m.on(Outcome::Failed(MigrationError::Missing("x")), 2_200);
        assert_eq!(m.status().state, JobState::Failed);
        assert_eq!(
            m.status().error.as_deref(),
            Some("restore on target failed: checksum mismatch")
        );
    }

    #[test]
    fn cancel_reported_after_the_checkpoint_rolls_back() {
        // The driver lets the checkpoint call finish, then reports the cancel.
        for at in [Step::Checkpoint, Step::Transfer, Step::AwaitRestore] {
            let mut m = machine();
            run_to(&mut m, at);
            assert_eq!(m.on(Outcome::Canceled, 2_100), Step::RollBack);
            assert_eq!(m.on(Outcome::Done, 2_200), Step::Finish);
            assert_eq!(m.status().state, JobState::Canceled);
            assert_eq!(m.status().error.as_deref(), Some("canceled by request"));
        }
    }

    #[test]
    fn cancel_before_freeze_is_canceled_without_rollback() {
        let mut m = machine();
        assert_eq!(m.on(Outcome::Canceled, 1_100), Step::Abort);
        assert_eq!(m.on(Outcome::Done, 1_200), Step::Finish);
        assert_eq!(m.status().state, JobState::Canceled);
    }

    #[test]
    fn failure_after_commit_is_failed_without_rollback() {
        let mut m = machine();
        run_to(&mut m, Step::Commit);
        let unconfirmed = MigrationError::CommitUnconfirmed(crate::migration::Unconfirmed::Timeout);
        assert_eq!(m.on(Outcome::Failed(unconfirmed), 2_100), Step::Finish);
        assert_eq!(m.status().state, JobState::Failed);
        assert!(m
            .status()
            .error
            .as_deref()
            .unwrap()
            .contains("kept with its checkpoint"));
    }

    #[test]
    fn a_failed_rollback_is_failed_even_when_canceled() {
        let mut m = machine();
        run_to(&mut m, Step::Transfer);
        m.on(Outcome::Canceled, 2_100);
        assert_eq!(m.on(failed("x"), 2_200), Step::Finish);
        assert_eq!(m.status().state, JobState::Failed);
        assert_eq!(m.status().error.as_deref(), Some("canceled by request"));
    }
}
