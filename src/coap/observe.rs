//! Observers of `/d/{device}/desired` (RFC 7641) and what each is owed.
//!
//! Pure: the server holds a [`Registry`] behind a lock and does the sending.
//!
//! An observer is one client endpoint observing one device's desired document; a new
//! registration from the same endpoint for the same device replaces the old one (RFC 7641
//! §4.1), with its new token. Each observer remembers the newest document change (`seq`) it
//! was sent and keeps at most one unsent document, the newest, so a burst of changes costs one
//! notification and memory stays bounded by the number of observers.
//!
//! **Registration race.** The server reads the document from the store between
//! [`Registry::begin`] and [`Registry::complete`]. A change committed in between may be
//! announced through [`Registry::changed`] before the registration completes; the pending
//! observer keeps it, and `complete` answers with whichever of the two documents is newer.
//!
//! **Observe numbers** come from one registry-wide 24-bit counter, assigned under the lock
//! in the order the documents were chosen, so a client that orders what it receives by
//! Observe number (RFC 7641 §3.4) ends with the newest document even when UDP reorders the
//! response and a notification.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::model::{DesiredDoc, DeviceKey, Format};

/// Observe numbers are 24-bit (RFC 7641 §4.4).
const OBSERVE_MASK: u32 = 0x00ff_ffff;

/// When the registry is full, a registration older than this may be evicted for a new one.
/// Notifications are non-confirmable, so the server never learns that a client went away
/// silently; this lets the table heal while never disturbing a recent observer.
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A notification to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub peer: SocketAddr,
    pub token: Vec<u8>,
    pub format: Format,
    pub observe: u32,
    pub mid: u16,
    pub doc: DesiredDoc,
}

#[derive(Debug)]
struct Observer {
    token: Vec<u8>,
    format: Format,
    registered_at: Instant,
    /// False between [`Registry::begin`] and [`Registry::complete`].
    active: bool,
    /// The newest change sent (0: none yet).
    sent_seq: i64,
    /// The newest change not yet sent.
    unsent: Option<DesiredDoc>,
    /// Message id of the last notification, so a RST to it can cancel the observation.
    last_mid: Option<u16>,
}

/// Who observes which device. See the module documentation.
#[derive(Debug)]
pub struct Registry {
    /// By device, then peer: one device's observers are a range.
    observers: BTreeMap<(DeviceKey, SocketAddr), Observer>,
    capacity: usize,
    next_observe: u32,
}

impl Registry {
    pub fn new(capacity: usize) -> Registry {
        Registry {
            observers: BTreeMap::new(),
            capacity,
            next_observe: 2,
        }
    }

    pub fn len(&self) -> usize {
        self.observers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.observers.is_empty()
    }

    /// Starts a registration (GET with Observe = 0), replacing any earlier one of this peer
    /// for this device. Returns false when the registry is full: the request is then
    /// answered without registering.
    pub fn begin(
        &mut self,
        peer: SocketAddr,
        device: DeviceKey,
        token: Vec<u8>,
        format: Format,
        now: Instant,
    ) -> bool {
        let key = (device, peer);
        if !self.observers.contains_key(&key) && self.observers.len() >= self.capacity {
            let stalest = self
                .observers
                .iter()
                .min_by_key(|(_, o)| o.registered_at)
                .filter(|(_, o)| now.duration_since(o.registered_at) >= STALE_AFTER)
                .map(|(k, _)| k.clone());
            match stalest {
                Some(old) => {
                    self.observers.remove(&old);
                }
                None => return false,
            }
        }
        let observer = Observer {
            token,
            format,
            registered_at: now,
            active: false,
            sent_seq: 0,
            unsent: None,
            last_mid: None,
        };
        self.observers.insert(key, observer);
        true
    }

    /// Finishes a registration with the document read from the store. Returns the Observe
    /// number and the document to answer with (the newer of `stored` and any change seen
    /// meanwhile; `None` if the device has none yet), or `None` when this registration was
    /// replaced or cancelled meanwhile (answer without Observe).
    pub fn complete(
        &mut self,
        peer: SocketAddr,
        device: &DeviceKey,
        token: &[u8],
        stored: Option<DesiredDoc>,
    ) -> Option<(u32, Option<DesiredDoc>)> {
        let observer = self.observers.get_mut(&(device.clone(), peer))?;
        if observer.token != token {
            return None;
        }
        let doc = match (stored, observer.unsent.take()) {
            (Some(s), Some(u)) => Some(if u.seq > s.seq { u } else { s }),
            (s, u) => s.or(u),
        };
        observer.active = true;
        observer.sent_seq = observer.sent_seq.max(doc.as_ref().map_or(0, |d| d.seq));
        Some((self.take_observe_number(), doc))
    }

