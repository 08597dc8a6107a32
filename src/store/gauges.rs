//! What `/metrics` reads from the database at each scrape (see
//! [`crate::metrics::Metrics::refresh_from`]): outbox rows per cloud and state, each cloud's
//! oldest undelivered row, conflicts pending, file sizes.
//!
//! Blocking; a method on [`Db`]. Every query is an index scan of the outbox or the conflicts,
//! never of telemetry, so a scrape stays cheap however much telemetry is kept.

use std::path::PathBuf;

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
    pub conflicts_pending: i64,
    pub db_bytes: u64,
    pub wal_bytes: u64,
}

impl Db {
    /// Reads [`Gauges`].
    ///
    /// # Errors
    /// When a query fails.
    pub fn gauges(&self) -> Result<Gauges, StoreError> {
        let c = &self.conn;
        let outbox = c
            .prepare_cached(
                "SELECT target, state, count(*) FROM outbox GROUP BY target, state ORDER BY target, state",
            )?
            .query_map([], |r| {
                Ok(OutboxCount {
                    target: r.get(0)?,
                    state: r.get(1)?,
                    rows: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let oldest_undelivered = c
            .prepare_cached(
                "SELECT target, min(created_at) FROM outbox WHERE state IN ('pending', 'in_flight')
                 GROUP BY target ORDER BY target",
            )?
            .query_map([], |r| Ok((r.get(0)?, UnixMillis(r.get(1)?))))?
            .collect::<Result<Vec<_>, _>>()?;
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
            conflicts_pending,
            db_bytes: size(self.path().to_owned()),
            wal_bytes: size(PathBuf::from(wal)),
        })
    }
}
