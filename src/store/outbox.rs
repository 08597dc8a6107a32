//! The outbox aggregate: the SQL of the uplink lanes.
//!
//! Two queues, one per kind of thing owed:
//! - **rows** in `outbox` for per-device operations (reported state now; registry and desired
//!   state later). A lane takes due rows (`pending` → `in_flight`), then settles each: done
//!   (deleted, with the device's remote id stored in the same transaction), retry at a time,
//!   or dead. A device with a row in flight gets no second one taken, so per device the order
//!   holds. Rows left `in_flight` by a crash are pending again at the next start.
//! - **telemetry** by a cursor per cloud over `telemetry.id` (see migration 2; its SQL is in
//!   `cursor.rs`): a batch is the points above the cursor; settling it moves the cursor.
//!   Points a cloud refuses go to `telemetry_dead`. Retention may delete points above the
//!   cursor while a batch holding them is in the air: the batch still settles by id range, so
//!   nothing fails and nothing returns.
//!
//! This file also holds what both share: the requeue of dead rows and dead letters, the queue
//! view, and the local sync log.

use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
use super::db::Db;
use super::doc::parse_doc;
use crate::model::{DeviceKey, Target, UnixMillis};

/// A row taken for sending.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub target: Target,
    pub operation: String,
    pub device: DeviceIdent,
    pub payload: Option<Value>,
    pub idempotency_key: String,
    /// Attempts before this one.
    pub attempts: u32,
}

/// What a lane needs to know of a device to address it in a cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdent {
    pub id: i64,
    pub key: DeviceKey,
    pub golioth_id: Option<String>,
    pub netneural_id: Option<String>,
}

impl DeviceIdent {
    pub fn remote_id(&self, target: Target) -> Option<&str> {
        match target {
            Target::Golioth => self.golioth_id.as_deref(),
            Target::NetNeural => self.netneural_id.as_deref(),
        }
    }
}

/// One telemetry point of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryItem {
    pub id: i64,
    pub device: DeviceIdent,
    pub device_ts: Option<UnixMillis>,
    pub received_at: UnixMillis,
    pub payload: Value,
}

/// How a taken row ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Delivered (or owed no more): the row goes.
    Done,
    /// Failed; tried again at `at`. `counted` adds one to its attempts.
    Retry {
        at: UnixMillis,
        error: String,
        counted: bool,
    },
    /// Refused for good: kept as dead, with the cloud's error, for the operator.
    Dead(String),
}

/// What becomes of the device's id in the row's cloud when the row settles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteIdChange {
    Keep,
    /// Found or created there: stored in the transaction that settles the row, so a crash
    /// between the create and this commit only costs a lookup, never a duplicate.
    Set(String),
    /// The device no longer exists there: registered again next time.
    Clear,
}

/// A taken row and how it ends ([`Db::settle_and_take`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    pub row: OutboxRow,
    pub remote_id: RemoteIdChange,
    pub how: Settlement,
}

/// One row of `nn-gateway queue`.
#[derive(Clone, Debug, Serialize)]
pub struct QueueRow {
    pub id: i64,
    pub target: String,
    pub kind: String,
    pub device: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
}

/// What `queue` shows: per cloud and state, then the rows that need attention.
#[derive(Clone, Debug, Serialize)]
pub struct QueueView {
    /// Telemetry points not yet settled, per cloud that takes telemetry.
    pub telemetry_backlog: Vec<(String, i64)>,
    pub rows: Vec<QueueRow>,
}

/// Which rows `queue retry` re-queues.
#[derive(Clone, Copy, Debug)]
pub enum Requeue {
    /// One outbox row by id.
    Row(i64),
    /// Every dead row and dead-lettered telemetry point.
    AllDead,
}

