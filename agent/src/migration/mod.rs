//! Migration: every decision in pure code, and the drivers that act on it.
//!
//! - [`machine`]: the source's and the target's state machines (what to do
//!   next, when to roll back, what to report), without I/O.
//! - [`check`]: the pure checks: compatibility, readiness, identity, room.
//! - [`placement`]: which node a job for `"auto"` or a list goes to.
//! - [`gate`]: the point of no return, settled against a cancel in one place.
//! - [`registry`]: the jobs running on this node and the peers' statuses.
//! - [`precopy`]: rounds of page deltas while the container runs, and
//!   when to stop them.
//! - [`protocol`]: the control conversation between the two agents.
//! - [`journal`]: in-flight jobs on disk; [`recovery`]: what to do with
//!   them after a restart (a pure decision table).
//! - [`source`], [`target`]: the drivers that perform the machines' steps.
//! - [`node`]: what the drivers need of the node they run on, including the
//!   two seams unit tests replace (status reporting, dialing a peer).

pub mod check;
mod error;
pub mod gate;
pub mod journal;
pub mod machine;
pub mod node;
pub mod placement;
pub mod precopy;
pub mod protocol;
pub mod recovery;
pub mod registry;
pub mod source;
pub mod target;
#[cfg(test)]
pub(crate) mod testing;

use std::time::{SystemTime, UNIX_EPOCH};

pub use check::CheckError;
pub use error::{MigrationError, Unconfirmed};
pub use node::{Conn, Dial, MqttReporter, Node, Reporter, TcpDialer, Timeouts};
pub use registry::{CancelError, JobGuard, JobRegistry, Peers, RegisterError};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The checkpoint's name in both engines: derived from the job, so a retry
/// never collides with a leftover of another job.
pub fn checkpoint_name(job_id: &str) -> String {
    format!("ferry-{job_id}")
}
