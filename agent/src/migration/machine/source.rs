//! The source side of a migration: what to do next, when to roll back and
//! what to report. The driver in `migration::source` performs each step and
//! feeds back what happened.
//!
//! ```text
//! Precheck -> PrepareTarget -> SendImage -> PreCopy -> PausePolicy -> Checkpoint -> PackState
//!     \____________\______________\___________\__________\          |
//!              fail/cancel: Abort (-> ResumePolicy)       Transfer -> AwaitRestore -> Commit -> done
//!                                                    \________\____________\__ fail/cancel:
//!                                                          RollBack -> ResumePolicy
//! ```
//! Before the checkpoint the container never stopped, so a failure only
//! tells the target to forget the job (and puts the restart policy back if
//! it was paused). Between the checkpoint and the target's confirmation,
//! the original is restored from its local checkpoint, then gets its
//! restart policy back. Once the target confirms (the point of no return,
//! settled against a cancel by the job's `CommitGate`), the job can only go
//! forward. The restart policy is `no` from `PausePolicy` on, so the engine
//! never starts the checkpointed original afresh; a failed rollback leaves
//! it so.

use std::collections::BTreeMap;

use super::{Outcome, Report};
use crate::migration::MigrationError;
use crate::mqtt::contract::{JobState, JobStatus, Phase, PreCopyReport};
use crate::runtime::CheckpointVia;

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Inspect, check the mounts and the target, and survey what moves.
    Precheck,
    /// Send `Prepare`; the target says whether it needs the image.
    PrepareTarget,
    /// Send the image layers the target lacks, if it asked; wait for
    /// `Prepared`.
    SendImage,
    /// Pre-copy rounds while the container runs (or none, and why).
    PreCopy,
    /// Set the restart policy to `no`. Not interruptible.
    PausePolicy,
    /// Not interruptible: a cancel meanwhile is reported once it returns.
    Checkpoint,
    /// Write the stopped container's files and volumes into the
    /// checkpoint folder.
    PackState,
    Transfer,
    /// Wait for `Restored`, then pass the commit gate.
    AwaitRestore,
    /// Tell the target to keep the container, then remove the original.
    Commit,
    /// The container never stopped: release the target's reservation.
    Abort,
    /// Restore the original on this node from its local checkpoint.
    RollBack,
    /// Put back the restart policy `PausePolicy` set to `no`.
    ResumePolicy,
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
    /// The restart policy was set to `no`.
    policy_paused: bool,
    /// The original runs again from its checkpoint.
    rolled_back: bool,
}