pub(super) fn key_of(s: String) -> rusqlite::Result<DeviceKey> {
    DeviceKey::parse(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

impl Db {
    /// Rows left "in flight" by a crash go back to "pending" (run once at start-up). A reported
    /// state row with a newer one for the same device and cloud (pending or in flight) is
    /// dropped instead: the newer one carries the whole document, and only one may be pending.
    pub fn requeue_in_flight(&mut self, target: Option<Target>) -> Result<usize, StoreError> {
        let now = UnixMillis::now().0;
        // NULL: every cloud (at start-up); else the one lane whose sends were abandoned.
        let only = target.map(Target::as_str);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM outbox WHERE state = 'in_flight' AND operation = 'reported_state'
               AND (?1 IS NULL OR target = ?1)
               AND EXISTS (SELECT 1 FROM outbox p WHERE p.operation = 'reported_state'
                           AND p.target = outbox.target AND p.device_id = outbox.device_id
                           AND (p.state = 'pending' OR (p.state = 'in_flight' AND p.id > outbox.id)))",
            [only],
        )?;
        let requeued = tx.execute(
            "UPDATE outbox SET state = 'pending', updated_at = ?1
             WHERE state = 'in_flight' AND (?2 IS NULL OR target = ?2)",
            params![now, only],
        )?;
        tx.commit()?;
        Ok(requeued)
    }

    /// Settles the rows a lane has finished with and takes up to `limit` due rows of `target`
    /// (marking them in flight), oldest due first, skipping devices that have a row in flight
    /// there — all in **one transaction**, so a lane pays one commit (one fsync with
    /// `synchronous=full`) per batch of answers, not one per row.
    pub fn settle_and_take(
        &mut self,
        target: Target,
        settled: &[Settled],
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let tx = self.write_tx()?;
        for s in settled {
            settle_row(&tx, s)?;
        }
        let rows = if limit == 0 {
            Vec::new()
        } else {
            take_due(&tx, target, now, limit)?
        };
        tx.commit()?;
        Ok(rows)
    }

    /// Takes up to `limit` due rows of `target` (see [`Db::settle_and_take`]).
    pub fn take_due(
        &mut self,
        target: Target,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.settle_and_take(target, &[], now, limit)
    }

    /// When the next pending row of `target` is due, if there is one.
    pub fn next_due(&self, target: Target) -> Result<Option<UnixMillis>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT min(next_attempt_at) FROM outbox WHERE target = ?1 AND state = 'pending'",
                [target.as_str()],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map(UnixMillis))
    }

    /// Stores (or, with `None`, forgets) devices' ids in a cloud, in one transaction.
    pub fn set_remote_ids(
        &mut self,
        target: Target,
        ids: &[(i64, Option<String>)],
    ) -> Result<(), StoreError> {
        let tx = self.write_tx()?;
        for (device_id, remote_id) in ids {
            set_remote_id(&tx, *device_id, target, remote_id.as_deref())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Re-queues dead rows (and, for `AllDead`, marks dead-lettered telemetry for another
    /// try). Returns how many. A dead reported-state row whose device has a newer row pending
    /// or in flight is superseded by it and goes instead; one that is requeued carries the
    /// device's current document, never the old one it failed with (a newer one may have been
    /// delivered since).
    pub fn requeue(&mut self, which: Requeue) -> Result<usize, StoreError> {
        let now = UnixMillis::now().0;
        let tx = self.write_tx()?;
        let filter = match which {
            Requeue::Row(_) => "id = ?1",
            Requeue::AllDead => "state = 'dead' AND ?1 = ?1",
        };
        let arg = match which {
            Requeue::Row(id) => id,
            Requeue::AllDead => 0,
        };
        tx.execute(
            &format!(
                "DELETE FROM outbox WHERE {filter} AND state IN ('dead', 'pending')
                   AND operation = 'reported_state'
                   AND EXISTS (SELECT 1 FROM outbox p WHERE p.target = outbox.target
                               AND p.device_id = outbox.device_id
                               AND p.state IN ('pending', 'in_flight')
                               AND p.operation = 'reported_state' AND p.id <> outbox.id)"
            ),
            [arg],
        )?;
        let mut n = tx.execute(
            &format!(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?2,
                        updated_at = ?2,
                        payload = CASE WHEN operation = 'reported_state'
                            THEN coalesce((SELECT r.doc FROM reported_state r
                                           WHERE r.device_id = outbox.device_id), payload)
                            ELSE payload END
                 WHERE {filter} AND state IN ('dead', 'pending')"
            ),
            params![arg, now],
        )?;
        if matches!(which, Requeue::AllDead) {
            n += tx.execute("UPDATE telemetry_dead SET retry = 1 WHERE retry = 0", [])?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// One row of the local sync log: a lane's work over a stretch of time.
    pub fn record_sync_log(
        &mut self,
        target: Target,
        operation: &str,
        count: u64,
        failed: u64,
        error: Option<&str>,
        duration_ms: i64,
    ) -> Result<(), StoreError> {
        let outcome = match (count, failed) {
            (_, 0) => "completed",
            (0, _) => "failed",
            _ => "partial",
        };
        self.conn.execute(
            "INSERT INTO sync_log(target, direction, operation, count, outcome, error, duration_ms, at)
             VALUES (?1, 'up', ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                target.as_str(),
                operation,
                i64::try_from(count).unwrap_or(i64::MAX),
                outcome,
                error,
                duration_ms,
                UnixMillis::now().0
            ],
        )?;
        // Bounded: the newest 10,000 rows are plenty for an operator.
        self.conn.execute(
            "DELETE FROM sync_log WHERE id <= (SELECT max(id) FROM sync_log) - 10000",
            [],
        )?;
        Ok(())
    }

    /// The queue for `nn-gateway queue`: telemetry backlog per cloud, then every row not done
    /// (in flight and dead first), at most `limit`.
    pub fn queue(&self, limit: usize) -> Result<QueueView, StoreError> {
        self.queue_of(None, None, limit)
    }

    /// [`Db::queue`] narrowed to one cloud and/or one state (`pending`, `in_flight`, `dead`).
    pub fn queue_of(
        &self,
        target: Option<&str>,
        state: Option<&str>,
        limit: usize,
    ) -> Result<QueueView, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut telemetry_backlog = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT target, delivered_through FROM telemetry_cursor ORDER BY target")?;
        let cursors = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        for (cloud, through) in cursors {
            if target.is_some_and(|t| t != cloud) {
                continue;
            }
            let n: i64 = self.conn.query_row(
                "SELECT count(*) FROM telemetry WHERE id > ?1",
                [through],
                |r| r.get(0),
            )?;
            telemetry_backlog.push((cloud, n));
        }
        let mut stmt = self.conn.prepare(
            "SELECT o.id, o.target, o.operation, d.key, o.state, o.attempts, o.next_attempt_at, o.last_error
             FROM outbox o JOIN device d ON d.id = o.device_id
             WHERE (?2 IS NULL OR o.target = ?2) AND (?3 IS NULL OR o.state = ?3)
             ORDER BY CASE o.state WHEN 'in_flight' THEN 0 WHEN 'dead' THEN 1 ELSE 2 END, o.id
             LIMIT ?1",
        )?;
        let mut rows = stmt
            .query_map(rusqlite::params![limit, target, state], |r| {
                let state: String = r.get(4)?;
                Ok(QueueRow {
                    id: r.get(0)?,
                    target: r.get(1)?,
                    kind: r.get(2)?,
                    device: r.get(3)?,
                    next_attempt_at: (state == "pending")
                        .then(|| UnixMillis(r.get::<_, i64>(6).unwrap_or(0)).to_rfc3339()),
                    state,
                    attempts: r.get(5)?,
                    last_error: r.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT x.telemetry_id, x.target, d.key, x.error FROM telemetry_dead x
             JOIN device d ON d.id = x.device_id
             WHERE (?2 IS NULL OR x.target = ?2) AND (?3 IS NULL OR ?3 = 'dead')
             ORDER BY x.telemetry_id LIMIT ?1",
        )?;
        rows.extend(
            stmt.query_map(rusqlite::params![limit, target, state], |r| {
                Ok(QueueRow {
                    id: r.get(0)?,
                    target: r.get(1)?,
                    kind: "telemetry point".into(),
                    device: r.get(2)?,
                    state: "dead".into(),
                    attempts: 1,
                    next_attempt_at: None,
                    last_error: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?,
        );
        Ok(QueueView {
            telemetry_backlog,
            rows,
        })
    }
}

fn set_remote_id(
    tx: &Transaction<'_>,
    device_id: i64,
    target: Target,
    remote_id: Option<&str>,
) -> rusqlite::Result<()> {
    let sql = match target {
        Target::Golioth => "UPDATE device SET golioth_id = ?2 WHERE id = ?1",
        Target::NetNeural => "UPDATE device SET netneural_id = ?2 WHERE id = ?1",
    };
    tx.prepare_cached(sql)?
        .execute(params![device_id, remote_id])?;
    Ok(())
}

fn take_due(
    tx: &Transaction<'_>,
    target: Target,
    now: UnixMillis,
    limit: usize,
) -> Result<Vec<OutboxRow>, StoreError> {
    let rows = {
        let mut stmt = tx.prepare_cached(
            "SELECT o.id, o.operation, o.payload, o.idempotency_key, o.attempts,
                    d.id, d.key, d.golioth_id, d.netneural_id
             FROM outbox o JOIN device d ON d.id = o.device_id
             WHERE o.target = ?1 AND o.state = 'pending' AND o.next_attempt_at <= ?2
               AND NOT EXISTS (SELECT 1 FROM outbox f WHERE f.target = o.target
                               AND f.device_id = o.device_id AND f.state = 'in_flight')
             ORDER BY o.next_attempt_at, o.id LIMIT ?3",
        )?;
        let mut seen = std::collections::HashSet::new();
        stmt.query_map(params![target.as_str(), now.0, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                target,
                operation: r.get(1)?,
                payload: r.get::<_, Option<String>>(2)?.map(|s| parse_doc(&s)),
                idempotency_key: r.get(3)?,
                attempts: r.get::<_, i64>(4)?.try_into().unwrap_or(u32::MAX),
                device: DeviceIdent {
                    id: r.get(5)?,
                    key: key_of(r.get(6)?)?,
                    golioth_id: r.get(7)?,
                    netneural_id: r.get(8)?,
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        // One row per device at a time, even within one take.
        .filter(|row| seen.insert(row.device.id))
        .collect::<Vec<_>>()
    };
    let mut mark =
        tx.prepare_cached("UPDATE outbox SET state = 'in_flight', updated_at = ?2 WHERE id = ?1")?;
    for row in &rows {
        mark.execute(params![row.id, now.0])?;
    }
    Ok(rows)
}

/// One settled row: the device's remote id change first, so that it commits with the row.
fn settle_row(tx: &Transaction<'_>, s: &Settled) -> rusqlite::Result<()> {
    let row = &s.row;
    match &s.remote_id {
        RemoteIdChange::Keep => {}
        RemoteIdChange::Set(id) => set_remote_id(tx, row.device.id, row.target, Some(id))?,
        RemoteIdChange::Clear => set_remote_id(tx, row.device.id, row.target, None)?,
    }
    let now = UnixMillis::now().0;
    match &s.how {
        Settlement::Done => {
            tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                .execute([row.id])?;
        }
        Settlement::Retry { at, error, counted } => {
            // If a newer value for the same device arrived meanwhile (reported state
            // coalesces), this one is superseded and goes instead.
            let superseded = row.operation == "reported_state"
                && tx
                    .prepare_cached(
                        "SELECT 1 FROM outbox WHERE target = ?1 AND device_id = ?2 AND state = 'pending'
                           AND operation = 'reported_state' AND id <> ?3",
                    )?
                    .query_row(
                        params![row.target.as_str(), row.device.id, row.id],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
            if superseded {
                tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                    .execute([row.id])?;
            } else {
                tx.prepare_cached(
                    "UPDATE outbox SET state = 'pending', attempts = attempts + ?2, next_attempt_at = ?3,
                            last_error = ?4, updated_at = ?5 WHERE id = ?1",
                )?
                .execute(params![row.id, i64::from(*counted), at.0, error, now])?;
            }
        }
        Settlement::Dead(error) => {
            tx.prepare_cached(
                "UPDATE outbox SET state = 'dead', attempts = attempts + 1, last_error = ?2,
                        updated_at = ?3 WHERE id = ?1",
            )?
            .execute(params![row.id, error, now])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
