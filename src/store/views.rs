//! What the store hands out: plain data for the daemon, the CLI and `--json` output.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use crate::model::UnixMillis;

#[derive(Clone, Debug, Serialize)]
pub struct OutboxCount {
    pub target: String,
    pub state: String,
    pub rows: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub path: PathBuf,
    pub schema_version: i64,
    pub devices: i64,
    pub telemetry_points: i64,
    pub reported_states: i64,
    pub desired_unpublished: i64,
    pub outbox: Vec<OutboxCount>,
    /// Telemetry points above each cloud's delivery cursor (not yet settled there).
    pub telemetry_backlog: Vec<(String, i64)>,
    /// Telemetry points a cloud refused, kept as dead letters.
    pub telemetry_dead: i64,
    /// Every message rejected since the database was created.
    pub rejected_total: i64,
    /// How many of those are still kept for inspection.
    pub rejected_kept: i64,
    /// Broker redeliveries (DUP) recognised as already stored and not stored again.
    pub redeliveries_total: i64,
    pub conflicts_pending: i64,
    pub db_bytes: u64,
    pub wal_bytes: u64,
    /// Space in use inside the file (the rest is free pages that new rows reuse).
    pub used_bytes: u64,
    /// Telemetry points deleted by the size ceiling before any cloud received them.
    pub telemetry_dropped_undelivered: i64,
    /// What the daemon last wrote about itself; `None` if it never ran on this database.
    pub daemon: Option<DaemonBeat>,
    /// The summary of the last sync run (reconciliation), if one ran.
    pub sync_last_run: Option<Value>,
}

/// The daemon's heartbeat, written to the database every status tick so that operator commands
/// (separate processes) can tell whether it runs and how its links are.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, Serialize)]
pub struct DaemonBeat {
    pub pid: u32,
    /// Unix milliseconds of this beat.
    pub at: i64,
    /// Milliseconds until the next beat is due.
    pub every_ms: u64,
    /// The broker link: `connected`, `down`, `refused` or `disabled` in JSON.
    pub mqtt: crate::health::LinkState,
    /// Why the broker cannot be reached, while it cannot (e.g. "TLS: the broker's certificate
    /// expired"); absent once connected, and in heartbeats of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_error: Option<String>,
    /// Set by a clean shutdown.
    pub stopped: bool,
    /// Each enabled cloud's lane: state, last success, last error.
    #[serde(default)]
    pub clouds: std::collections::BTreeMap<crate::model::Target, crate::health::CloudHealth>,
}

impl Status {
    /// Pending outbox rows, all clouds together.
    pub fn outbox_pending(&self) -> i64 {
        self.outbox
            .iter()
            .filter(|c| c.state == "pending")
            .map(|c| c.rows)
            .sum()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceView {
    pub key: String,
    pub origin: String,
    #[serde(serialize_with = "rfc3339")]
    pub first_seen: UnixMillis,
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_seen: Option<UnixMillis>,
    pub reported: Option<Value>,
    pub reported_version: Option<i64>,
    pub desired: Option<Value>,
    pub desired_version: Option<i64>,
    pub telemetry_points: i64,
    /// The clouds this device was removed from (it is kept here, with its data).
    pub removed_from: Vec<String>,
}

/// A device's ids in each cloud, once linked there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceLinks {
    pub golioth: Option<String>,
    pub netneural: Option<String>,
}

/// One telemetry point for `nn-gateway telemetry`.
#[derive(Clone, Debug, Serialize)]
pub struct TelemetryView {
    pub id: i64,
    /// The device's own timestamp, if it sent one.
    #[serde(serialize_with = "rfc3339_opt")]
    pub device_ts: Option<UnixMillis>,
    #[serde(serialize_with = "rfc3339")]
    pub received_at: UnixMillis,
    pub payload: Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct RejectedView {
    #[serde(serialize_with = "rfc3339")]
    pub received_at: UnixMillis,
    pub origin: String,
    pub device: Option<String>,
    pub locator: String,
    pub reason: String,
    pub size: i64,
    /// The first bytes of the payload, lossily decoded as UTF-8.
    pub excerpt: String,
}

fn rfc3339<S: serde::Serializer>(t: &UnixMillis, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339())
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<UnixMillis>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&t.to_rfc3339()),
        None => s.serialize_none(),
    }
}
