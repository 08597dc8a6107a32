//! The sync log as `nn-gateway sync-log` reads it, and its retention. Rows are written by a
//! run's commit (`store::sync`) and by the outbox lanes' summaries (`store::outbox`).
//!
//! Blocking; methods on [`Db`].

use rusqlite::params;
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
use super::db::Db;
use super::sync::json_opt;
use crate::model::UnixMillis;

/// A sync log row as `nn-gateway sync-log` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyncLogView {
    pub id: i64,
    pub run_id: Option<i64>,
    pub at: String,
    pub target: String,
    pub direction: String,
    pub operation: String,
    pub device: Option<String>,
    pub count: i64,
    pub conflicts: i64,
    pub outcome: String,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub details: Option<Value>,
}

impl Db {
    /// Deletes sync log rows older than `before`; returns how many.
    pub fn prune_sync_log(&mut self, before: UnixMillis) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM sync_log WHERE at < ?1", [before.0])?)
    }

    /// The sync log, newest first, optionally narrowed to a cloud and an outcome, and to rows
    /// older than the row `before` (the next page after a page ending at that id).
    pub fn sync_log(
        &self,
        target: Option<&str>,
        outcome: Option<&str>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<SyncLogView>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT s.id, s.run_id, s.at, s.target, s.direction, s.operation, v.key, s.count,
                    s.conflicts, s.outcome, s.error, s.duration_ms, s.details
             FROM sync_log s LEFT JOIN device v ON v.id = s.device_id
             WHERE (?1 IS NULL OR s.target = ?1) AND (?2 IS NULL OR s.outcome = ?2)
               AND (?4 IS NULL OR s.id < ?4)
             ORDER BY s.id DESC LIMIT ?3",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![target, outcome, limit, before], |r| {
            Ok(SyncLogView {
                id: r.get(0)?,
                run_id: r.get(1)?,
                at: UnixMillis(r.get(2)?).to_rfc3339(),
                target: r.get(3)?,
                direction: r.get(4)?,
                operation: r.get(5)?,
                device: r.get(6)?,
                count: r.get(7)?,
                conflicts: r.get(8)?,
                outcome: r.get(9)?,
                error: r.get(10)?,
                duration_ms: r.get(11)?,
                details: json_opt(r.get(12)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}
