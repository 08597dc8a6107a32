//! Bounded disk: telemetry retention by age and by the database's size.
//!
//! Blocking; run on the store thread every [`RETENTION_EVERY`] by the retention task
//! ([`crate::retention`]).
//!
//! - **Age.** Telemetry older than `storage.telemetry_max_age` goes once nothing is owed on it
//!   (at or below the delivery cursor of every enabled cloud that takes telemetry): points
//!   still owed to a cloud wait for their delivery, however old.
//! - **Size.** When the space the database uses passes `storage.max_size_mib`, the oldest
//!   telemetry goes until it is back under [`LOW_WATER`] of the ceiling: first points already
//!   delivered (or owed to no cloud), then, only if that is not enough, the oldest undelivered
//!   ones. Those are counted (`telemetry_dropped_undelivered` in
//!   `status`) and logged, since a cloud will never see them.
//!
//! Reported state, desired state, conflicts and the outbox rows of anything but telemetry are
//! never dropped. Deleting rows returns their pages to SQLite's free list, where new rows
//! reuse them: the file stops growing rather than shrinking.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::{Target, UnixMillis};

/// How often the daemon enforces retention.
pub const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Rows deleted per transaction, so a large clean-up never holds the write lock for long.
pub const CHUNK: i64 = 1000;

/// Transactions per pass. A pass runs on the store thread, so it is bounded to keep ingest
/// waiting for milliseconds, not seconds; when there is more to delete the daemon runs the
/// next pass right after the writes that queued meanwhile.
const CHUNKS_PER_PASS: u32 = 20;

/// After passing the ceiling, space is freed down to this fraction of it, so retention does not
/// run at every pass once the database is full.
pub const LOW_WATER: f64 = 0.9;

/// What retention may delete.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub max_bytes: u64,
    /// `None`: no age limit.
    pub max_age: Option<Duration>,
    /// Rows per transaction ([`CHUNK`] in the daemon).
    pub chunk: i64,
}

/// What one pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub aged_out: u64,
    pub dropped_delivered: u64,
    pub dropped_undelivered: u64,
    /// The pass stopped at its bound with work left.
    pub more: bool,
}

/// Telemetry with nothing owed on it: at or below the cursor of every cloud that takes it
/// (`owed` lists those clouds; with none, every point is settled).
fn delivered(conn: &Connection, owed: &[Target]) -> rusqlite::Result<String> {
    let mut through = i64::MAX;
    for target in owed.iter().filter(|t| t.takes_telemetry()) {
        let cursor: Option<i64> = conn
            .query_row(
                "SELECT delivered_through FROM telemetry_cursor WHERE target = ?1",
                [target.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        through = through.min(cursor.unwrap_or(0));
    }
    Ok(format!("t.id <= {through}"))
}

pub fn enforce(
    conn: &mut Connection,
    policy: &Policy,
    owed: &[Target],
) -> rusqlite::Result<Report> {
    let mut report = Report::default();
    let delivered = delivered(conn, owed)?;
    let delivered = delivered.as_str();
    let mut budget = CHUNKS_PER_PASS;
    if let Some(age) = policy.max_age {
        let cutoff = UnixMillis::now().0 - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let filter = format!("t.received_at < {cutoff} AND {delivered}");
        while budget > 0 {
            budget -= 1;
            match delete_oldest(conn, &filter, policy.chunk)? {
                0 => break,
                n => report.aged_out += n,
            }
        }
    }
    if used_bytes(conn)? > policy.max_bytes {
        let target = (policy.max_bytes as f64 * LOW_WATER) as u64;
        for (filter, undelivered) in [(delivered, false), ("1", true)] {
            while budget > 0 && used_bytes(conn)? > target {
                budget -= 1;
                match delete_oldest(conn, filter, policy.chunk)? {
                    0 => break,
                    n if undelivered => report.dropped_undelivered += n,
                    n => report.dropped_delivered += n,
                }
            }
        }
    }
    report.more = budget == 0;
    if report.dropped_undelivered > 0 {
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('telemetry_dropped_undelivered', ?1)
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
            [report.dropped_undelivered as i64],
        )?;
    }
    Ok(report)
}

/// Pages in use (not on the free list), in bytes.
pub fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(u64::try_from((pages - free) * size).unwrap_or(0))
}

/// Deletes up to [`CHUNK`] of the oldest telemetry rows matching `filter` (over alias `t`),
/// never the newest row of all: SQLite gives a new row `max(id) + 1`, so keeping it means ids
/// are never reused — a point below a cloud's cursor would count as delivered, and its derived
/// idempotency key would collide with one the cloud already holds.
/// with their dead letters, in one transaction. Returns how many went. A batch of the points
/// in the air meanwhile settles by id range, so it neither fails nor brings them back.
fn delete_oldest(conn: &mut Connection, filter: &str, chunk: i64) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "CREATE TEMP TABLE IF NOT EXISTS doomed(id INTEGER PRIMARY KEY)",
        [],
    )?;
    tx.execute("DELETE FROM temp.doomed", [])?;
    tx.execute(
        &format!(
            "INSERT INTO temp.doomed(id) SELECT t.id FROM telemetry t
             WHERE {filter} AND t.id < (SELECT max(id) FROM telemetry) ORDER BY t.id LIMIT ?1"
        ),
        params![chunk],
    )?;
    tx.execute(
        "DELETE FROM telemetry_dead WHERE telemetry_id IN (SELECT id FROM temp.doomed)",
        [],
    )?;
    let n = tx.execute(
        "DELETE FROM telemetry WHERE id IN (SELECT id FROM temp.doomed)",
        [],
    )?;
    tx.commit()?;
    Ok(n as u64)
}
