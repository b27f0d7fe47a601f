//! Who may hold a data-port connection while its TLS handshake is pending.
//! Until the handshake ends the peer is anonymous: a bound on these alone
//! lets one host fill it with silent connections and lock every source
//! out. So the bound is per peer address (an IPv6 host owns a whole /64,
//! so that is one peer), under a larger bound for all peers together.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Handshakes one peer address may have pending at once: a source opens
/// one connection per job, and a node runs few jobs at a time.
pub const MAX_PENDING_PER_PEER: usize = 4;
/// Handshakes pending at once from all peers: each costs a socket for at
/// most the handshake timeout.
pub const MAX_PENDING_TOTAL: usize = 64;

/// The pending handshakes, by peer.
#[derive(Debug, Clone)]
pub struct Handshakes {
    state: Arc<Mutex<State>>,
    per_peer: usize,
    total: usize,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
    refused: u64,
}

/// Why a connection was closed before its handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("peer {peer} already has {limit} data connections in their TLS handshake")]
    Peer { peer: IpAddr, limit: usize },
    #[error("{limit} data connections are in their TLS handshake")]
    Total { limit: usize },
}

/// One admitted handshake; dropping it frees its place.
#[derive(Debug)]
pub struct Pending {
    state: Arc<Mutex<State>>,
    peer: IpAddr,
}

/// The address a peer's limit counts under: IPv4 (also mapped into IPv6)
/// as it is, IPv6 by its /64.
pub fn peer_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes::new(MAX_PENDING_PER_PEER, MAX_PENDING_TOTAL)
    }
}

impl Handshakes {
    pub fn new(per_peer: usize, total: usize) -> Handshakes {
        Handshakes {
            state: Arc::default(),
            per_peer,
            total,
        }
    }

    /// A place for a handshake from `addr`, or why not. The second value
    /// says whether to log the refusal: the 1st, 2nd, 4th, 8th... of all
    /// refusals, so a flood cannot fill the journal.
    pub fn admit(&self, addr: IpAddr) -> Result<Pending, (Refused, bool)> {
        let peer = peer_key(addr);
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = s.by_peer.get(&peer).copied().unwrap_or(0);
        let refused = if mine >= self.per_peer {
            Some(Refused::Peer {
                peer,
                limit: self.per_peer,
            })
        } else if s.total >= self.total {
            Some(Refused::Total { limit: self.total })
        } else {
            None
        };
        if let Some(r) = refused {
            s.refused += 1;
            return Err((r, s.refused.is_power_of_two()));
        }
        s.total += 1;
        *s.by_peer.entry(peer).or_default() += 1;
        Ok(Pending {
            state: self.state.clone(),
            peer,
        })
    }

    /// Handshakes pending now (for tests and logs).
    pub fn pending(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_peer_cannot_take_the_places_of_others() {
        let gate = Handshakes::new(4, 6);
        let flood: Vec<Pending> = (0..4)
            .map(|_| gate.admit(ip("127.0.0.50")).unwrap())
            .collect();
        let (refused, _) = gate.admit(ip("127.0.0.50")).unwrap_err();
        assert_eq!(
            refused,
            Refused::Peer {
                peer: ip("127.0.0.50"),
                limit: 4
            }
        );
        let a = gate.admit(ip("127.0.0.11")).unwrap();
        let b = gate.admit(ip("127.0.0.12")).unwrap();
        // The total bound holds for everyone.
        let (refused, _) = gate.admit(ip("127.0.0.13")).unwrap_err();
        assert_eq!(refused, Refused::Total { limit: 6 });
        drop(a);
        let _c = gate.admit(ip("127.0.0.13")).unwrap();
        drop(flood);
        assert_eq!(gate.pending(), 2);
        drop(b);
        let again: Vec<Pending> = (0..4)
            .map(|_| gate.admit(ip("127.0.0.50")).unwrap())
            .collect();
        assert_eq!(gate.pending(), 5);
        drop(again);
        assert_eq!(gate.pending(), 1);
    }

    #[test]
    fn an_ipv6_host_is_one_peer_per_64() {
        let gate = Handshakes::new(2, 10);
        let _a = gate.admit(ip("2001:db8::1")).unwrap();
        let _b = gate.admit(ip("2001:db8::ffff:2")).unwrap();
        assert!(matches!(
            gate.admit(ip("2001:db8::3")),
            Err((Refused::Peer { .. }, _))
        ));
        assert!(gate.admit(ip("2001:db8:0:1::1")).is_ok());
        assert_eq!(peer_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn refusals_are_logged_ever_more_rarely() {
        let gate = Handshakes::new(0, 10);
        let logged: Vec<u32> = (1..=20u32)
            .filter(|_| gate.admit(ip("10.0.0.1")).unwrap_err().1)
            .collect();
        assert_eq!(logged, vec![1, 2, 4, 8, 16]);
    }
}
