//! The target side of a migration: what to do next, what to tell the source
//! and what to publish. The driver in `migration::target` performs each step
//! and feeds back what happened.
//!
//! ```text
//! Precheck -> FetchImage -> Create -> Receive -> ApplyState -> Restore -> AwaitCommit -> Keep -> done
//!     \___________\            |         \            \__________\            \      (succeeded)
//!                Refuse        Refuse      \                TellFailed -> Remove -> done (failed)
//!                  |             \          \_______________________________/
//!             done (failed)       Remove -> done (failed)
//! ```
//! Nothing exists here until `Create` made the volumes and the container
//! (an image fetched for the job stays, as any pulled image would), so an
//! earlier refusal has nothing to undo. After that, anything short of the
//! source's `Commit` removes what was created: the source then still holds
//! (or restores) the original.

use std::collections::BTreeMap;

use super::{Outcome, Report};
use crate::migration::MigrationError;
use crate::mqtt::contract::{JobState, JobStatus, Phase};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetStep {
    /// Check compatibility, name and room; whether the image is here.
    Precheck,
    /// Have the image: ask the source for the layers missing here (if
    /// any), load them, tag the image id with the container's reference.
    FetchImage,
    /// Create the volumes and the container.
    Create,
    /// Answer `Prepared`, then receive and verify the checkpoint stream.
    Receive,
    /// Apply the files and fill the volumes that came with the checkpoint.
    ApplyState,
    /// Place the images, start from them, check the container stays up.
    Restore,
    /// Answer `Restored`, then wait for the source's `Commit`.
    AwaitCommit,
    /// Answer `Committed`; drop the checkpoint images, keep the container.
    Keep,
    /// Answer `Refused` with [`TargetMachine::reason`]; nothing was created.
    Refuse,
    /// Answer `Failed` with [`TargetMachine::reason`], then remove.
    TellFailed,
    /// Remove the container and the volumes created for the job.
    Remove,
    /// Final state reached; publish it and stop.
    Finish,
}

#[derive(Debug)]
pub struct TargetMachine {
    report: Report,
    step: TargetStep,
    failure: Option<MigrationError>,
    /// The status changed since it was last handed out for publishing.
    unpublished: bool,
    /// `Create` ran: there may be something to remove.
    created: bool,
}

impl TargetMachine {
    pub fn new(status: JobStatus, now_ms: u64) -> Self {
        TargetMachine {
            report: Report::start(status, now_ms),
            step: TargetStep::Precheck,
            failure: None,
            unpublished: true,
            created: false,
        }
    }

    pub fn step(&self) -> TargetStep {
        self.step
    }

    pub fn status(&self) -> &JobStatus {
        &self.report.status
    }

    /// The status to publish, once per phase and once at the end.
    pub fn to_publish(&mut self) -> Option<&JobStatus> {
        std::mem::take(&mut self.unpublished).then_some(&self.report.status)
    }

    /// Why the job failed, for the source (`Refused`, `Failed`).
    pub fn reason(&self) -> String {
        self.failure
            .as_ref()
            .map_or_else(String::new, ToString::to_string)
    }

    /// The container's addresses on the source, as its spec tells them.
    pub fn old_addresses(&mut self, addresses: BTreeMap<String, String>) {
        self.report.status.old_addresses = addresses;
    }

    /// The restored container's addresses here.
    pub fn new_addresses(&mut self, addresses: BTreeMap<String, String>) {
        self.report.status.new_addresses = addresses;
    }

    /// Image bytes received on the wire.
    pub fn image_received(&mut self, bytes_wire: u64) {
        self.report.status.bytes_image = bytes_wire;
    }

    /// Bytes of files and volumes applied.
    pub fn state_applied(&mut self, bytes: u64) {
        self.report.status.bytes_state = bytes;
    }

    pub fn received(&mut self, bytes_raw: u64, bytes_wire: u64) {
        self.report.status.bytes_raw = bytes_raw;
        self.report.status.bytes_wire = bytes_wire;
    }

    fn enter(&mut self, step: TargetStep, phase: Option<Phase>, now_ms: u64) -> TargetStep {
        self.report.enter(phase, now_ms);
        self.unpublished |= phase.is_some();
        self.step = step;
        step
    }

    fn finish(&mut self, state: JobState, now_ms: u64) -> TargetStep {
        self.report.finish(state, self.failure.as_ref(), now_ms);
        self.unpublished = true;
        self.step = TargetStep::Finish;
        TargetStep::Finish
    }

