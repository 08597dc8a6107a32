//! The metrics' words: label sets, label values, and histogram buckets. A fixed vocabulary,
//! so no label's cardinality grows with what devices send.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::exponential_buckets;

use crate::health::LaneState;
use crate::model::{Origin, RejectCause};

/// The transports that ingest, as label words; indexes of the pre-resolved counters.
pub(super) const TRANSPORTS: [&str; 2] = ["mqtt", "coap"];

/// Message kinds, as label words; indexes of the pre-resolved counters.
pub(super) const KINDS: [&str; 2] = ["state", "telemetry"];

/// The outbox's row states, as the database spells them.
pub(super) const OUTBOX_STATES: [&str; 4] = ["pending", "in_flight", "done", "dead"];

/// Every lane state, in the order `nngw_cloud_lane_state` lists them.
pub(super) const LANE_STATES: [LaneState; 5] = [
    LaneState::Disabled,
    LaneState::Online,
    LaneState::BackingOff,
    LaneState::Offline,
    LaneState::AuthFailed,
];

/// A lane state as a label value (snake case, unlike [`LaneState::as_str`], which is for
/// people).
pub(super) fn lane_word(state: LaneState) -> &'static str {
    match state {
        LaneState::Disabled => "disabled",
        LaneState::Online => "online",
        LaneState::BackingOff => "backing_off",
        LaneState::Offline => "offline",
        LaneState::AuthFailed => "auth_failed",
    }
}

pub(super) fn transport_index(origin: Origin) -> Option<usize> {
    match origin {
        Origin::Mqtt => Some(0),
        Origin::Coap => Some(1),
        Origin::Golioth | Origin::NetNeural | Origin::Local => None,
    }
}

pub(super) fn cause_index(cause: RejectCause) -> usize {
    RejectCause::ALL
        .iter()
        .position(|c| *c == cause)
        .unwrap_or_default()
}

/// Seconds: one group commit (0.5 ms to 8 s; a commit with `synchronous = full` costs an
/// fsync, a few ms on flash).
pub(super) fn commit_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 15)
}

/// Writes in one group commit: 1 to 1024, which covers [`crate::store::MAX_BATCH`].
pub(super) fn group_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 2.0, 11)
}

/// Seconds: one cloud request (5 ms to 40 s, past the longest request timeout one would set).
pub(super) fn request_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 14)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct IngestLabels {
    pub(super) transport: &'static str,
    pub(super) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RejectLabels {
    pub(super) transport: &'static str,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TransportLabels {
    pub(super) transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) cloud: &'static str,
    pub(super) operation: String,
    pub(super) status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OperationLabels {
    pub(super) cloud: &'static str,
    pub(super) operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CloudStateLabels {
    pub(super) cloud: &'static str,
    pub(super) state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CloudLabels {
    pub(super) cloud: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
}
