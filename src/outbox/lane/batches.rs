//! The telemetry side of a lane: which batch goes next (points above those in the air, or
//! dead letters asked to be retried), and settling the answers in id order, so the cursor
//! never passes a batch still unanswered.

use super::*;

/// A telemetry batch in the air, in id order with the others.
pub(super) struct InAir {
    pub(super) seq: u64,
    /// Its newest point id.
    pub(super) last: i64,
    /// Dead letters sent again (their ids), rather than points above the cursor.
    pub(super) retry: Option<Vec<i64>>,
    pub(super) outcome: Option<BatchOutcome>,
}

impl<U: Uplink> Lane<U> {
    /// The next telemetry batch to send: the points above those already in the air, or, when
    /// nothing is in the air and nothing is above the cursor, dead letters asked to be retried
    /// (with their ids). `None` when there is nothing, or a failed batch is not due again yet.
    pub(super) async fn next_batch(
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
    pub(super) async fn fill_telemetry(
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
    pub(super) async fn settle_batches(
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
}
