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

pub mod policy;

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
use policy::{LaneEffect, RetrySchedule, Verdict};

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
    let lane = Lane {
        shared: Arc::new(Shared {
            uplink,
            store: links.store,
            registrar: Registrar::default(),
            install_id: config.install_id.clone(),
            concurrency: config.concurrency.max(1),
        }),
        config,
        health: links.health,
        bell: links.bell,
        key_changed: links.key_changed,
        cursor: None,
        read_through: None,
        must_release: false,
        telemetry_retry: None,
        telemetry_attempts: 0,
        batch_seq: 0,
        summary: Summary::default(),
        last_summary: tokio::time::Instant::now(),
        touches: JoinSet::new(),
    };
    let shutdown = links.shutdown;
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

/// Registrations of this lane in progress (or done and not yet committed), per local device
/// id: concurrent sends for one new device wait for one registration.
#[derive(Default)]
struct Registrar {
    cells: Mutex<HashMap<i64, Arc<OnceCell<String>>>>,
}

/// A device's id as [`Registrar::resolve`] found it.
struct Resolved {
    id: String,
    /// This call registered it (rather than waiting for another's registration).
    fresh: bool,
    /// The create carried the row given.
    delivered: bool,
}

impl Registrar {
    async fn resolve<U: Uplink>(
        &self,
        uplink: &U,
        device: &DeviceIdent,
        row: Option<&OutboxRow>,
    ) -> Result<Resolved, CloudError> {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(device.id)
            .or_default()
            .clone();
        let mut mine = None;
        let id = cell
            .get_or_try_init(|| async {
                let r = uplink.register(device, row).await?;
                mine = Some(r.delivered);
                Ok::<_, CloudError>(r.id)
            })
            .await?
            .clone();
        Ok(Resolved {
            id,
            fresh: mine.is_some(),
            delivered: mine.unwrap_or(false),
        })
    }

    /// The device's id (or its absence) is committed to the store: rows read from now on
    /// carry it, so the registration need not be remembered.
    fn settled(&self, device: i64) {
        self.cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&device);
    }
}

/// What the lane's send tasks share.
struct Shared<U> {
    uplink: U,
    store: Store,
    registrar: Registrar,
    install_id: String,
    concurrency: usize,
}

struct Lane<U> {
    shared: Arc<Shared<U>>,
    config: LaneConfig,
    health: Health,
    bell: Arc<Notify>,
    key_changed: Arc<Notify>,
    /// The telemetry cursor, read once and then kept in step with the store.
    cursor: Option<i64>,
    /// The newest point handed to a batch in the air (at or above the cursor).
    read_through: Option<i64>,
    /// When the failed telemetry batch is due again (its backoff lives in memory: after a
    /// restart the batch is simply tried at once).
    telemetry_retry: Option<UnixMillis>,
    telemetry_attempts: u32,
    /// Numbers the telemetry batches sent, to match answers to them.
    batch_seq: u64,
    summary: Summary,
    last_summary: tokio::time::Instant,
    /// At most one `last_seen` update in the air, off the batches' path.
    touches: JoinSet<()>,
    /// A pump failed on the store: its rows are still marked in flight.
    must_release: bool,
}

/// How a pump went.
struct Pumped {
    worked: bool,
    effect: LaneEffect,
    error: Option<CloudError>,
}

/// A row send's outcome: the id to store with the row (found or created, even when the send
/// then failed), whether this send registered it, and the send's result.
struct RowOutcome {
    remote_id: Option<String>,
    fresh: bool,
    result: Result<(), CloudError>,
}

/// A telemetry batch's outcome.
struct BatchOutcome {
    /// The points refused for good.
    result: Result<Vec<DeadPoint>, CloudError>,
    sent: u64,
    registered: u64,
    /// Each device's newest reception time among the points delivered.
    seen: Vec<(String, UnixMillis)>,
}

/// A telemetry batch in the air, in id order with the others.
struct InAir {
    seq: u64,
    /// Its newest point id.
    last: i64,
    /// Dead letters sent again (their ids), rather than points above the cursor.
    retry: Option<Vec<i64>>,
    outcome: Option<BatchOutcome>,
}

