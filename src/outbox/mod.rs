//! The outbox sender: one lane per cloud, delivering what the store says is owed.
//!
//! A lane wakes on its outbox bell (rung by the store thread after a commit that made work for
//! it), at the earliest due row, or every [`IDLE_RECHECK`]. Each **round** takes up to
//! `concurrency` due rows — never two of one device, so per device the order holds — and, for
//! a cloud that takes telemetry, the next batch above its cursor, and sends them at once.
//! Every outcome goes through [`policy::judge`]: done rows leave the outbox in the transaction
//! that stores the device's remote id; failed ones are retried at a time kept in the row, or
//! move to dead with the cloud's error. One bad row never blocks the ones behind it.
//!
//! The lane as a whole:
//! - **offline** when the cloud does not answer: it stops sending and probes (one cheap read)
//!   on the backoff schedule, so an outage costs a handful of requests, not one per row;
//! - **backing off** when the cloud asks (429, `Retry-After`);
//! - **auth failed** on 401/403: logged once, shown in `status`, rechecked every
//!   [`AUTH_RECHECK`] or at once when SIGHUP brings a new key.
//!
//! Telemetry batches are bisected when the cloud refuses one for what it carries, until the
//! points at fault are found; those go to the dead letters and the cursor moves past them.
//! A device's telemetry waits until the device exists in the cloud (it is registered first).
//!
//! Registration is idempotent ([`Uplink::register`] looks the hardware id up before creating),
//! so a crash between a create and the commit that stores its id never makes a duplicate.

pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cloud::{CloudError, Failure};
use crate::health::{Health, LaneState};
use crate::model::{Target, UnixMillis};
use crate::store::{DeviceIdent, OutboxRow, Store, StoreError, TelemetryItem};
use policy::{LaneEffect, RetrySchedule, Verdict};

/// A lane with nothing due looks again this often, in case a bell was missed.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// How often a lane whose key was refused checks again (a new key via SIGHUP checks at once).
pub const AUTH_RECHECK: Duration = Duration::from_secs(300);

/// How often the lane's work is summarised in the sync log while it is busy.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

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

