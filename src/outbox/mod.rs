//! The outbox sender: one lane per cloud, delivering what the store says is owed.
//!
//! A lane wakes on its outbox bell (rung by the store thread after a commit that made work for
//! it), at the earliest due row, or every [`IDLE_RECHECK`]. It then **pumps**: it keeps up to
//! `concurrency` rows of different devices in the air — never two of one device, so per device
//! the order holds — and, for a cloud that takes telemetry, up to [`TELEMETRY_IN_FLIGHT`]
//! batches above its cursor. There is no round barrier: as answers come back, the lane settles
//! all that are in with one transaction (which also takes the next due rows) and fills the free
//! slots at once, so one slow request holds one slot, not the lane.
//! Every outcome goes through [`policy::judge`]: done rows leave the outbox in the transaction
//! that stores the device's remote id; failed ones are retried at a time kept in the row, or
//! move to dead with the cloud's error. One bad row never blocks the ones behind it.
//!
//! The lane as a whole:
//! - **offline** when the cloud does not answer: it stops sending (what is in the air is
//!   waited for and settled) and probes (one cheap read) on the backoff schedule, so an outage
//!   costs a handful of requests, not one per row;
//! - **backing off** when the cloud asks (429, `Retry-After`);
//! - **auth failed** on 401/403: logged once, shown in `status`, rechecked every
//!   [`AUTH_RECHECK`] or at once when SIGHUP brings a new key.
//!
//! Telemetry batches are bisected when the cloud refuses one for what it carries, until the
//! points at fault are found; those go to the dead letters and the cursor moves past them.
//! Batches settle in id order, so the cursor never passes a batch that is still in the air; a
//! failed batch sends everything above the cursor again (the idempotency keys make the cloud
//! store each point once). A device's telemetry waits until the device exists in the cloud (it
//! is registered first).
//!
//! Registration is idempotent ([`Uplink::register`] looks the hardware id up before creating),
//! so a crash between a create and the commit that stores its id never makes a duplicate; and
//! within a lane one device is registered by one task at a time (a row and a telemetry batch
//! of a new device wait for the same registration instead of racing two creates).
//!
//! Files: this one holds what the rest of the gateway sees (the [`Uplink`] trait, the lane's
//! settings, [`spawn`]); `lane.rs` the loop (pump, probe, idle) with `lane/batches.rs` for its
//! telemetry batches; `send.rs` what one send task does (registration, a row, a batch with
//! bisection); [`policy`] what a failure means, pure.

mod lane;
pub mod policy;
mod send;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OnceCell};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cloud::{CloudError, Failure};
use crate::health::{Health, LaneState};
use crate::model::{Target, UnixMillis};
use crate::store::outbox::{RemoteIdChange, Settled, Settlement};
use crate::store::{DeviceIdent, OutboxRow, Store, StoreError, TelemetryItem};
use lane::Lane;
use policy::{LaneEffect, RetrySchedule, Verdict};
use send::{BatchOutcome, Registrar, RowOutcome, Shared, deliver, joined, send_one};

/// A lane with nothing due looks again this often, in case a bell was missed.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// How often a lane whose key was refused checks again (a new key via SIGHUP checks at once).
pub const AUTH_RECHECK: Duration = Duration::from_secs(300);

/// How often the lane's work is summarised in the sync log while it is busy.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Telemetry batches in the air at once. With two, the next batch is read and sent while the
/// cloud answers the one before, so a backlog drains at about two batches per round trip
/// instead of one. More buys little: batches settle in order (the cursor cannot pass a batch
/// still in the air), and each holds a batch of points in memory.
pub const TELEMETRY_IN_FLIGHT: usize = 2;

/// A telemetry point refused for what it carries: (telemetry id, device id, error).
pub type DeadPoint = (i64, i64, String);

/// One telemetry point ready for the wire.
#[derive(Clone, Debug)]
pub struct OutPoint<'a> {
    /// The device's id in the cloud.
    pub remote_id: &'a str,
    pub item: &'a TelemetryItem,
    /// Derived from the database's install id and the point's id: the same on every retry.
    pub idempotency_key: String,
}