impl SourceMachine {
    pub fn new(status: JobStatus, now_ms: u64) -> Self {
        Self {
            report: Report::start(status, now_ms),
            step: Step::Precheck,
            failure: None,
            canceled: false,
            policy_paused: false,
            rolled_back: false,
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

    /// Image bytes sent on the wire.
    pub fn image_sent(&mut self, bytes_wire: u64) {
        self.report.status.bytes_image = bytes_wire;
    }

    /// Bytes of files and volumes packed into the checkpoint folder.
    pub fn state_packed(&mut self, bytes: u64) {
        self.report.status.bytes_state = bytes;
    }

    /// Transfer counters, as the stream reports them.
    pub fn progress(&mut self, bytes_raw: u64, bytes_wire: u64, rate_bps: u64, now_ms: u64) {
        let s = &mut self.report.status;
        s.bytes_raw = bytes_raw;
        s.bytes_wire = bytes_wire;
        s.rate_bps = rate_bps;
        s.updated_ms = now_ms;
    }

    /// What pre-copy did so far, for the status.
    pub fn precopied(&mut self, report: PreCopyReport, now_ms: u64) {
        self.report.status.precopy = Some(report);
        self.report.status.updated_ms = now_ms;
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
        // The pause is not interruptible: a cancel reported from it came
        // once it was done.
        if self.step == Step::PausePolicy && matches!(outcome, Outcome::Done | Outcome::Canceled) {
            self.policy_paused = true;
        }
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
            Step::PrepareTarget => self.enter(Step::SendImage, None, now_ms),
            Step::SendImage => self.enter(Step::PreCopy, Some(Phase::Precopy), now_ms),
            Step::PreCopy => self.enter(Step::PausePolicy, None, now_ms),
            Step::PausePolicy => self.enter(Step::Checkpoint, Some(Phase::Checkpoint), now_ms),
            Step::Checkpoint => self.enter(Step::PackState, None, now_ms),
            Step::PackState => self.enter(Step::Transfer, Some(Phase::Transfer), now_ms),
            Step::Transfer => self.enter(Step::AwaitRestore, Some(Phase::Restore), now_ms),
            Step::AwaitRestore => self.enter(Step::Commit, Some(Phase::Cleanup), now_ms),
            Step::Commit => self.finish(JobState::Succeeded, now_ms),
            Step::Abort => self.aborted(now_ms),
            Step::RollBack => {
                self.rolled_back = true;
                self.enter(Step::ResumePolicy, None, now_ms)
            }
            Step::ResumePolicy => {
                let end = if self.rolled_back {
                    JobState::RolledBack
                } else {
                    JobState::Failed
                };
                self.finish(self.undone(end), now_ms)
            }
            Step::Finish => Step::Finish,
        }
    }

    /// After `Abort`: the policy back if it was paused, else done.
    fn aborted(&mut self, now_ms: u64) -> Step {
        if self.policy_paused {
            self.enter(Step::ResumePolicy, None, now_ms)
        } else {
            self.finish(self.undone(JobState::Failed), now_ms)
        }
    }

    fn backward(&mut self, now_ms: u64) -> Step {
        match self.step {
            Step::Precheck
            | Step::PrepareTarget
            | Step::SendImage
            | Step::PreCopy
            | Step::PausePolicy => self.enter(Step::Abort, None, now_ms),
            // A failed checkpoint call may still have stopped the container;
            // the rollback step restores it if so.
            Step::Checkpoint | Step::PackState | Step::Transfer | Step::AwaitRestore => {
                self.enter(Step::RollBack, Some(Phase::Cleanup), now_ms)
            }
            // Forward-only from here, no rollback: the target may already
            // own the workload. The original stays stopped with its
            // checkpoint, and the error says what is unconfirmed.
            Step::Commit => self.finish(JobState::Failed, now_ms),
            Step::Abort => self.aborted(now_ms),
            // The original could not be restored either: it stays stopped
            // with its checkpoint, and its policy stays `no` so the engine
            // does not start it afresh.
            Step::RollBack => self.finish(JobState::Failed, now_ms),
            // The workload runs (or never stopped), without its policy.
            Step::ResumePolicy => self.finish(JobState::Failed, now_ms),
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
        for i in 1..=10 {
            steps.push(m.on(Outcome::Done, 1_000 + 100 * i));
        }
        use Step::*;
        assert_eq!(
            steps,
            [
                Precheck,
                PrepareTarget,
                SendImage,
                PreCopy,
                PausePolicy,
                Checkpoint,
                PackState,
                Transfer,
                AwaitRestore,
                Commit,
                Finish
            ]
        );
        let s = m.status();
        assert_eq!(s.state, JobState::Succeeded);
        assert_eq!(s.error, None);
        // The image goes out before anything stops; the files are packed
        // while the container is frozen.
        assert_eq!(s.timings_ms.get(&Phase::Precheck), Some(&300));
        // Pre-copy runs while the container does, the pause after it.
        assert_eq!(s.timings_ms.get(&Phase::Precopy), Some(&200));
        assert_eq!(s.timings_ms.get(&Phase::Checkpoint), Some(&200));
        for p in [Phase::Transfer, Phase::Restore, Phase::Cleanup] {
            assert_eq!(s.timings_ms.get(&p), Some(&100), "{p:?}");
        }
    }

    #[test]
    fn a_failure_aborts_before_the_checkpoint_and_rolls_back_after_it() {
        use Step::*;
        for (failing, undo, end) in [
            (Precheck, vec![Abort], JobState::Failed),
            (PrepareTarget, vec![Abort], JobState::Failed),
            (SendImage, vec![Abort], JobState::Failed),
            (PreCopy, vec![Abort], JobState::Failed),
            // A failed pause changed nothing.
            (PausePolicy, vec![Abort], JobState::Failed),
            (
                Checkpoint,
                vec![RollBack, ResumePolicy],
                JobState::RolledBack,
            ),
            (
                PackState,
                vec![RollBack, ResumePolicy],
                JobState::RolledBack,
            ),
            (Transfer, vec![RollBack, ResumePolicy], JobState::RolledBack),
            (
                AwaitRestore,
                vec![RollBack, ResumePolicy],
                JobState::RolledBack,
            ),
        ] {
            let mut m = machine();
            run_to(&mut m, failing);
            let mut steps = vec![m.on(failed("no image"), 2_100)];
            while m.step() != Finish {
                steps.push(m.on(Outcome::Done, 2_200));
            }
            assert_eq!(steps.pop(), Some(Finish));
            assert_eq!(steps, undo, "{failing:?}");
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
        for at in [
            Step::Checkpoint,
            Step::PackState,
            Step::Transfer,
            Step::AwaitRestore,
        ] {
            let mut m = machine();
            run_to(&mut m, at);
            assert_eq!(m.on(Outcome::Canceled, 2_100), Step::RollBack);
            assert_eq!(m.on(Outcome::Done, 2_200), Step::ResumePolicy);
            assert_eq!(m.on(Outcome::Done, 2_300), Step::Finish);
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

        // Canceled as the pause returned: the policy goes back.
        let mut m = machine();
        run_to(&mut m, Step::PausePolicy);
        assert_eq!(m.on(Outcome::Canceled, 2_100), Step::Abort);
        assert_eq!(m.on(Outcome::Done, 2_200), Step::ResumePolicy);
        assert_eq!(m.on(Outcome::Done, 2_300), Step::Finish);
        assert_eq!(m.status().state, JobState::Canceled);
    }

    #[test]
    fn a_policy_that_cannot_be_put_back_fails_the_job() {
        let mut m = machine();
        run_to(&mut m, Step::Transfer);
        m.on(failed("x"), 2_100);
        assert_eq!(m.on(Outcome::Done, 2_200), Step::ResumePolicy);
        let e = MigrationError::Missing("policy");
        assert_eq!(m.on(Outcome::Failed(e), 2_300), Step::Finish);
        assert_eq!(m.status().state, JobState::Failed);
        assert_eq!(
            m.status().error.as_deref(),
            Some("restore on target failed: x")
        );
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
