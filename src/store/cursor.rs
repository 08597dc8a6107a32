//! The telemetry side of the outbox: one delivery cursor per cloud over `telemetry.id`
//! (migration 2), the batches above it, and the dead letters of points a cloud refused.
//! Every point at or below a cloud's cursor is settled for it; a batch is the id range above.
//!
//! Blocking; methods on [`Db`].

use rusqlite::{OptionalExtension, params};

use super::StoreError;
use super::db::Db;
use super::doc::parse_doc;
use super::outbox::{DeviceIdent, TelemetryItem, key_of};
use crate::model::{Target, UnixMillis};

/// A telemetry point with its device, from the columns `t.id, t.device_ts, t.received_at,
/// t.payload, d.id, d.key, d.golioth_id, d.netneural_id`.
fn telemetry_item(r: &rusqlite::Row<'_>) -> rusqlite::Result<TelemetryItem> {
    Ok(TelemetryItem {
        id: r.get(0)?,
        device_ts: r.get::<_, Option<i64>>(1)?.map(UnixMillis),
        received_at: UnixMillis(r.get(2)?),
        payload: parse_doc(&r.get::<_, String>(3)?),
        device: DeviceIdent {
            id: r.get(4)?,
            key: key_of(r.get(5)?)?,
            golioth_id: r.get(6)?,
            netneural_id: r.get(7)?,
        },
    })
}

impl Db {
    /// Telemetry items with their devices, from a query's `FROM …` onwards (over `t`, `d`).
    fn items(
        &self,
        from: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<TelemetryItem>, StoreError> {
        let sql = format!(
            "SELECT t.id, t.device_ts, t.received_at, t.payload,
                    d.id, d.key, d.golioth_id, d.netneural_id {from}"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(args, telemetry_item)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Everything up to this id is settled for `target`, or `None` when the cloud has never
    /// had a cursor (it was never enabled).
    pub fn telemetry_cursor(&self, target: Target) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT delivered_through FROM telemetry_cursor WHERE target = ?1",
                [target.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Creates the cursors of the clouds this daemon delivers telemetry to. A cloud enabled for
    /// the first time starts at the newest point: what was stored while no cloud wanted it is
    /// not owed. A cloud enabled again continues where it stopped.
    pub fn ensure_telemetry_cursors(&mut self) -> Result<(), StoreError> {
        let targets: Vec<Target> = self
            .targets()
            .iter()
            .copied()
            .filter(|t| t.takes_telemetry())
            .collect();
        for target in targets {
            self.conn.execute(
                "INSERT INTO telemetry_cursor(target, delivered_through, updated_at)
                 SELECT ?1, coalesce(max(id), 0), ?2 FROM telemetry WHERE true
                 ON CONFLICT(target) DO NOTHING",
                params![target.as_str(), UnixMillis::now().0],
            )?;
        }
        Ok(())
    }

    /// Up to `limit` points above `after`, in id order, with their devices.
    pub fn telemetry_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<TelemetryItem>, StoreError> {
        self.items(
            "FROM telemetry t JOIN device d ON d.id = t.device_id
             WHERE t.id > ?1 ORDER BY t.id LIMIT ?2",
            params![after, limit as i64],
        )
    }

    /// Settles a batch: the cursor moves to `through` (never back), and the points refused
    /// for what they carry are dead-lettered, in one transaction.
    pub fn settle_telemetry(
        &mut self,
        target: Target,
        through: i64,
        dead: &[(i64, i64, String)],
    ) -> Result<(), StoreError> {
        let now = UnixMillis::now().0;
        let tx = self.write_tx()?;
        for (telemetry_id, device_id, error) in dead {
            tx.prepare_cached(
                "INSERT INTO telemetry_dead(target, telemetry_id, device_id, error, at)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM telemetry WHERE id = ?2)
                 ON CONFLICT(target, telemetry_id) DO UPDATE SET error = excluded.error, at = excluded.at, retry = 0",
            )?
            .execute(params![target.as_str(), telemetry_id, device_id, error, now])?;
        }
        tx.prepare_cached(
            "INSERT INTO telemetry_cursor(target, delivered_through, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(target) DO UPDATE SET
                 delivered_through = max(delivered_through, excluded.delivered_through),
                 updated_at = excluded.updated_at",
        )?
        .execute(params![target.as_str(), through, now])?;
        tx.commit()?;
        Ok(())
    }

    /// Dead-lettered points of `target` to send again (`queue retry --all-dead`), oldest first.
    pub fn telemetry_dead_items(
        &self,
        target: Target,
        limit: usize,
    ) -> Result<Vec<TelemetryItem>, StoreError> {
        self.items(
            "FROM telemetry_dead x JOIN telemetry t ON t.id = x.telemetry_id
             JOIN device d ON d.id = t.device_id
             WHERE x.target = ?1 AND x.retry = 1 ORDER BY t.id LIMIT ?2",
            params![target.as_str(), limit as i64],
        )
    }

    /// Removes dead-lettered points that were sent again successfully.
    pub fn forget_dead_telemetry(&mut self, target: Target, ids: &[i64]) -> Result<(), StoreError> {
        let tx = self.write_tx()?;
        for id in ids {
            tx.prepare_cached(
                "DELETE FROM telemetry_dead WHERE target = ?1 AND telemetry_id = ?2",
            )?
            .execute(params![target.as_str(), id])?;
        }
        tx.commit()?;
        Ok(())
    }
}
