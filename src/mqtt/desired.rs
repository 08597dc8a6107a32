//! Which desired publish did the broker just acknowledge? Matching rumqttc's packet ids to
//! our documents.
//!
//! Pure: a state machine fed by the driver, which owns the only copy.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` in the order publishes leave its queue, and a
//! PUBACK names only the pkid. So the driver registers each desired publish as it hands it to
//! rumqttc, and the n-th reported id belongs to the n-th registration. When the connection
//! drops, the driver removes our publishes from rumqttc's queue of things to resend and the
//! tracker forgets everything ([`Tracker::reset`]): a forgotten publish is never recorded as
//! delivered, and the downlink publishes it again (retained, so a repeat is harmless). A wrong
//! match would record the wrong document as delivered, which is the one thing this must never
//! do.

use std::collections::{HashMap, VecDeque};

use crate::model::DeviceKey;

/// A desired document acknowledged by the broker.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub device: DeviceKey,
    pub seq: i64,
}

#[derive(Debug, Default)]
pub struct Tracker {
    /// Handed to rumqttc, not yet given a packet id; oldest first.
    awaiting: VecDeque<Published>,
    /// Sent, waiting for the broker's PUBACK.
    in_flight: HashMap<u16, Published>,
}

impl Tracker {
    /// A publish was handed to rumqttc.
    pub fn handed(&mut self, p: Published) {
        self.awaiting.push_back(p);
    }

    /// The last publish handed over did not make it into rumqttc's queue after all.
    pub fn take_back(&mut self) {
        self.awaiting.pop_back();
    }

    /// rumqttc sent a publish with this id.
    pub fn sent(&mut self, pkid: u16) {
        if let Some(p) = self.awaiting.pop_front() {
            self.in_flight.insert(pkid, p);
        }
    }

    /// The broker acknowledged a publish: which document, if it was one of ours.
    pub fn acknowledged(&mut self, pkid: u16) -> Option<Published> {
        self.in_flight.remove(&pkid)
    }

    /// The connection dropped: forget every match.
    pub fn reset(&mut self) {
        self.awaiting.clear();
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(device: &str, seq: i64) -> Published {
        Published {
            device: DeviceKey::parse(device).unwrap(),
            seq,
        }
    }

    #[test]
    fn ids_are_matched_to_publishes_in_order() {
        let mut t = Tracker::default();
        t.handed(p("a", 1));
        t.handed(p("b", 2));
        t.sent(10);
        t.sent(11);
        assert_eq!(t.acknowledged(11), Some(p("b", 2)));
        assert_eq!(t.acknowledged(10), Some(p("a", 1)));
        assert_eq!(t.acknowledged(10), None, "once only");
        assert_eq!(t.acknowledged(99), None, "not ours");
    }

    #[test]
    fn after_a_drop_nothing_of_the_old_connection_is_matched() {
        let mut t = Tracker::default();
        t.handed(p("a", 1));
        t.handed(p("b", 2));
        t.sent(10);
        t.reset();
        t.handed(p("c", 3));
        t.sent(10);
        assert_eq!(
            t.acknowledged(10),
            Some(p("c", 3)),
            "the new publish, not the old one"
        );
        assert_eq!(t.acknowledged(11), None);
    }

    #[test]
    fn a_publish_taken_back_is_not_matched() {
        let mut t = Tracker::default();
        t.handed(p("a", 1));
        t.handed(p("b", 2));
        t.take_back();
        t.sent(5);
        t.sent(6);
        assert_eq!(t.acknowledged(5), Some(p("a", 1)));
        assert_eq!(t.acknowledged(6), None);
    }
}