    /// Drops a registration that could not be completed (the store failed).
    pub fn cancel(&mut self, peer: SocketAddr, device: &DeviceKey, token: &[u8]) {
        let key = (device.clone(), peer);
        if self.observers.get(&key).is_some_and(|o| o.token == token) {
            self.observers.remove(&key);
        }
    }

    /// GET with Observe = 1: this peer stops observing this device.
    pub fn deregister(&mut self, peer: SocketAddr, device: &DeviceKey) -> bool {
        self.observers.remove(&(device.clone(), peer)).is_some()
    }

    /// A RST from `peer` answering the notification with message id `mid`: the client no
    /// longer wants it (RFC 7641 §3.6).
    pub fn reset(&mut self, peer: SocketAddr, mid: u16) -> bool {
        let key = self
            .observers
            .iter()
            .find(|((_, p), o)| *p == peer && o.last_mid == Some(mid))
            .map(|(k, _)| k.clone());
        key.is_some_and(|k| self.observers.remove(&k).is_some())
    }

    /// Records a change of a device's desired document. Returns true when an active
    /// observer now has a notification due ([`Registry::take_due`]).
    pub fn changed(&mut self, doc: &DesiredDoc) -> bool {
        let from = (
            doc.device.clone(),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        );
        let mut due = false;
        for ((device, _), observer) in self.observers.range_mut(from..) {
            if *device != doc.device {
                break;
            }
            let newest = observer
                .unsent
                .as_ref()
                .map_or(observer.sent_seq, |u| u.seq.max(observer.sent_seq));
            if doc.seq > newest {
                observer.unsent = Some(doc.clone());
                due |= observer.active;
            }
        }
        due
    }

    /// Takes every notification due, giving each a message id from `next_mid`.
    pub fn take_due(&mut self, mut next_mid: impl FnMut() -> u16) -> Vec<Notification> {
        let mut out = Vec::new();
        for ((_, peer), observer) in &mut self.observers {
            if !observer.active {
                continue;
            }
            let Some(doc) = observer.unsent.take() else {
                continue;
            };
            let mid = next_mid();
            observer.sent_seq = doc.seq;
            observer.last_mid = Some(mid);
            self.next_observe = (self.next_observe + 1) & OBSERVE_MASK;
            out.push(Notification {
                peer: *peer,
                token: observer.token.clone(),
                format: observer.format,
                observe: self.next_observe,
                mid,
                doc,
            });
        }
        out
    }

