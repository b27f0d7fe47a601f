//! Retained statuses, latest value wins: the agent's job and node statuses
//! are written here without waiting, and the connection task takes them out
//! whenever the broker can take them. A status that changes while the
//! broker is away is sent once, as its last value; a transfer never waits
//! for the broker.
//!
//! Pure bookkeeping ([`Board`]), no I/O: the connection task tells it what
//! it sent, what the broker acknowledged and when a connection came up.
//! What is republished after a reconnect: every live status (a running
//! job, the node's own status) and every status whose latest value the
//! broker has not acknowledged. A final status, once acknowledged, is
//! forgotten.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// One status to publish, retained, with QoS 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Which value of the topic this is; the broker's acknowledgement of
    /// it confirms the topic only if no newer value was set meanwhile.
    pub version: u64,
}

#[derive(Debug)]
struct Entry {
    payload: Vec<u8>,
    version: u64,
    /// Republished after every reconnect (a running job, the node status).
    live: bool,
    /// Waiting to be handed to the connection.
    dirty: bool,
    /// The broker acknowledged the current version.
    confirmed: bool,
    /// Order of the last change: older changes go out first.
    seq: u64,
}

/// The statuses not yet confirmed by the broker, and the live ones.
#[derive(Debug, Default)]
pub struct Board {
    entries: HashMap<String, Entry>,
    next_seq: u64,
}

impl Board {
    /// A new value for `topic` replaces any value not yet sent.
    pub fn set(&mut self, topic: &str, payload: Vec<u8>, live: bool) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let e = self.entries.entry(topic.to_owned()).or_insert(Entry {
            payload: Vec::new(),
            version: 0,
            live,
            dirty: true,
            confirmed: false,
            seq,
        });
        e.payload = payload;
        e.version += 1;
        e.live = live;
        e.dirty = true;
        e.confirmed = false;
        e.seq = seq;
    }

    /// Up to `max` values to send now, oldest change first; they are no
    /// longer dirty (a reconnect makes them so again if unconfirmed).
    pub fn take(&mut self, max: usize) -> Vec<Outgoing> {
        let mut dirty: Vec<(&String, &mut Entry)> =
            self.entries.iter_mut().filter(|(_, e)| e.dirty).collect();
        dirty.sort_by_key(|(_, e)| e.seq);
        dirty
            .into_iter()
            .take(max)
            .map(|(topic, e)| {
                e.dirty = false;
                Outgoing {
                    topic: topic.clone(),
                    payload: e.payload.clone(),
                    version: e.version,
                }
            })
            .collect()
    }

    /// The broker acknowledged `version` of `topic`.
    pub fn acked(&mut self, topic: &str, version: u64) {
        let Some(e) = self.entries.get_mut(topic) else {
            return;
        };
        if e.version != version {
            return;
        }
        e.confirmed = true;
        if !e.live && !e.dirty {
            self.entries.remove(topic);
        }
    }

    /// A connection came up: what was in flight on the lost one is
    /// unconfirmed, and a broker that restarted without its store, or that
    /// published our Last Will, needs the live statuses again.
    pub fn reconnected(&mut self) {
        for e in self.entries.values_mut() {
            if e.live || !e.confirmed {
                e.dirty = true;
            }
        }
    }

    #[cfg(test)]
    fn has_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }

    /// Whether `topic` is published through the board.
    pub fn owns(&self, topic: &str) -> bool {
        self.entries.contains_key(topic)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The board shared by the publishers and the connection task.
#[derive(Debug, Default)]
pub struct SharedBoard {
    board: Mutex<Board>,
    changed: Notify,
}

impl SharedBoard {
    pub fn set(&self, topic: &str, payload: Vec<u8>, live: bool) {
        self.with(|b| b.set(topic, payload, live));
        self.changed.notify_one();
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Board) -> T) -> T {
        f(&mut self.board.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves after a `set` (also one that happened before the call).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(out: &[Outgoing]) -> Vec<(&str, &[u8])> {
        out.iter()
            .map(|o| (o.topic.as_str(), o.payload.as_slice()))
            .collect()
    }

    #[test]
    fn the_latest_value_wins_and_goes_out_once() {
        let mut b = Board::default();
        for i in 0..1000 {
            b.set("j1", format!("p{i}").into_bytes(), true);
        }
        b.set("j2", b"x".to_vec(), true);
        let out = b.take(10);
        assert_eq!(topics(&out), [("j1", &b"p999"[..]), ("j2", b"x")]);
        assert!(b.take(10).is_empty());
        assert!(!b.has_dirty());
    }

    #[test]
    fn take_respects_the_window_and_the_order_of_changes() {
        let mut b = Board::default();
        b.set("a", b"1".to_vec(), true);
        b.set("b", b"1".to_vec(), true);
        b.set("a", b"2".to_vec(), true);
        let first = b.take(1);
        assert_eq!(topics(&first), [("b", &b"1"[..])]);
        assert_eq!(topics(&b.take(1)), [("a", &b"2"[..])]);
    }

    #[test]
    fn an_acknowledged_final_status_is_forgotten_a_stale_ack_confirms_nothing() {
        let mut b = Board::default();
        b.set("done", b"succeeded".to_vec(), false);
        b.set("run", b"v1".to_vec(), true);
        let out = b.take(10);
        let v_run = out.iter().find(|o| o.topic == "run").unwrap().version;
        b.set("run", b"v2".to_vec(), true);
        b.acked("run", v_run);
        b.acked("done", 1);
        assert!(!b.owns("done"));
        assert!(b.owns("run"));
        // v2 was never sent: still due.
        assert_eq!(topics(&b.take(10)), [("run", &b"v2"[..])]);
    }

    #[test]
    fn a_reconnect_republishes_live_and_unconfirmed_statuses_only() {
        let mut b = Board::default();
        b.set("node", b"online".to_vec(), true);
        b.set("running", b"transfer".to_vec(), true);
        b.set("ended-acked", b"succeeded".to_vec(), false);
        b.set("ended-lost", b"rolled_back".to_vec(), false);
        let out = b.take(10);
        for o in &out {
            if o.topic != "ended-lost" {
                b.acked(&o.topic, o.version);
            }
        }
        // Ended while the broker was away: never sent yet.
        b.set("ended-offline", b"failed".to_vec(), false);
        b.reconnected();
        let mut again: Vec<_> = b.take(10).into_iter().map(|o| o.topic).collect();
        again.sort();
        assert_eq!(again, ["ended-lost", "ended-offline", "node", "running"]);
        for o in ["ended-lost", "ended-offline"] {
            b.acked(o, 1);
        }
        b.reconnected();
        let mut again: Vec<_> = b.take(10).into_iter().map(|o| o.topic).collect();
        again.sort();
        assert_eq!(again, ["node", "running"]);
        assert_eq!(b.len(), 2);
    }
}