    /// Feeds the outcome of the current step; returns the next step.
    pub fn on(&mut self, outcome: Outcome, now_ms: u64) -> TargetStep {
        use TargetStep::*;
        let failed = match outcome {
            Outcome::Failed(e) => {
                self.failure.get_or_insert(e);
                true
            }
            // Only the source cancels; it tells the target by closing.
            Outcome::Done | Outcome::Canceled => false,
        };
        if self.step == Create {
            self.created = true;
        }
        match (self.step, failed) {
            (Precheck, false) => self.enter(FetchImage, None, now_ms),
            (FetchImage, false) => self.enter(Create, None, now_ms),
            (Create, false) => self.enter(Receive, Some(Phase::Transfer), now_ms),
            (Precheck | FetchImage | Create, true) => self.enter(Refuse, None, now_ms),
            (Receive, false) => self.enter(ApplyState, Some(Phase::Restore), now_ms),
            (ApplyState, false) => self.enter(Restore, None, now_ms),
            (Restore, false) => self.enter(AwaitCommit, Some(Phase::Cleanup), now_ms),
            (ApplyState | Restore, true) => self.enter(TellFailed, None, now_ms),
            (AwaitCommit, false) => self.enter(Keep, None, now_ms),
            (Receive | AwaitCommit, true) => self.enter(Remove, None, now_ms),
            // The source committed: the container stays whatever the
            // clean-up of the images says.
            (Keep, _) => self.finish(JobState::Succeeded, now_ms),
            // Telling the source is best effort: it learns from the closed
            // connection otherwise.
            (TellFailed, _) => self.enter(Remove, None, now_ms),
            (Refuse, _) if self.created => self.enter(Remove, None, now_ms),
            (Refuse | Remove, _) => self.finish(JobState::Failed, now_ms),
            (Finish, _) => Finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::contract::Role;
    use TargetStep::*;

    fn machine() -> TargetMachine {
        TargetMachine::new(
            JobStatus::new("j1", "b", Role::Target, "counter", "a", "b", 0),
            1_000,
        )
    }

    fn failed() -> Outcome {
        Outcome::Failed(MigrationError::SourceClosed)
    }

    /// Steps taken when the step at `fail_at` fails and every other is done.
    fn path(fail_at: Option<usize>) -> (Vec<TargetStep>, TargetMachine) {
        let mut m = machine();
        let mut steps = vec![m.step()];
        let mut i = 0;
        while m.step() != Finish {
            let outcome = if Some(i) == fail_at {
                failed()
            } else {
                Outcome::Done
            };
            steps.push(m.on(outcome, 1_000 + 100 * (i as u64 + 1)));
            i += 1;
        }
        (steps, m)
    }

    #[test]
    fn happy_path_keeps_the_container() {
        let (steps, m) = path(None);
        assert_eq!(
            steps,
            [
                Precheck,
                FetchImage,
                Create,
                Receive,
                ApplyState,
                Restore,
                AwaitCommit,
                Keep,
                Finish
            ]
        );
        assert_eq!(m.status().state, JobState::Succeeded);
        assert_eq!(m.status().timings_ms.get(&Phase::Precheck), Some(&300));
        assert_eq!(m.status().timings_ms.get(&Phase::Transfer), Some(&100));
        assert_eq!(m.status().timings_ms.get(&Phase::Restore), Some(&200));
        assert_eq!(m.status().timings_ms.get(&Phase::Cleanup), Some(&200));
    }

    #[test]
    fn every_failure_ends_failed_and_removes_what_was_created() {
        let cases: [(usize, &[TargetStep]); 7] = [
            (0, &[Precheck, Refuse, Finish]),
            (1, &[Precheck, FetchImage, Refuse, Finish]),
            (2, &[Precheck, FetchImage, Create, Refuse, Remove, Finish]),
            (3, &[Precheck, FetchImage, Create, Receive, Remove, Finish]),
            (
                4,
                &[
                    Precheck, FetchImage, Create, Receive, ApplyState, TellFailed, Remove, Finish,
                ],
            ),
            (
                5,
                &[
                    Precheck, FetchImage, Create, Receive, ApplyState, Restore, TellFailed, Remove,
                    Finish,
                ],
            ),
            (
                6,
                &[
                    Precheck,
                    FetchImage,
                    Create,
                    Receive,
                    ApplyState,
                    Restore,
                    AwaitCommit,
                    Remove,
                    Finish,
                ],
            ),
        ];
        for (at, want) in cases {
            let (steps, m) = path(Some(at));
            assert_eq!(steps, want, "failure at step {at}");
            assert_eq!(m.status().state, JobState::Failed);
            assert_eq!(
                m.status().error.as_deref(),
                Some("source closed the connection before committing")
            );
            assert_eq!(m.reason(), "source closed the connection before committing");
        }
    }

    #[test]
    fn a_failure_while_undoing_keeps_the_first_reason() {
        let mut m = machine();
        for _ in 0..3 {
            m.on(Outcome::Done, 1_100);
        }
        m.on(failed(), 1_200);
        assert_eq!(m.step(), Remove);
        m.on(Outcome::Failed(MigrationError::CommitTimeout), 1_300);
        assert_eq!(m.status().state, JobState::Failed);
        assert_eq!(m.reason(), "source closed the connection before committing");
    }

    #[test]
    fn status_is_published_once_per_phase_and_at_the_end() {
        let mut m = machine();
        let mut published = vec![];
        loop {
            if let Some(s) = m.to_publish() {
                published.push((s.phase, s.state));
            }
            if m.step() == Finish {
                break;
            }
            m.on(Outcome::Done, 2_000);
        }
        assert_eq!(
            published,
            [
                (Some(Phase::Precheck), JobState::InProgress),
                (Some(Phase::Transfer), JobState::InProgress),
                (Some(Phase::Restore), JobState::InProgress),
                (Some(Phase::Cleanup), JobState::InProgress),
                (Some(Phase::Cleanup), JobState::Succeeded),
            ]
        );
    }
}