    fn take_observe_number(&mut self) -> u32 {
        self.next_observe = (self.next_observe + 1) & OBSERVE_MASK;
        self.next_observe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn dev(key: &str) -> DeviceKey {
        DeviceKey::parse(key).unwrap()
    }

    fn doc(key: &str, seq: i64) -> DesiredDoc {
        DesiredDoc {
            device: dev(key),
            doc: json!({ "seq": seq }),
            version: seq,
            seq,
        }
    }

    fn mids() -> impl FnMut() -> u16 {
        let mut n = 100;
        move || {
            n += 1;
            n
        }
    }

    fn register(r: &mut Registry, port: u16, key: &str, stored: Option<DesiredDoc>) -> u32 {
        assert!(r.begin(
            peer(port),
            dev(key),
            vec![port as u8],
            Format::Json,
            Instant::now()
        ));
        r.complete(peer(port), &dev(key), &[port as u8], stored)
            .unwrap()
            .0
    }

    #[test]
    fn observers_of_the_changed_device_are_notified_once_with_increasing_numbers() {
        let mut r = Registry::new(10);
        let first = register(&mut r, 1, "a", Some(doc("a", 1)));
        register(&mut r, 2, "a", None);
        register(&mut r, 3, "b", None);
        assert!(r.changed(&doc("a", 2)));
        let due = r.take_due(mids());
        assert_eq!(due.len(), 2);
        assert!(due.iter().all(|n| n.doc.seq == 2 && n.observe > first));
        assert_eq!(due[0].token, vec![1]);
        assert_ne!(due[0].mid, due[1].mid);
        assert!(r.take_due(mids()).is_empty());
        // An old change announced again (the downlink re-reads by seq) is not re-sent.
        assert!(!r.changed(&doc("a", 2)));
        assert!(!r.changed(&doc("a", 1)));
    }

    #[test]
    fn a_burst_of_changes_costs_one_notification_with_the_newest() {
        let mut r = Registry::new(10);
        register(&mut r, 1, "a", None);
        for seq in 1..=5 {
            r.changed(&doc("a", seq));
        }
        let due = r.take_due(mids());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].doc.seq, 5);
    }

    #[test]
    fn a_change_during_registration_is_not_lost() {
        let mut r = Registry::new(10);
        assert!(r.begin(peer(1), dev("a"), vec![7], Format::Cbor, Instant::now()));
        // Announced before the registration completed: kept, not sent.
        assert!(!r.changed(&doc("a", 4)));
        assert!(r.take_due(mids()).is_empty());
        let (_, answer) = r
            .complete(peer(1), &dev("a"), &[7], Some(doc("a", 3)))
            .unwrap();
        assert_eq!(answer.unwrap().seq, 4);
        // And if the store had the newer one, that is the answer.
        assert!(r.begin(peer(2), dev("a"), vec![8], Format::Json, Instant::now()));
        r.changed(&doc("a", 4));
        let (_, answer) = r
            .complete(peer(2), &dev("a"), &[8], Some(doc("a", 5)))
            .unwrap();
        assert_eq!(answer.unwrap().seq, 5);
        assert!(r.take_due(mids()).is_empty());
    }

    #[test]
    fn re_registration_replaces_and_an_outdated_completion_gets_no_observe() {
        let mut r = Registry::new(10);
        assert!(r.begin(peer(1), dev("a"), vec![1], Format::Json, Instant::now()));
        assert!(r.begin(peer(1), dev("a"), vec![2], Format::Cbor, Instant::now()));
        assert_eq!(r.len(), 1);
        assert!(r.complete(peer(1), &dev("a"), &[1], None).is_none());
        assert!(r.complete(peer(1), &dev("a"), &[2], None).is_some());
        r.changed(&doc("a", 1));
        let due = r.take_due(mids());
        assert_eq!(
            (due[0].token.clone(), due[0].format),
            (vec![2], Format::Cbor)
        );
    }

    #[test]
    fn deregistration_reset_and_cancel_remove_the_observer() {
        let mut r = Registry::new(10);
        register(&mut r, 1, "a", None);
        assert!(r.deregister(peer(1), &dev("a")));
        assert!(!r.deregister(peer(1), &dev("a")));

        register(&mut r, 1, "a", None);
        r.changed(&doc("a", 1));
        let mid = r.take_due(mids())[0].mid;
        assert!(
            !r.reset(peer(2), mid),
            "a RST from another peer changes nothing"
        );
        assert!(!r.reset(peer(1), mid.wrapping_add(1)));
        assert!(r.reset(peer(1), mid));
        assert!(r.is_empty());

        assert!(r.begin(peer(1), dev("a"), vec![1], Format::Json, Instant::now()));
        r.cancel(peer(1), &dev("a"), &[9]);
        assert_eq!(
            r.len(),
            1,
            "cancel of another token leaves the registration"
        );
        r.cancel(peer(1), &dev("a"), &[1]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_full_registry_refuses_unless_a_registration_is_stale() {
        let t0 = Instant::now();
        let mut r = Registry::new(2);
        assert!(r.begin(peer(1), dev("a"), vec![1], Format::Json, t0));
        assert!(r.begin(
            peer(2),
            dev("a"),
            vec![2],
            Format::Json,
            t0 + Duration::from_secs(1)
        ));
        assert!(!r.begin(
            peer(3),
            dev("a"),
            vec![3],
            Format::Json,
            t0 + Duration::from_secs(2)
        ));
        // Re-registering an existing observer is always possible.
        assert!(r.begin(
            peer(2),
            dev("a"),
            vec![4],
            Format::Json,
            t0 + Duration::from_secs(2)
        ));
        // A day later the oldest registration makes room.
        assert!(r.begin(peer(3), dev("a"), vec![3], Format::Json, t0 + STALE_AFTER));
        assert_eq!(r.len(), 2);
        assert!(r.complete(peer(1), &dev("a"), &[1], None).is_none());
    }

    #[test]
    fn observe_numbers_wrap_at_24_bits() {
        let mut r = Registry::new(1);
        r.next_observe = OBSERVE_MASK;
        assert_eq!(register(&mut r, 1, "a", None), 0);
    }
}
