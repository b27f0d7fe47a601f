//! The point of no return, decided in one place. A cancel (from a fleet
//! manager or the drain) and the commit (the source read `Restored`) can
//! happen at the same instant on two tasks; [`CommitGate`] settles which one
//! came first, once, and both sides learn the answer: a cancel that lost is
//! refused, a commit that lost makes the source roll back.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Open,
    Canceled,
    Committed,
}

/// A cancel arrived after the target confirmed the restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("past the point of no return: the target confirmed the restore")]
pub struct AlreadyCommitted;

#[derive(Debug)]
pub struct CommitGate {
    decision: Mutex<Decision>,
    /// Fired once a cancel wins, so steps that can stop early do.
    token: CancellationToken,
}

impl Default for CommitGate {
    fn default() -> Self {
        Self::new()
    }
}

impl CommitGate {
    pub fn new() -> Self {
        CommitGate {
            decision: Mutex::new(Decision::Open),
            token: CancellationToken::new(),
        }
    }

    fn decide(&self, want: Decision) -> Decision {
        let mut d = self.decision.lock().unwrap_or_else(|p| p.into_inner());
        if *d == Decision::Open {
            *d = want;
            if want == Decision::Canceled {
                self.token.cancel();
            }
        }
        *d
    }

    /// Cancels unless the commit came first. A second cancel is fine.
    pub fn try_cancel(&self) -> Result<(), AlreadyCommitted> {
        match self.decide(Decision::Canceled) {
            Decision::Committed => Err(AlreadyCommitted),
            _ => Ok(()),
        }
    }

    /// Passes the point of no return unless a cancel came first.
    pub fn try_commit(&self) -> bool {
        self.decide(Decision::Committed) == Decision::Committed
    }

    pub fn is_canceled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once a cancel won.
    pub async fn canceled(&self) {
        self.token.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[test]
    fn cancel_and_commit_racing_on_two_threads_have_exactly_one_winner() {
        let (mut cancels, mut commits) = (0, 0);
        for _ in 0..2_000 {
            let gate = Arc::new(CommitGate::new());
            let start = Arc::new(Barrier::new(2));
            let canceler = {
                let (gate, start) = (gate.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    gate.try_cancel()
                })
            };
            start.wait();
            let committed = gate.try_commit();
            let canceled = canceler.join().unwrap();
            // Exactly one wins, and the loser is told so.
            assert_eq!(committed, canceled.is_err(), "both or neither won");
            assert_eq!(gate.is_canceled(), canceled.is_ok());
            // Asking again gives the same answer.
            assert_eq!(gate.try_commit(), committed);
            assert_eq!(gate.try_cancel().is_ok(), canceled.is_ok());
            if committed {
                commits += 1
            } else {
                cancels += 1
            }
        }
        println!("cancel won {cancels}, commit won {commits} of 2000 races");
    }

    #[tokio::test]
    async fn a_winning_cancel_wakes_the_waiting_step() {
        let gate = Arc::new(CommitGate::new());
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.canceled().await }
        });
        assert_eq!(gate.try_cancel(), Ok(()));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(!gate.try_commit());
    }
}
