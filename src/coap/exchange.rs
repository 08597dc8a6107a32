//! Message deduplication (RFC 7252 §4.5): which requests were already seen from a peer.
//!
//! Pure: the caller passes the current [`Instant`], so expiry is tested without sleeping.
//!
//! A request is known by its peer address and message id. A confirmable one is remembered for
//! [`EXCHANGE_LIFETIME`] together with the response that was sent for it, so a retransmission
//! is answered again with the very same bytes instead of being applied twice; while the first
//! copy is still being handled, retransmissions are ignored (the response is on its way). A
//! non-confirmable one is remembered for [`NON_LIFETIME`] and its duplicates are dropped.
//!
//! The cache holds at most `capacity` entries; when full, the oldest goes first. Clients
//! retransmit within `MAX_TRANSMIT_SPAN` (45 s), far less than the lifetime, so evicting the
//! oldest entries under heavy load costs deduplication only for exchanges that are already
//! practically over.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 7252 §4.8.2 EXCHANGE_LIFETIME with the default transmission parameters: how long a
/// confirmable message id may still be retransmitted.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// RFC 7252 §4.8.2 NON_LIFETIME: how long a non-confirmable message id may still be repeated.
pub const NON_LIFETIME: Duration = Duration::from_secs(145);

type Key = (SocketAddr, u16);

/// What to do with a request, given what was seen before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// First time seen: handle it, then call [`Exchanges::answered`] or [`Exchanges::forget`].
    New,
    /// A retransmission of a confirmable request still being handled: ignore it.
    InProgress,
    /// A retransmission of a confirmable request already answered: send these bytes again.
    Replay(Vec<u8>),
    /// A repeated non-confirmable request: drop it.
    Duplicate,
}

#[derive(Debug)]
enum State {
    InProgress,
    Answered(Vec<u8>),
    /// A non-confirmable request: nothing to replay.
    Seen,
}

#[derive(Debug)]
struct Entry {
    /// Position in [`Exchanges::order`].
    order: u64,
    at: Instant,
    state: State,
}

impl Entry {
    fn lifetime(&self) -> Duration {
        match self.state {
            State::Seen => NON_LIFETIME,
            State::InProgress | State::Answered(_) => EXCHANGE_LIFETIME,
        }
    }
}

/// The deduplication cache. See the module documentation.
#[derive(Debug)]
pub struct Exchanges {
    entries: HashMap<Key, Entry>,
    /// Entries by age, oldest first, for expiry and eviction.
    order: BTreeMap<u64, Key>,
    next_order: u64,
    capacity: usize,
}

impl Exchanges {
    pub fn new(capacity: usize) -> Exchanges {
        Exchanges {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_order: 0,
            capacity: capacity.max(1),
        }
    }