/// A finished task: a panic is the lane's own bug and is passed on; tasks are never aborted.
fn joined<T>(r: Result<T, JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => unreachable!("lane tasks are never cancelled: {e}"),
    }
}

/// The lane's own store failures (a full disk, a lock held past the busy timeout): logged
/// once when they start and once when they end, retried with a growing delay — slowly for
/// one no retry can cure (a corrupt file), which the heartbeat reports too.
struct StoreTrouble {
    backoff: Backoff,
    failing: bool,
}

impl Default for StoreTrouble {
    fn default() -> Self {
        StoreTrouble {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            failing: false,
        }
    }
}

impl StoreTrouble {
    async fn wait(&mut self, e: &StoreError) {
        if !self.failing {
            self.failing = true;
            tracing::error!(error = %e, transient = e.is_transient(),
                "the lane cannot read or settle its outbox; retrying with backoff");
        }
        if !e.is_transient() {
            // Nothing changes quickly: go straight to the longest delay.
            self.backoff = Backoff::after(Duration::from_secs(1), Duration::from_secs(60), 16);
        }
        tokio::time::sleep(self.backoff.next_delay().max(Duration::from_millis(200))).await;
    }

    fn over(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("the lane's outbox works again");
        }
        self.backoff.reset();
    }
}

impl<U: Uplink> Lane<U> {
    fn target(&self) -> Target {
        self.shared.uplink.target()
    }

    async fn run(mut self) {
        let target = self.target();
        self.health.set_lane(target, LaneState::Online);
        let mut probes = Backoff::new(self.config.schedule.min, self.config.schedule.max);
        let mut store_trouble = StoreTrouble::default();
        self.summary.started_at = UnixMillis::now().0;
        loop {
            self.maybe_summarise().await;
            match self.health.lane(target) {
                LaneState::Online | LaneState::Disabled | LaneState::BackingOff => {
                    if self.must_release {
                        // A pump that failed on the store left its rows in flight: they go
                        // back to pending (newer values win) before anything new is taken.
                        match self
                            .shared
                            .store
                            .call(move |db| db.requeue_in_flight(Some(target)))
                            .await
                        {
                            Ok(_) => self.must_release = false,
                            Err(e) => {
                                store_trouble.wait(&e).await;
                                continue;
                            }
                        }
                    }
                    let pumped = match self.pump().await {
                        Ok(pumped) => pumped,
                        Err(e) => {
                            // The sends in the air were abandoned with the pump: what they
                            // carried is owed again, from the settled cursor and the rows.
                            self.read_through = self.cursor;
                            self.must_release = true;
                            store_trouble.wait(&e).await;
                            continue;
                        }
                    };
                    store_trouble.over();
                    match pumped.effect {
                        LaneEffect::None => {
                            if pumped.error.is_none() {
                                self.health.set_lane(target, LaneState::Online);
                            }
                            if !pumped.worked {
                                self.idle().await;
                            }
                        }
                        LaneEffect::BackOff { until } => {
                            self.enter(LaneState::BackingOff, pumped.error.as_ref());
                            let wait = until.0.saturating_sub(UnixMillis::now().0).max(0);
                            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                            self.health.set_lane(target, LaneState::Online);
                        }
                        LaneEffect::Offline => {
                            probes.reset();
                            self.enter(LaneState::Offline, pumped.error.as_ref());
                        }
                        LaneEffect::AuthFailed => {
                            self.enter(LaneState::AuthFailed, pumped.error.as_ref());
                        }
                    }
                }
                LaneState::Offline => {
                    tokio::time::sleep(probes.next_delay()).await;
                    self.probe(probes.attempts()).await;
                }
                LaneState::AuthFailed => {
                    tokio::select! {
                        () = tokio::time::sleep(AUTH_RECHECK) => {}
                        () = self.key_changed.notified() => {
                            tracing::info!("new API key; checking it");
                        }
                    }
                    self.probe(0).await;
                }
            }
        }
    }

