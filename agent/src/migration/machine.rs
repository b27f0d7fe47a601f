//! The source side of a migration as a sans-I/O state machine: it decides
//! what to do next, when to roll back and what to report; the driver in
//! `source.rs` performs each step and feeds back what happened.
//!
//! ```text
//! Precheck -> PrepareTarget -> Checkpoint -> Transfer -> AwaitRestore -> Commit -> done
//!     \____________\_____ fail/cancel: Abort     \___________\__ fail/cancel: RollBack
//! ```
//! Before the checkpoint the container never stopped, so a failure only
//! tells the target to forget the job. Between the checkpoint and the
//! target's confirmation, the original is restored from its local
//! checkpoint. Once the target confirms (the point of no return), the job
//! can only go forward.

use crate::mqtt::contract::{JobState, JobStatus, Phase};

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Precheck,
    PrepareTarget,
    Checkpoint,
    Transfer,
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

/// What happened when the driver performed a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed(String),
    /// A cancel arrived while the step ran (or was pending at its start).
    Canceled,
}

#[derive(Debug)]
pub struct SourceMachine {
    status: JobStatus,
    step: Step,
    phase_started_ms: u64,
    /// Why the migration stopped going forward, reported in the final state.
    failure: Option<String>,
    canceled: bool,
}

