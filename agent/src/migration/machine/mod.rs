//! The migration's decisions as sans-I/O state machines, one per side: each
//! is told what happened ([`Outcome`]) and answers with the next step and the
//! status to publish. The drivers (`migration::source`, `migration::target`)
//! only perform steps. [`source`] and [`target`] hold the two machines; this
//! module the status bookkeeping both share.

pub mod source;
pub mod target;

pub use source::{SourceMachine, Step};
pub use target::{TargetMachine, TargetStep};

use super::MigrationError;
use crate::mqtt::contract::{JobState, JobStatus, Phase};

/// What happened when the driver performed a step.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Failed(MigrationError),
    /// A cancel won the [`CommitGate`](super::gate::CommitGate) while the
    /// step ran (or before it began). Only the source is canceled.
    Canceled,
}

/// A job's published status and the clock of its current phase.
#[derive(Debug)]
struct Report {
    status: JobStatus,
    phase_started_ms: u64,
}

impl Report {
    /// `in_progress`, in the precheck.
    fn start(mut status: JobStatus, now_ms: u64) -> Self {
        status.state = JobState::InProgress;
        status.phase = Some(Phase::Precheck);
        status.updated_ms = now_ms;
        Report {
            status,
            phase_started_ms: now_ms,
        }
    }

    /// Books the time since the last call to the current phase, then moves
    /// to `phase` (or stays in the current one).
    fn enter(&mut self, phase: Option<Phase>, now_ms: u64) {
        if let Some(current) = self.status.phase {
            *self.status.timings_ms.entry(current).or_insert(0) +=
                now_ms.saturating_sub(self.phase_started_ms);
        }
        if phase.is_some() {
            self.status.phase = phase;
        }
        self.phase_started_ms = now_ms;
        self.status.updated_ms = now_ms;
    }

    fn finish(&mut self, state: JobState, failure: Option<&MigrationError>, now_ms: u64) {
        self.enter(None, now_ms);
        self.status.state = state;
        self.status.error = failure.map(|e| e.to_string());
    }
}