    /// Moves the lane to `state`, logging the change once with the error that caused it.
    fn enter(&self, state: LaneState, error: Option<&CloudError>) {
        let before = self.health.set_lane(self.target(), state);
        if before == state {
            return;
        }
        let error = error.map(ToString::to_string).unwrap_or_default();
        match state {
            LaneState::Offline => tracing::warn!(%error,
                "cloud unreachable; pausing the lane and probing on the backoff schedule"),
            LaneState::AuthFailed => tracing::error!(%error,
                "cloud refused the API key; lane paused (fix the key file and send SIGHUP, or restart for a systemd credential)"),
            LaneState::BackingOff => tracing::info!(%error, "cloud asked us to slow down"),
            LaneState::Online | LaneState::Disabled => {}
        }
    }

    async fn probe(&mut self, attempt: u32) {
        let target = self.target();
        match self.shared.uplink.probe().await {
            Ok(()) => {
                let before = self.health.set_lane(target, LaneState::Online);
                self.health.lane_succeeded(target);
                tracing::info!(
                    was = before.as_str(),
                    probes = attempt,
                    "cloud reachable again; resuming the lane"
                );
            }
            Err(e) => {
                self.health.lane_failed(target, &e.to_string());
                self.summary.requests_failed += 1;
                if e.is_auth() {
                    self.enter(LaneState::AuthFailed, Some(&e));
                } else if self.health.lane(target) == LaneState::AuthFailed && !e.is_retryable() {
                    tracing::debug!(error = %e, "auth recheck failed");
                } else if self.health.lane(target) == LaneState::AuthFailed {
                    // The cloud is down now; the key cannot be judged. Probe for reachability.
                    self.enter(LaneState::Offline, Some(&e));
                } else {
                    tracing::debug!(error = %e, attempt, "probe failed; still offline");
                }
            }
        }
    }