/// One cloud, as a lane sees it. Implemented by each cloud's uplink adapter.
pub trait Uplink: Send + Sync + 'static {
    fn target(&self) -> Target;

    /// One cheap read: does the cloud answer, and does it take our key?
    fn probe(&self) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// The device's id in the cloud: found by its hardware id, or created. Idempotent.
    fn register(
        &self,
        device: &DeviceIdent,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;

    /// Whether this device's data may go up (its sync direction in that cloud).
    fn accepts(&self, remote_id: &str) -> impl Future<Output = Result<bool, CloudError>> + Send;

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
    /// not per point). Failures are logged by the lane and do not undo the batch.
    fn touch(
        &self,
        seen: &[(String, UnixMillis)],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Records a summary of the lane's work in the cloud's own sync log, where it has one.
    fn summarise(&self, summary: &Summary) -> impl Future<Output = Result<(), CloudError>> + Send;
}

/// A lane's fixed settings.
#[derive(Clone, Debug)]
pub struct LaneConfig {
    /// Rows sent at once (different devices).
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

/// Starts a lane on `tracker`; it stops when `links.shutdown` fires (a send in the air is
/// abandoned: its rows are in flight, and pending again at the next start).
pub fn spawn<U: Uplink>(
    uplink: U,
    config: LaneConfig,
    links: LaneLinks,
    tracker: &TaskTracker,
) -> LaneHandle {
    let target = uplink.target();
    let lane = Lane {
        uplink: Arc::new(uplink),
        config,
        store: links.store,
        health: links.health,
        bell: links.bell,
        key_changed: links.key_changed,
        cursor: None,
        telemetry_retry: None,
        telemetry_attempts: 0,
        summary: Summary::default(),
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

struct Lane<U> {
    uplink: Arc<U>,
    config: LaneConfig,
    store: Store,
    health: Health,
    bell: Arc<Notify>,
    key_changed: Arc<Notify>,
    /// The telemetry cursor, read once and then kept in step with the store.
    cursor: Option<i64>,
    /// When the failed telemetry batch is due again (its backoff lives in memory: after a
    /// restart the batch is simply tried at once).
    telemetry_retry: Option<UnixMillis>,
    telemetry_attempts: u32,
    summary: Summary,
}

/// How a round went.
struct Round {
    worked: bool,
    effect: LaneEffect,
    error: Option<CloudError>,
}

impl<U: Uplink> Lane<U> {
    fn target(&self) -> Target {
        self.uplink.target()
    }

    async fn run(mut self) {
        let target = self.target();
        self.health.set_lane(target, LaneState::Online);
        let mut probes = Backoff::new(self.config.schedule.min, self.config.schedule.max);
        let mut last_summary = tokio::time::Instant::now();
        self.summary.started_at = UnixMillis::now().0;
        loop {
            if last_summary.elapsed() >= SUMMARY_EVERY {
                last_summary = tokio::time::Instant::now();
                self.summarise().await;
            }
            match self.health.lane(target) {
                LaneState::Online | LaneState::Disabled | LaneState::BackingOff => {
                    let round = match self.round().await {
                        Ok(round) => round,
                        Err(e) => {
                            tracing::error!(error = %e, "outbox store error; trying again shortly");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    match round.effect {
                        LaneEffect::None => {
                            if round.error.is_none() {
                                self.health.set_lane(target, LaneState::Online);
                            }
                            if !round.worked {
                                self.idle().await;
                            }
                        }
                        LaneEffect::BackOff { until } => {
                            self.enter(LaneState::BackingOff, round.error.as_ref());
                            let wait = until.0.saturating_sub(UnixMillis::now().0).max(0);
                            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                            self.health.set_lane(target, LaneState::Online);
                        }
                        LaneEffect::Offline => {
                            probes.reset();
                            self.enter(LaneState::Offline, round.error.as_ref());
                        }
                        LaneEffect::AuthFailed => {
                            self.enter(LaneState::AuthFailed, round.error.as_ref());
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
        match self.uplink.probe().await {
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

    /// Sends what is due: rows of different devices at once, and one telemetry batch.
    async fn round(&mut self) -> Result<Round, StoreError> {
        let target = self.target();
        let now = UnixMillis::now();
        let limit = self.config.concurrency;
        let rows = self
            .store
            .call(move |db| db.take_due(target, now, limit))
            .await?;
        let mut effects = Vec::new();
        let mut last_error = None;
        let mut worked = !rows.is_empty();

        let mut sends = JoinSet::new();
        for row in rows {
            let uplink = self.uplink.clone();
            sends.spawn(async move {
                let outcome = send_one(&*uplink, &row).await;
                (row, outcome)
            });
        }
        let telemetry = async {
            if target.takes_telemetry() {
                self.telemetry_round().await
            } else {
                Ok(None)
            }
        };
        let (results, telemetry) = tokio::join!(sends.join_all(), telemetry);
        match telemetry? {
            Some(Ok(())) => worked = true,
            Some(Err(e)) => {
                worked = true;
                let unit = fastrand::f64();
                let (verdict, effect) =
                    policy::judge(&e, self.telemetry_attempts, self.config.schedule, now, unit);
                self.telemetry_attempts = self.telemetry_attempts.saturating_add(1);
                if let Verdict::Retry { at, .. } = verdict {
                    self.telemetry_retry = Some(at);
                }
                effects.push(effect);
                last_error = Some(e);
            }
            None => {}
        }
        for (row, (registered, result)) in results {
            let store = &self.store;
            match result {
                Ok(()) => {
                    self.summary.rows_sent += 1;
                    if registered.is_some() {
                        self.summary.devices_registered += 1;
                    }
                    store
                        .call(move |db| db.row_done(&row, registered.as_deref()))
                        .await?;
                }
                Err(e) => {
                    if let Some(id) = registered {
                        self.summary.devices_registered += 1;
                        let device = row.device.id;
                        store
                            .call(move |db| db.set_remote_id(device, target, Some(&id)))
                            .await?;
                    }
                    if e.status() == Some(404) && row.device.remote_id(target).is_some() {
                        // The device was deleted in the cloud: register it again next time.
                        tracing::warn!(device = %row.device.key, error = %e,
                            "device no longer exists in the cloud; it will be registered again");
                        let device = row.device.id;
                        store
                            .call(move |db| db.set_remote_id(device, target, None))
                            .await?;
                        store
                            .call(move |db| {
                                db.row_retry(&row, UnixMillis::now(), "device re-registered", false)
                            })
                            .await?;
                        continue;
                    }
                    let (verdict, effect) =
                        policy::judge(&e, row.attempts, self.config.schedule, now, fastrand::f64());
                    match verdict {
                        Verdict::Retry { at, counted } => {
                            self.summary.rows_failed += 1;
                            let text = e.to_string();
                            store
                                .call(move |db| db.row_retry(&row, at, &text, counted))
                                .await?;
                        }
                        Verdict::Dead(text) => {
                            self.summary.rows_dead += 1;
                            tracing::warn!(outbox_id = row.id, device = %row.device.key, error = %text,
                                "outbox row refused by the cloud; moved to dead (nn-gateway queue)");
                            store.call(move |db| db.row_dead(&row, &text)).await?;
                        }
                    }
                    effects.push(effect);
                    last_error = Some(e);
                }
            }
        }
        if let Some(e) = &last_error {
            self.summary.requests_failed += 1;
            self.summary.last_error = Some(e.to_string());
            self.health.lane_failed(target, &e.to_string());
        } else if worked {
            self.health.lane_succeeded(target);
        }
        Ok(Round {
            worked,
            effect: policy::strongest(effects),
            error: last_error,
        })
    }

    /// Sends the next telemetry batch (or dead letters asked to be retried). `None` when
    /// there was nothing to send or its retry is not due yet.
    async fn telemetry_round(&mut self) -> Result<Option<Result<(), CloudError>>, StoreError> {
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
                    .store
                    .call(move |db| db.telemetry_cursor(target))
                    .await?
                    .unwrap_or(0);
                self.cursor = Some(c);
                c
            }
        };
        let batch = self.config.batch;
        let items = self
            .store
            .call(move |db| db.telemetry_after(cursor, batch))
            .await?;
        let retrying = if items.is_empty() {
            self.store
                .call(move |db| db.telemetry_dead_items(target, batch))
                .await?
        } else {
            Vec::new()
        };
        let (items, is_retry) = if items.is_empty() {
            (retrying, true)
        } else {
            (items, false)
        };
        let Some(last) = items.last().map(|i| i.id) else {
            return Ok(None);
        };
        let result = self.deliver_points(&items).await;
        match result {
            Ok(dead) => {
                self.telemetry_retry = None;
                self.telemetry_attempts = 0;
                let sent = items.len() - dead.len();
                self.summary.points_sent += sent as u64;
                self.summary.points_dead += dead.len() as u64;
                if !dead.is_empty() {
                    tracing::warn!(points = dead.len(), first = dead[0].0, error = %dead[0].2,
                        "telemetry points refused by the cloud; dead-lettered (nn-gateway queue)");
                }
                if is_retry {
                    let ok: Vec<i64> = items
                        .iter()
                        .map(|i| i.id)
                        .filter(|id| !dead.iter().any(|d| d.0 == *id))
                        .collect();
                    self.store
                        .call(move |db| {
                            db.forget_dead_telemetry(target, &ok)?;
                            db.settle_telemetry(target, cursor, &dead)
                        })
                        .await?;
                } else {
                    self.store
                        .call(move |db| db.settle_telemetry(target, last, &dead))
                        .await?;
                    self.cursor = Some(last);
                }
                Ok(Some(Ok(())))
            }
            Err(e) => Ok(Some(Err(e))),
        }
    }

    /// Registers the batch's devices that have no id in the cloud yet, drops the points of
    /// devices that do not sync up, and sends the rest; bisects a refused batch. Returns the
    /// points refused for good: (telemetry id, device id, error).
    async fn deliver_points(
        &mut self,
        items: &[TelemetryItem],
    ) -> Result<Vec<(i64, i64, String)>, CloudError> {
        let target = self.target();
        let mut ids: HashMap<i64, String> = HashMap::new();
        for item in items {
            if ids.contains_key(&item.device.id) {
                continue;
            }
            let id = match item.device.remote_id(target) {
                Some(id) => id.to_owned(),
                None => {
                    let id = self.uplink.register(&item.device).await?;
                    self.summary.devices_registered += 1;
                    let (device, stored) = (item.device.id, id.clone());
                    if let Err(e) = self
                        .store
                        .call(move |db| db.set_remote_id(device, target, Some(&stored)))
                        .await
                    {
                        tracing::error!(error = %e, "cannot store the device's cloud id");
                    }
                    id
                }
            };
            ids.insert(item.device.id, id);
        }
        let mut accepted: HashMap<i64, bool> = HashMap::new();
        for (device, remote) in &ids {
            accepted.insert(*device, self.uplink.accepts(remote).await?);
        }
        let points: Vec<OutPoint<'_>> = items
            .iter()
            .filter(|i| accepted.get(&i.device.id).copied().unwrap_or(true))
            .map(|item| OutPoint {
                remote_id: ids[&item.device.id].as_str(),
                item,
                idempotency_key: format!("tm:{}:{}", self.config.install_id, item.id),
            })
            .collect();
        if points.is_empty() {
            return Ok(Vec::new());
        }
        let mut dead = Vec::new();
        match self.send_bisecting(&points, &mut dead).await {
            Ok(()) => {}
            Err(e) if is_missing_parent(&e) => {
                // The device's row is gone in the cloud (deleted there): forget the ids so that
                // the next try registers the devices again.
                tracing::warn!(error = %e, "a device of this batch no longer exists in the cloud; registering again");
                for device in ids.keys().copied() {
                    let _ = self
                        .store
                        .call(move |db| db.set_remote_id(device, target, None))
                        .await;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        let mut newest: BTreeMap<String, UnixMillis> = BTreeMap::new();
        for p in points
            .iter()
            .filter(|p| !dead.iter().any(|d| d.0 == p.item.id))
        {
            let at = newest
                .entry(p.remote_id.to_owned())
                .or_insert(p.item.received_at);
            *at = (*at).max(p.item.received_at);
        }
        let seen: Vec<(String, UnixMillis)> = newest.into_iter().collect();
        if let Err(e) = self.uplink.touch(&seen).await {
            tracing::debug!(error = %e, "last_seen not advanced; the next batch will");
        }
        Ok(dead)
    }

    /// Sends `points`; when the cloud refuses them for what they carry, halves the batch until
    /// the points at fault stand alone, and collects those in `dead`.
    async fn send_bisecting(
        &self,
        points: &[OutPoint<'_>],
        dead: &mut Vec<(i64, i64, String)>,
    ) -> Result<(), CloudError> {
        // Explicit stack instead of recursion (async recursion needs boxing).
        let mut todo: Vec<&[OutPoint<'_>]> = vec![points];
        while let Some(part) = todo.pop() {
            match self.uplink.send_telemetry(part).await {
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

    async fn summarise(&mut self) {
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
            .store
            .call(move |db| {
                db.record_sync_log(target, "uplink", count, failed, error.as_deref(), duration)
            })
            .await
        {
            tracing::warn!(error = %e, "cannot record the uplink summary locally");
        }
        if let Err(e) = self.uplink.summarise(&summary).await {
            tracing::debug!(error = %e, "uplink summary not recorded in the cloud");
        }
    }
}

/// 409 with PostgREST's foreign-key code: the device row the points refer to is gone.
fn is_missing_parent(e: &CloudError) -> bool {
    matches!(&e.failure, Failure::Status { status: 409, code: Some(code), .. } if code == "23503")
}

/// Registers the row's device if needed, then sends the row. Returns the id registered (to be
/// stored even when the send then fails) and the send's result.
async fn send_one<U: Uplink>(
    uplink: &U,
    row: &OutboxRow,
) -> (Option<String>, Result<(), CloudError>) {
    let target = uplink.target();
    let (remote, registered) = match row.device.remote_id(target) {
        Some(id) => (id.to_owned(), None),
        None => match uplink.register(&row.device).await {
            Ok(id) => (id.clone(), Some(id)),
            Err(e) => return (None, Err(e)),
        },
    };
    match uplink.accepts(&remote).await {
        Ok(true) => {}
        // The device does not sync up to this cloud: nothing is owed.
        Ok(false) => return (registered, Ok(())),
        Err(e) => return (registered, Err(e)),
    }
    let result = uplink.send_row(&remote, row).await;
    (registered, result)
}
