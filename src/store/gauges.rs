//! What `/metrics` reads from the database at each scrape (see
//! [`crate::metrics::Metrics::refresh_from`]): outbox rows per cloud and state, each cloud's
//! oldest undelivered row, the telemetry backlog above each cloud's cursor, conflicts
//! pending, file sizes.
//!
//! Blocking; a method on [`Db`]. Telemetry is only read above each delivery cursor (a range
//! of its primary key), so a scrape costs what is owed, not what is kept.

use std::path::PathBuf;

use rusqlite::OptionalExtension;

use super::StoreError;
use super::db::Db;
use super::views::OutboxCount;
use crate::model::UnixMillis;

/// The database's share of the metrics, read in one go.
#[derive(Clone, Debug)]
pub struct Gauges {
    /// Rows per cloud and state (only the pairs that have rows).
    pub outbox: Vec<OutboxCount>,
    /// Per cloud with undelivered rows (pending or in flight): when the oldest was created.
    pub oldest_undelivered: Vec<(String, UnixMillis)>,
    /// Per cloud that takes telemetry (has a cursor): what is above its cursor.
    pub telemetry_backlog: Vec<TelemetryBacklog>,
    pub conflicts_pending: i64,
    pub db_bytes: u64,
    pub wal_bytes: u64,
}

/// Telemetry a cloud has not settled yet (above its delivery cursor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryBacklog {
    pub target: String,
    pub points: i64,
    /// When the oldest of them was received; `None` without any.
    pub oldest: Option<UnixMillis>,
}

impl Db {
    /// Reads [`Gauges`].
    ///
    /// # Errors
    /// When a query fails.
    pub fn gauges(&self) -> Result<Gauges, StoreError> {
        let c = &self.conn;
        let outbox = self.outbox_counts()?;
        let oldest_undelivered = c
            .prepare_cached(
                "SELECT target, min(created_at) FROM outbox WHERE state IN ('pending', 'in_flight')
                 GROUP BY target ORDER BY target",
            )?
            .query_map([], |r| Ok((r.get(0)?, UnixMillis(r.get(1)?))))?
            .collect::<Result<Vec<_>, _>>()?;
        let cursors = c
            .prepare_cached(
                "SELECT target, delivered_through FROM telemetry_cursor ORDER BY target",
            )?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut telemetry_backlog = Vec::with_capacity(cursors.len());
        for (target, through) in cursors {
            let points = c
                .prepare_cached("SELECT count(*) FROM telemetry WHERE id > ?1")?
                .query_row([through], |r| r.get(0))?;
            let oldest = c
                .prepare_cached(
                    "SELECT received_at FROM telemetry WHERE id > ?1 ORDER BY id LIMIT 1",
                )?
                .query_row([through], |r| r.get(0))
                .optional()?
                .map(UnixMillis);
            telemetry_backlog.push(TelemetryBacklog {
                target,
                points,
                oldest,
            });
        }
        let conflicts_pending = c.query_row(
            "SELECT count(*) FROM conflict WHERE status = 'pending'",
            [],
            |r| r.get(0),
        )?;
        let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = self.path().as_os_str().to_owned();
        wal.push("-wal");
        Ok(Gauges {
            outbox,
            oldest_undelivered,
            telemetry_backlog,
            conflicts_pending,
            db_bytes: size(self.path().to_owned()),
            wal_bytes: size(PathBuf::from(wal)),
        })
    }
}
