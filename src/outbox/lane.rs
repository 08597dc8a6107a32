//! One lane's loop: pumping rows and telemetry batches while the cloud answers, probing while
//! it does not, waiting for a new key after it refused ours. What one send does is in
//! [`super::send`]; what a failure means, in [`super::policy`].

mod batches;

use super::*;
use batches::InAir;

pub(super) struct Lane<U> {
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

impl<U: Uplink> Lane<U> {
    pub(super) fn new(uplink: U, config: LaneConfig, links: LaneLinks) -> Lane<U> {
        Lane {
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
        }
    }
}

/// The devices whose remote id these settlements store or forget: their registrations are
/// settled once the commit is in.
fn changed_devices(done: &[Settled]) -> Vec<i64> {
    done.iter()
        .filter(|s| s.remote_id != RemoteIdChange::Keep)
        .map(|s| s.row.device.id)
        .collect()
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

    pub(super) async fn run(mut self) {
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
                let changed = changed_devices(&done);
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
            let changed = changed_devices(&done);
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