    /// Looks a request up and, if it is new, records it.
    pub fn check(&mut self, peer: SocketAddr, mid: u16, confirmable: bool, now: Instant) -> Check {
        self.expire(now);
        let key = (peer, mid);
        if let Some(entry) = self.entries.get(&key) {
            if now.duration_since(entry.at) < entry.lifetime() {
                return match &entry.state {
                    State::InProgress => Check::InProgress,
                    State::Answered(bytes) => Check::Replay(bytes.clone()),
                    State::Seen => Check::Duplicate,
                };
            }
            self.remove(key);
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        let order = self.next_order;
        self.next_order += 1;
        let state = if confirmable {
            State::InProgress
        } else {
            State::Seen
        };
        self.entries.insert(
            key,
            Entry {
                order,
                at: now,
                state,
            },
        );
        self.order.insert(order, key);
        Check::New
    }

    /// Records the response sent for a confirmable request, for its retransmissions.
    pub fn answered(&mut self, peer: SocketAddr, mid: u16, response: Vec<u8>) {
        if let Some(entry) = self.entries.get_mut(&(peer, mid))
            && matches!(entry.state, State::InProgress)
        {
            entry.state = State::Answered(response);
        }
    }

    /// Forgets a confirmable request, so that a retransmission is handled afresh: for safe
    /// requests (GET), whose responses are not worth keeping, and for "try again later"
    /// answers. Non-confirmable entries stay, so their duplicates are still dropped.
    pub fn forget(&mut self, peer: SocketAddr, mid: u16) {
        if self
            .entries
            .get(&(peer, mid))
            .is_some_and(|e| !matches!(e.state, State::Seen))
        {
            self.remove((peer, mid));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove(&mut self, key: Key) {
        if let Some(entry) = self.entries.remove(&key) {
            self.order.remove(&entry.order);
        }
    }

    /// Drops entries older than the longest lifetime, oldest first.
    fn expire(&mut self, now: Instant) {
        while let Some((_, key)) = self.order.first_key_value() {
            let key = *key;
            let expired = self
                .entries
                .get(&key)
                .is_none_or(|e| now.duration_since(e.at) >= EXCHANGE_LIFETIME);
            if !expired {
                break;
            }
            self.order.pop_first();
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn a_confirmable_retransmission_is_ignored_while_handled_then_replayed() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(10);
        assert_eq!(x.check(peer(1), 7, true, t0), Check::New);
        assert_eq!(
            x.check(peer(1), 7, true, t0 + Duration::from_secs(2)),
            Check::InProgress
        );
        x.answered(peer(1), 7, vec![1, 2, 3]);
        assert_eq!(
            x.check(peer(1), 7, true, t0 + Duration::from_secs(4)),
            Check::Replay(vec![1, 2, 3])
        );
        // Another peer, or another message id, is another exchange.
        assert_eq!(x.check(peer(2), 7, true, t0), Check::New);
        assert_eq!(x.check(peer(1), 8, true, t0), Check::New);
    }

    #[test]
    fn entries_expire_after_their_lifetime() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(10);
        assert_eq!(x.check(peer(1), 1, true, t0), Check::New);
        x.answered(peer(1), 1, vec![9]);
        assert_eq!(x.check(peer(1), 2, false, t0), Check::New);
        let just_before_non = t0 + NON_LIFETIME - Duration::from_millis(1);
        assert_eq!(
            x.check(peer(1), 2, false, just_before_non),
            Check::Duplicate
        );
        assert_eq!(x.check(peer(1), 2, false, t0 + NON_LIFETIME), Check::New);
        let just_before = t0 + EXCHANGE_LIFETIME - Duration::from_millis(1);
        assert_eq!(
            x.check(peer(1), 1, true, just_before),
            Check::Replay(vec![9])
        );
        assert_eq!(
            x.check(peer(1), 1, true, t0 + EXCHANGE_LIFETIME),
            Check::New
        );
    }

    #[test]
    fn a_full_cache_evicts_the_oldest_entry() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(3);
        for mid in 0..3 {
            assert_eq!(x.check(peer(1), mid, true, t0), Check::New);
            x.answered(peer(1), mid, vec![mid as u8]);
        }
        assert_eq!(x.check(peer(1), 3, true, t0), Check::New);
        assert_eq!(x.len(), 3);
        assert_eq!(x.check(peer(1), 1, true, t0), Check::Replay(vec![1]));
        // Message id 0 was evicted: it counts as new (and now evicts 2, the oldest left).
        assert_eq!(x.check(peer(1), 0, true, t0), Check::New);
        assert_eq!(x.len(), 3);
    }

    #[test]
    fn forgotten_requests_are_handled_again_but_non_duplicates_stay_dropped() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(10);
        assert_eq!(x.check(peer(1), 5, true, t0), Check::New);
        x.forget(peer(1), 5);
        assert_eq!(x.check(peer(1), 5, true, t0), Check::New);
        assert_eq!(x.check(peer(1), 6, false, t0), Check::New);
        x.forget(peer(1), 6);
        assert_eq!(x.check(peer(1), 6, false, t0), Check::Duplicate);
    }

    #[test]
    fn an_answer_for_an_evicted_entry_is_not_recorded() {
        let t0 = Instant::now();
        let mut x = Exchanges::new(1);
        assert_eq!(x.check(peer(1), 1, true, t0), Check::New);
        assert_eq!(x.check(peer(1), 2, true, t0), Check::New);
        x.answered(peer(1), 1, vec![1]);
        assert_eq!(x.len(), 1);
        assert_eq!(x.check(peer(1), 2, true, t0), Check::InProgress);
    }
}