impl SourceMachine {
    pub fn new(mut status: JobStatus, now_ms: u64) -> Self {
        status.state = JobState::InProgress;
        status.phase = Some(Phase::Precheck);
        status.updated_ms = now_ms;
        Self {
            status,
            step: Step::Precheck,
            phase_started_ms: now_ms,
            failure: None,
            canceled: false,
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    pub fn status(&self) -> &JobStatus {
        &self.status
    }

    /// The container was checkpointed on this node and the target has not
    /// confirmed yet: a failure now needs a rollback.
    pub fn frozen(&self) -> bool {
        matches!(self.step, Step::Transfer | Step::AwaitRestore)
    }

    /// Past the point of no return: a cancel is refused.
    pub fn committed(&self) -> bool {
        matches!(self.step, Step::Commit)
            || (self.step == Step::Finish && self.status.state == JobState::Succeeded)
    }

    /// Transfer counters, as the stream reports them.
    pub fn progress(&mut self, bytes_raw: u64, bytes_wire: u64, rate_bps: u64, now_ms: u64) {
        self.status.bytes_raw = bytes_raw;
        self.status.bytes_wire = bytes_wire;
        self.status.rate_bps = rate_bps;
        self.status.updated_ms = now_ms;
    }

    fn enter(&mut self, step: Step, phase: Option<Phase>, now_ms: u64) {
        self.close_phase(now_ms);
        self.step = step;
        if phase.is_some() {
            self.status.phase = phase;
        }
        self.phase_started_ms = now_ms;
        self.status.updated_ms = now_ms;
    }

    fn close_phase(&mut self, now_ms: u64) {
        if let Some(phase) = self.status.phase {
            *self.status.timings_ms.entry(phase).or_insert(0) +=
                now_ms.saturating_sub(self.phase_started_ms);
        }
    }

    fn finish(&mut self, state: JobState, now_ms: u64) -> Step {
        self.close_phase(now_ms);
        self.step = Step::Finish;
        self.status.state = state;
        self.status.error = self.failure.clone();
        self.status.updated_ms = now_ms;
        Step::Finish
    }

    /// Feeds the outcome of the current step; returns the next step.
    pub fn on(&mut self, outcome: Outcome, now_ms: u64) -> Step {
        match outcome {
            Outcome::Done => self.forward(now_ms),
            Outcome::Failed(reason) => {
                if self.failure.is_none() {
                    self.failure = Some(reason);
                }
                self.backward(now_ms)
            }
            Outcome::Canceled => {
                if self.committed() {
                    // Too late to cancel: keep going.
                    return self.forward(now_ms);
                }
                self.canceled = true;
                self.failure
                    .get_or_insert_with(|| "canceled by request".into());
                self.backward(now_ms)
            }
        }
    }

    fn forward(&mut self, now_ms: u64) -> Step {
        match self.step {
            Step::Precheck => self.enter(Step::PrepareTarget, None, now_ms),
            Step::PrepareTarget => self.enter(Step::Checkpoint, Some(Phase::Checkpoint), now_ms),
            Step::Checkpoint if self.canceled => {
                // The checkpoint call cannot be interrupted; a cancel that
                // arrived meanwhile is honoured now by restoring the original.
                self.step = Step::Transfer;
                return self.backward(now_ms);
            }
            Step::Checkpoint => self.enter(Step::Transfer, Some(Phase::Transfer), now_ms),
            Step::Transfer => self.enter(Step::AwaitRestore, Some(Phase::Restore), now_ms),
            Step::AwaitRestore => self.enter(Step::Commit, Some(Phase::Cleanup), now_ms),
            Step::Commit => return self.finish(JobState::Succeeded, now_ms),
            Step::Abort => {
                let state = if self.canceled {
                    JobState::Canceled
                } else {
                    JobState::Failed
                };
                return self.finish(state, now_ms);
            }
            Step::RollBack => {
                let state = if self.canceled {
                    JobState::Canceled
                } else {
                    JobState::RolledBack
                };
                return self.finish(state, now_ms);
            }
            Step::Finish => {}
        }
        self.step
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
            Step::Commit => return self.finish(JobState::Failed, now_ms),
            Step::Abort => {
                let state = if self.canceled {
                    JobState::Canceled
                } else {
                    JobState::Failed
                };
                return self.finish(state, now_ms);
            }
            // The original could not be restored either.
            Step::RollBack => return self.finish(JobState::Failed, now_ms),
            Step::Finish => {}
        }
        self.step
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

    fn run(m: &mut SourceMachine, outcomes: &[Outcome]) -> Vec<Step> {
        let mut steps = vec![m.step()];
        for (i, o) in outcomes.iter().enumerate() {
            steps.push(m.on(o.clone(), 1_000 + 100 * (i as u64 + 1)));
        }
        steps
    }

    #[test]
    fn happy_path_succeeds_with_timings_per_phase() {
        let mut m = machine();
        let steps = run(&mut m, &vec![Outcome::Done; 6]);
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
    fn failure_before_checkpoint_aborts_without_rollback() {
        let mut m = machine();
        let steps = run(
            &mut m,
            &[
                Outcome::Done,
                Outcome::Failed("target has no image".into()),
                Outcome::Done,
            ],
        );
        assert_eq!(steps[2], Step::Abort);
        assert_eq!(m.status().state, JobState::Failed);
        assert_eq!(m.status().error.as_deref(), Some("target has no image"));
    }

    #[test]
    fn failure_after_checkpoint_rolls_back() {
        for failing_step in [Step::Checkpoint, Step::Transfer, Step::AwaitRestore] {
            let mut m = machine();
            while m.step() != failing_step {
                m.on(Outcome::Done, 2_000);
            }
            assert_eq!(
                m.on(Outcome::Failed("restore failed on b".into()), 2_100),
                Step::RollBack
            );
            assert_eq!(m.on(Outcome::Done, 2_200), Step::Finish);
            assert_eq!(m.status().state, JobState::RolledBack);
            assert_eq!(m.status().error.as_deref(), Some("restore failed on b"));
        }
    }

    #[test]
    fn failed_rollback_is_failed_and_keeps_first_reason() {
        let mut m = machine();
        while m.step() != Step::Transfer {
            m.on(Outcome::Done, 2_000);
        }
        m.on(Outcome::Failed("checksum mismatch".into()), 2_100);
        m.on(Outcome::Failed("restore on source failed".into()), 2_200);
        assert_eq!(m.status().state, JobState::Failed);
        assert_eq!(m.status().error.as_deref(), Some("checksum mismatch"));
    }

    #[test]
    fn cancel_during_checkpoint_rolls_back_after_it() {
        let mut m = machine();
        while m.step() != Step::Checkpoint {
            m.on(Outcome::Done, 2_000);
        }
        // The driver records the cancel, lets the checkpoint finish, then reports both.
        assert_eq!(m.on(Outcome::Canceled, 2_100), Step::RollBack);
        assert_eq!(m.on(Outcome::Done, 2_200), Step::Finish);
        assert_eq!(m.status().state, JobState::Canceled);
    }

    #[test]
    fn cancel_before_freeze_is_canceled_without_rollback() {
        let mut m = machine();
        assert_eq!(m.on(Outcome::Canceled, 1_100), Step::Abort);
        assert_eq!(m.on(Outcome::Done, 1_200), Step::Finish);
        assert_eq!(m.status().state, JobState::Canceled);
    }

    #[test]
    fn cancel_after_commit_is_ignored() {
        let mut m = machine();
        while m.step() != Step::Commit {
            m.on(Outcome::Done, 2_000);
        }
        assert!(m.committed());
        assert_eq!(m.on(Outcome::Canceled, 2_100), Step::Finish);
        assert_eq!(m.status().state, JobState::Succeeded);
    }

    #[test]
    fn frozen_only_between_checkpoint_and_confirmation() {
        let mut m = machine();
        let mut frozen = vec![];
        while m.step() != Step::Finish {
            frozen.push((m.step(), m.frozen()));
            m.on(Outcome::Done, 2_000);
        }
        assert_eq!(
            frozen
                .iter()
                .filter(|(_, f)| *f)
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            [Step::Transfer, Step::AwaitRestore]
        );
    }
}