    /// Waits for the bell, the next due row, or the idle recheck.
    async fn idle(&self) {
        let target = self.target();
        let next = self
            .shared
            .store
            .call(move |db| db.next_due(target))
            .await
            .ok()
            .flatten();
        let mut wait = IDLE_RECHECK;
        if let Some(at) = next {
            let ms = (at.0 - UnixMillis::now().0).max(0) as u64;
            wait = wait.min(Duration::from_millis(ms));
        }
        if let Some(at) = self.telemetry_retry {
            let ms = (at.0 - UnixMillis::now().0).max(0) as u64;
            wait = wait.min(Duration::from_millis(ms));
        }
        tokio::select! {
            () = self.bell.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Sends what is due until nothing is (or a failure affects the whole lane): up to
    /// `concurrency` rows and [`TELEMETRY_IN_FLIGHT`] telemetry batches in the air, every
    /// free slot filled as soon as an answer frees it. After a lane-wide failure nothing new
    /// is sent; what is in the air is waited for and settled.
    async fn pump(&mut self) -> Result<Pumped, StoreError> {
        let target = self.target();
        let concurrency = self.shared.concurrency;
        let mut rows: JoinSet<(OutboxRow, RowOutcome)> = JoinSet::new();
        let mut batches: JoinSet<(u64, BatchOutcome)> = JoinSet::new();
        let mut in_air: VecDeque<InAir> = VecDeque::new();
        let mut settled: Vec<Settled> = Vec::new();
        let mut effects = Vec::new();
        let mut last_error: Option<CloudError> = None;
        let mut worked = false;
        // Set by a lane-wide failure: no new sends.
        let mut stopping = false;
        // The last take found fewer due rows than it asked for; look again after a bell or
        // an answer.
        let mut rows_drained = false;
        let mut telemetry_drained = !target.takes_telemetry();
        loop {
            let now = UnixMillis::now();
            let free = if stopping || rows_drained {
                0
            } else {
                concurrency - rows.len()
            };
            if !settled.is_empty() || free > 0 {
                let done = std::mem::take(&mut settled);
                let changed: Vec<i64> = done
                    .iter()
                    .filter(|s| s.remote_id != RemoteIdChange::Keep)
                    .map(|s| s.row.device.id)
                    .collect();
                let taken = self
                    .shared
                    .store
                    .call(move |db| db.settle_and_take(target, &done, now, free))
                    .await?;
                for device in changed {
                    self.shared.registrar.settled(device);
                }
                rows_drained = taken.len() < free;
                worked |= !taken.is_empty();
                for row in taken {
                    let shared = self.shared.clone();
                    rows.spawn(
                        async move {
                            let outcome = send_one(&shared, &row).await;
                            (row, outcome)
                        }
                        .in_current_span(),
                    );
                }
            }
            if !stopping && !telemetry_drained {
                telemetry_drained = self.fill_telemetry(&mut batches, &mut in_air).await?;
                worked |= !in_air.is_empty();
            }
            if rows.is_empty() && batches.is_empty() {
                break;
            }
            let can_take = !stopping && rows.len() < concurrency;
            let mut row_results = Vec::new();
            let mut batch_results = Vec::new();
            tokio::select! {
                Some(r) = rows.join_next() => row_results.push(joined(r)),
                Some(r) = batches.join_next() => batch_results.push(joined(r)),
                () = self.bell.notified(), if can_take => {
                    rows_drained = false;
                    telemetry_drained = !target.takes_telemetry();
                }
            }
            // Everything else already in is settled with it.
            while let Some(r) = rows.try_join_next() {
                row_results.push(joined(r));
            }
            while let Some(r) = batches.try_join_next() {
                batch_results.push(joined(r));
            }
            if !row_results.is_empty() {
                rows_drained = false;
            }
            if !batch_results.is_empty() {
                // A long drain still picks up rows that have become due meanwhile.
                rows_drained = false;
            }
            let mut succeeded = false;
            for (row, outcome) in row_results {
                let (s, effect, error) = self.judge_row(row, outcome, now);
                succeeded |= error.is_none();
                settled.push(s);
                if let Some(e) = error {
                    effects.push(effect);
                    last_error = Some(e);
                }
            }
            for (this, outcome) in batch_results {
                if let Some(slot) = in_air.iter_mut().find(|b| b.seq == this) {
                    slot.outcome = Some(outcome);
                }
            }
            if in_air.front().is_some_and(|b| b.outcome.is_some()) {
                // The next batches go out before the ones in are settled: the settling commit
                // (an fsync) then overlaps the cloud's answer instead of adding to it.
                if !stopping && !telemetry_drained {
                    telemetry_drained = self.fill_telemetry(&mut batches, &mut in_air).await?;
                }
                match self.settle_batches(&mut in_air).await? {
                    Ok(any) => succeeded |= any,
                    Err(e) => {
                        let (verdict, effect) = policy::judge(
                            &e,
                            self.telemetry_attempts,
                            self.config.schedule,
                            UnixMillis::now(),
                            fastrand::f64(),
                        );
                        // A batch is never dead as a whole (its points at fault are bisected out
                        // and dead-lettered): a failure that is not the points' (a device that
                        // cannot be registered, an unreadable answer) waits out the backoff
                        // instead of being sent again at once.
                        let at = match verdict {
                            Verdict::Retry { at, .. } => at,
                            Verdict::Dead(_) => policy::later(
                                UnixMillis::now(),
                                self.config
                                    .schedule
                                    .delay(self.telemetry_attempts, fastrand::f64()),
                            ),
                        };
                        self.telemetry_attempts = self.telemetry_attempts.saturating_add(1);
                        self.telemetry_retry = Some(at);
                        effects.push(effect);
                        last_error = Some(e);
                        // The batches behind it are sent again from the cursor (whatever of
                        // them arrives is stored once): their answers no longer count.
                        in_air.clear();
                        self.read_through = self.cursor;
                        telemetry_drained = true;
                    }
                }
            }
            if succeeded {
                self.health.lane_succeeded(target);
            }
            if effects.iter().any(|e| *e != LaneEffect::None) {
                stopping = true;
            }
            self.maybe_summarise().await;
        }
        if !settled.is_empty() {
            let done = std::mem::take(&mut settled);
            let changed: Vec<i64> = done
                .iter()
                .filter(|s| s.remote_id != RemoteIdChange::Keep)
                .map(|s| s.row.device.id)
                .collect();
            self.shared
                .store
                .call(move |db| db.settle_and_take(target, &done, UnixMillis::now(), 0))
                .await?;
            for device in changed {
                self.shared.registrar.settled(device);
            }
        }
        if let Some(e) = &last_error {
            self.summary.requests_failed += 1;
            self.summary.last_error = Some(e.to_string());
            self.health.lane_failed(target, &e.to_string());
        }
        Ok(Pumped {
            worked,
            effect: policy::strongest(effects),
            error: last_error,
        })
    }

    /// How a row's send ends: its settlement, and the failure with its effect on the lane.
    fn judge_row(
        &mut self,
        row: OutboxRow,
        outcome: RowOutcome,
        now: UnixMillis,
    ) -> (Settled, LaneEffect, Option<CloudError>) {
        let target = self.target();
        if outcome.fresh {
            self.summary.devices_registered += 1;
        }
        let remote_id = match outcome.remote_id {
            Some(id) => RemoteIdChange::Set(id),
            None => RemoteIdChange::Keep,
        };
        let e = match outcome.result {
            Ok(()) => {
                self.summary.rows_sent += 1;
                let s = Settled {
                    row,
                    remote_id,
                    how: Settlement::Done,
                };
                return (s, LaneEffect::None, None);
            }
            Err(e) => e,
        };
        if e.status() == Some(404) && row.device.remote_id(target).is_some() {
            // The device was deleted in the cloud: register it again next time.
            tracing::warn!(device = %row.device.key, error = %e,
                "device no longer exists in the cloud; it will be registered again");
            let s = Settled {
                row,
                remote_id: RemoteIdChange::Clear,
                how: Settlement::Retry {
                    at: UnixMillis::now(),
                    error: "device re-registered".into(),
                    counted: false,
                },
            };
            return (s, LaneEffect::None, None);
        }
        let (verdict, effect) =
            policy::judge(&e, row.attempts, self.config.schedule, now, fastrand::f64());
        let how = match verdict {
            Verdict::Retry { at, counted } => {
                self.summary.rows_failed += 1;
                Settlement::Retry {
                    at,
                    error: e.to_string(),
                    counted,
                }
            }
            Verdict::Dead(text) => {
                self.summary.rows_dead += 1;
                tracing::warn!(outbox_id = row.id, device = %row.device.key, error = %text,
                    "outbox row refused by the cloud; moved to dead (nn-gateway queue)");
                Settlement::Dead(text)
            }
        };
        let s = Settled {
            row,
            remote_id,
            how,
        };
        (s, effect, Some(e))
    }

    /// The next telemetry batch to send: the points above those already in the air, or, when
    /// nothing is in the air and nothing is above the cursor, dead letters asked to be retried
    /// (with their ids). `None` when there is nothing, or a failed batch is not due again yet.
    async fn next_batch(
        &mut self,
        nothing_in_air: bool,
    ) -> Result<Option<(Vec<TelemetryItem>, Option<Vec<i64>>)>, StoreError> {
        let target = self.target();
        if self
            .telemetry_retry
            .is_some_and(|at| at > UnixMillis::now())
        {
            return Ok(None);
        }
        let cursor = match self.cursor {
            Some(c) => c,
            None => {
                let c = self
                    .shared
                    .store
                    .call(move |db| db.telemetry_cursor(target))
                    .await?
                    .unwrap_or(0);
                self.cursor = Some(c);
                c
            }
        };
        let after = self.read_through.unwrap_or(cursor).max(cursor);
        let batch = self.config.batch;
        let items = self
            .shared
            .store
            .call(move |db| db.telemetry_after(after, batch))
            .await?;
        if !items.is_empty() {
            return Ok(Some((items, None)));
        }
        if !nothing_in_air {
            return Ok(None);
        }
        let items = self
            .shared
            .store
            .call(move |db| db.telemetry_dead_items(target, batch))
            .await?;
        if items.is_empty() {
            return Ok(None);
        }
        let ids = items.iter().map(|i| i.id).collect();
        Ok(Some((items, Some(ids))))
    }

    /// Sends telemetry batches until [`TELEMETRY_IN_FLIGHT`] are in the air. Returns whether
    /// there was nothing more to send.
    async fn fill_telemetry(
        &mut self,
        batches: &mut JoinSet<(u64, BatchOutcome)>,
        in_air: &mut VecDeque<InAir>,
    ) -> Result<bool, StoreError> {
        while batches.len() < TELEMETRY_IN_FLIGHT {
            let Some((items, retry)) = self.next_batch(in_air.is_empty()).await? else {
                return Ok(true);
            };
            self.batch_seq += 1;
            let last = items.last().map_or(0, |i| i.id);
            if retry.is_none() {
                self.read_through = Some(last);
            }
            in_air.push_back(InAir {
                seq: self.batch_seq,
                last,
                retry,
                outcome: None,
            });
            let shared = self.shared.clone();
            let seq = self.batch_seq;
            batches.spawn(async move { (seq, deliver(shared, items).await) }.in_current_span());
        }
        Ok(false)
    }

    /// Settles the batches at the front of `in_air` that came back, in order and in one
    /// transaction: the cursor moves past them (dead letters recorded). Stops at a failed one
    /// and returns its failure for the lane to judge; otherwise whether any was settled.
    async fn settle_batches(
        &mut self,
        in_air: &mut VecDeque<InAir>,
    ) -> Result<Result<bool, CloudError>, StoreError> {
        let target = self.target();
        let mut through: Option<i64> = None;
        let mut dead_all: Vec<DeadPoint> = Vec::new();
        let mut retried: Option<(Vec<i64>, Vec<DeadPoint>)> = None;
        let mut seen: BTreeMap<String, UnixMillis> = BTreeMap::new();
        let mut failure = None;
        while in_air.front().is_some_and(|b| b.outcome.is_some()) {
            let Some(InAir {
                last,
                retry,
                outcome: Some(outcome),
                ..
            }) = in_air.pop_front()
            else {
                break;
            };
            self.summary.devices_registered += outcome.registered;
            let dead = match outcome.result {
                Ok(dead) => dead,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            self.telemetry_retry = None;
            self.telemetry_attempts = 0;
            self.summary.points_sent += outcome.sent;
            self.summary.points_dead += dead.len() as u64;
            if !dead.is_empty() {
                tracing::warn!(points = dead.len(), first = dead[0].0, error = %dead[0].2,
                    "telemetry points refused by the cloud; dead-lettered (nn-gateway queue)");
            }
            for (id, at) in outcome.seen {
                let newest = seen.entry(id).or_insert(at);
                *newest = (*newest).max(at);
            }
            match retry {
                // Dead letters are only sent again when nothing else is in the air.
                Some(ids) => retried = Some((ids, dead)),
                None => {
                    through = Some(last);
                    dead_all.extend(dead);
                }
            }
        }
        let any = through.is_some() || retried.is_some();
        if any {
            let cursor = self.cursor.unwrap_or(0);
            self.shared
                .store
                .call(move |db| {
                    if let Some((ids, dead)) = retried {
                        let ok: Vec<i64> = ids
                            .into_iter()
                            .filter(|id| !dead.iter().any(|d| d.0 == *id))
                            .collect();
                        db.forget_dead_telemetry(target, &ok)?;
                        db.settle_telemetry(target, cursor, &dead)?;
                    }
                    match through {
                        Some(last) => db.settle_telemetry(target, last, &dead_all),
                        None => Ok(()),
                    }
                })
                .await?;
            if let Some(last) = through {
                self.cursor = Some(last.max(self.cursor.unwrap_or(0)));
            }
        }
        if !seen.is_empty() {
            while self.touches.try_join_next().is_some() {}
            if self.touches.is_empty() {
                let shared = self.shared.clone();
                let seen: Vec<(String, UnixMillis)> = seen.into_iter().collect();
                self.touches.spawn(
                    async move {
                        if let Err(e) = shared.uplink.touch(&seen).await {
                            tracing::debug!(error = %e, "last_seen not advanced; the next batch will");
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        Ok(match failure {
            Some(e) => Err(e),
            None => Ok(any),
        })
    }

    async fn maybe_summarise(&mut self) {
        if self.last_summary.elapsed() < SUMMARY_EVERY {
            return;
        }
        self.last_summary = tokio::time::Instant::now();
        if self.summary.is_empty() {
            self.summary.started_at = UnixMillis::now().0;
            return;
        }
        let summary = std::mem::take(&mut self.summary);
        self.summary.started_at = UnixMillis::now().0;
        tracing::info!(
            rows_sent = summary.rows_sent,
            rows_failed = summary.rows_failed,
            rows_dead = summary.rows_dead,
            points_sent = summary.points_sent,
            points_dead = summary.points_dead,
            registered = summary.devices_registered,
            "uplink summary"
        );
        let target = self.target();
        let count = summary.rows_sent + summary.points_sent;
        let failed = summary.rows_failed + summary.rows_dead + summary.points_dead;
        let error = summary.last_error.clone();
        let duration = UnixMillis::now().0 - summary.started_at;
        if let Err(e) = self
            .shared
            .store
            .call(move |db| {
                db.record_sync_log(target, "uplink", count, failed, error.as_deref(), duration)
            })
            .await
        {
            tracing::warn!(error = %e, "cannot record the uplink summary locally");
        }
        if let Err(e) = self.shared.uplink.summarise(&summary).await {
            tracing::debug!(error = %e, "uplink summary not recorded in the cloud");
        }
    }
}

/// 409 with PostgREST's foreign-key code: the device row the points refer to is gone.
fn is_missing_parent(e: &CloudError) -> bool {
    matches!(&e.failure, Failure::Status { status: 409, code: Some(code), .. } if code == "23503")
}

/// Registers the row's device if needed (the create carrying the row where the cloud can),
/// then sends the row.
async fn send_one<U: Uplink>(shared: &Shared<U>, row: &OutboxRow) -> RowOutcome {
    let uplink = &shared.uplink;
    let target = uplink.target();
    let (remote, stored, fresh) = match row.device.remote_id(target) {
        Some(id) => (id.to_owned(), None, false),
        None => match shared
            .registrar
            .resolve(uplink, &row.device, Some(row))
            .await
        {
            Ok(r) if r.delivered => {
                // Created with the row's content; nothing assigned it a direction yet.
                return RowOutcome {
                    remote_id: Some(r.id),
                    fresh: r.fresh,
                    result: Ok(()),
                };
            }
            Ok(r) => (r.id.clone(), Some(r.id), r.fresh),
            Err(e) => {
                return RowOutcome {
                    remote_id: None,
                    fresh: false,
                    result: Err(e),
                };
            }
        },
    };
    let result = match uplink.accepts(&[remote.as_str()]).await {
        Ok(ok) if ok.first().copied().unwrap_or(true) => uplink.send_row(&remote, row).await,
        // The device does not sync up to this cloud: nothing is owed.
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    RowOutcome {
        remote_id: stored,
        fresh,
        result,
    }
}

/// Registers the batch's devices that have no id in the cloud yet (at most `concurrency` at
/// once, their ids stored in one transaction), drops the points of devices that do not sync
/// up, and sends the rest; bisects a refused batch.
async fn deliver<U: Uplink>(shared: Arc<Shared<U>>, items: Vec<TelemetryItem>) -> BatchOutcome {
    let mut out = BatchOutcome {
        result: Ok(Vec::new()),
        sent: 0,
        registered: 0,
        seen: Vec::new(),
    };
    let target = shared.uplink.target();
    let mut ids: HashMap<i64, String> = HashMap::new();
    let mut missing: Vec<DeviceIdent> = Vec::new();
    for item in &items {
        match item.device.remote_id(target) {
            Some(id) => {
                ids.entry(item.device.id).or_insert_with(|| id.to_owned());
            }
            None if !missing.iter().any(|d| d.id == item.device.id) => {
                missing.push(item.device.clone());
            }
            None => {}
        }
    }
    let mut failure = None;
    let mut refused: HashMap<i64, String> = HashMap::new();
    let mut found: Vec<(i64, Option<String>)> = Vec::new();
    for chunk in missing.chunks(shared.concurrency) {
        let mut set = JoinSet::new();
        for device in chunk.iter().cloned() {
            let shared = shared.clone();
            set.spawn(
                async move {
                    let r = shared
                        .registrar
                        .resolve(&shared.uplink, &device, None)
                        .await;
                    (device.id, r)
                }
                .in_current_span(),
            );
        }
        while let Some(r) = set.join_next().await {
            match joined(r) {
                (device, Ok(r)) => {
                    out.registered += u64::from(r.fresh);
                    ids.insert(device, r.id.clone());
                    found.push((device, Some(r.id)));
                }
                // A device the cloud refuses for good (a 4xx on its registration): its points
                // are dead-lettered with that error, so it cannot hold up everyone else's.
                (device, Err(e)) if !e.is_retryable() && !e.is_auth() && !is_missing_parent(&e) => {
                    tracing::warn!(device, error = %e,
                        "device refused by the cloud; its telemetry goes to the dead letters");
                    refused.insert(device, e.to_string());
                }
                (_, Err(e)) => failure = Some(e),
            }
        }
        if failure.is_some() {
            break;
        }
    }
    if !found.is_empty() {
        let devices: Vec<i64> = found.iter().map(|f| f.0).collect();
        match shared
            .store
            .call(move |db| db.set_remote_ids(target, &found))
            .await
        {
            Ok(()) => devices
                .into_iter()
                .for_each(|d| shared.registrar.settled(d)),
            Err(e) => tracing::error!(error = %e, "cannot store the devices' cloud ids"),
        }
    }
    if let Some(e) = failure {
        out.result = Err(e);
        return out;
    }
    let remotes: Vec<(i64, &str)> = ids.iter().map(|(d, r)| (*d, r.as_str())).collect();
    let names: Vec<&str> = remotes.iter().map(|r| r.1).collect();
    let accepted: HashMap<i64, bool> = match shared.uplink.accepts(&names).await {
        Ok(ok) => remotes.iter().map(|r| r.0).zip(ok).collect(),
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    };
    let mut dead: Vec<DeadPoint> = items
        .iter()
        .filter_map(|i| {
            refused
                .get(&i.device.id)
                .map(|e| (i.id, i.device.id, e.clone()))
        })
        .collect();
    let points: Vec<OutPoint<'_>> = items
        .iter()
        .filter(|i| !refused.contains_key(&i.device.id))
        .filter(|i| accepted.get(&i.device.id).copied().unwrap_or(true))
        .map(|item| OutPoint {
            remote_id: ids[&item.device.id].as_str(),
            item,
            idempotency_key: format!("tm:{}:{}", shared.install_id, item.id),
        })
        .collect();
    if points.is_empty() {
        out.result = Ok(dead);
        return out;
    }
    let refused_points = dead.len();
    match send_bisecting(&shared.uplink, &points, &mut dead).await {
        Ok(()) => {}
        Err(e) if is_missing_parent(&e) => {
            // The device's row is gone in the cloud (deleted there): forget the ids so that
            // the next try registers the devices again.
            tracing::warn!(error = %e, "a device of this batch no longer exists in the cloud; registering again");
            let forget: Vec<(i64, Option<String>)> = ids.keys().map(|d| (*d, None)).collect();
            let devices: Vec<i64> = ids.keys().copied().collect();
            let _ = shared
                .store
                .call(move |db| db.set_remote_ids(target, &forget))
                .await;
            devices
                .into_iter()
                .for_each(|d| shared.registrar.settled(d));
            out.result = Err(e);
            return out;
        }
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    }
    let mut newest: BTreeMap<&str, UnixMillis> = BTreeMap::new();
    for p in points
        .iter()
        .filter(|p| !dead.iter().any(|d: &DeadPoint| d.0 == p.item.id))
    {
        let at = newest.entry(p.remote_id).or_insert(p.item.received_at);
        *at = (*at).max(p.item.received_at);
    }
    out.sent = (points.len() + refused_points - dead.len()) as u64;
    out.seen = newest
        .into_iter()
        .map(|(id, at)| (id.to_owned(), at))
        .collect();
    out.result = Ok(dead);
    out
}

/// Sends `points`; when the cloud refuses them for what they carry, halves the batch until
/// the points at fault stand alone, and collects those in `dead`.
async fn send_bisecting<U: Uplink>(
    uplink: &U,
    points: &[OutPoint<'_>],
    dead: &mut Vec<DeadPoint>,
) -> Result<(), CloudError> {
    // Explicit stack instead of recursion (async recursion needs boxing).
    let mut todo: Vec<&[OutPoint<'_>]> = vec![points];
    while let Some(part) = todo.pop() {
        match uplink.send_telemetry(part).await {
            Ok(()) => {}
            Err(e) if !e.is_retryable() && !e.is_auth() && !is_missing_parent(&e) => {
                if part.len() == 1 {
                    dead.push((part[0].item.id, part[0].item.device.id, e.to_string()));
                } else {
                    let (a, b) = part.split_at(part.len() / 2);
                    // Second half below the first on the stack: the first goes first.
                    todo.push(b);
                    todo.push(a);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