/// What a lane's work since the last summary came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub rows_sent: u64,
    pub rows_failed: u64,
    pub rows_dead: u64,
    pub points_sent: u64,
    pub points_dead: u64,
    pub devices_registered: u64,
    pub requests_failed: u64,
    pub last_error: Option<String>,
    pub started_at: i64,
}

impl Summary {
    fn is_empty(&self) -> bool {
        self.rows_sent + self.rows_failed + self.rows_dead + self.points_sent + self.points_dead
            == 0
            && self.requests_failed == 0
    }
}

/// A device found or created in a cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// Its id there.
    pub id: String,
    /// Whether the create also carried the outbox row given to [`Uplink::register`] (so that
    /// row is delivered). Never for a device that was found.
    pub delivered: bool,
}

/// One cloud, as a lane sees it. Implemented by each cloud's uplink adapter.
pub trait Uplink: Send + Sync + 'static {
    fn target(&self) -> Target;

    /// One cheap read: does the cloud answer, and does it take our key?
    fn probe(&self) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// The device's id in the cloud: found by its hardware id, or created. Idempotent.
    /// `row` is the outbox row about to be sent for it, if any: a cloud that can carry it in
    /// the create does so (and says so in [`Registered::delivered`]), saving a request.
    fn register(
        &self,
        device: &DeviceIdent,
        row: Option<&OutboxRow>,
    ) -> impl Future<Output = Result<Registered, CloudError>> + Send;

    /// Whether each of these devices' data may go up (its sync direction in that cloud), in
    /// the order given.
    /// By default every device syncs up (a cloud with no sync direction of its own).
    fn accepts(
        &self,
        remote_ids: &[&str],
    ) -> impl Future<Output = Result<Vec<bool>, CloudError>> + Send {
        let n = remote_ids.len();
        async move { Ok(vec![true; n]) }
    }

    /// Delivers one outbox row of a registered device.
    fn send_row(
        &self,
        remote_id: &str,
        row: &OutboxRow,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Delivers telemetry points in one request; only called for clouds that take telemetry.
    fn send_telemetry(
        &self,
        points: &[OutPoint<'_>],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// After a delivered batch: each device's newest reception time (one update per device,
    /// not per point). Failures are logged by the lane and do not undo the batch. By default
    /// nothing (a cloud that keeps no last-seen time of ours).
    fn touch(
        &self,
        seen: &[(String, UnixMillis)],
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        let _ = seen;
        async { Ok(()) }
    }

    /// Records a summary of the lane's work in the cloud's own sync log, where it has one
    /// (by default there is none).
    fn summarise(&self, summary: &Summary) -> impl Future<Output = Result<(), CloudError>> + Send {
        let _ = summary;
        async { Ok(()) }
    }
}

/// A lane's fixed settings.
#[derive(Clone, Debug)]
pub struct LaneConfig {
    /// Rows in the air at once (different devices).
    pub concurrency: usize,
    /// Telemetry points per request.
    pub batch: usize,
    pub schedule: RetrySchedule,
    /// Prefix of derived idempotency keys (the database's install id).
    pub install_id: String,
}

/// What a lane is connected to inside the daemon.
pub struct LaneLinks {
    pub store: Store,
    pub health: Health,
    /// Rung by the store after a commit that made work for this cloud.
    pub bell: Arc<Notify>,
    /// Rung when SIGHUP brought a new key for this cloud.
    pub key_changed: Arc<Notify>,
    pub shutdown: CancellationToken,
}

/// Handle of a running lane.
pub struct LaneHandle {
    pub target: Target,
}

/// Starts a lane on `tracker`; it stops when `links.shutdown` fires (sends in the air are
/// abandoned: their rows are in flight, and pending again at the next start).
pub fn spawn<U: Uplink>(
    uplink: U,
    config: LaneConfig,
    links: LaneLinks,
    tracker: &TaskTracker,
) -> LaneHandle {
    let target = uplink.target();
    let shutdown = links.shutdown.clone();
    let lane = Lane::new(uplink, config, links);
    let span = tracing::info_span!("cloud", target = target.as_str());
    tracker.spawn(
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = lane.run() => {}
            }
        }
        .instrument(span),
    );
    LaneHandle { target }
}
