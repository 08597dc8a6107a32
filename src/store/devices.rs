//! The devices aggregate: desired documents (the operator's edits, and soon the clouds'),
//! their publication, and the device views of `nn-gateway devices`.
//!
//! Blocking; methods on [`Db`].

use rusqlite::{OptionalExtension, params};
use serde_json::Value;

use super::StoreError;
use super::db::Db;
use super::doc::parse_doc;
use super::sync::write_desired;
use super::views::{DeviceLinks, DeviceView, TelemetryView};
use super::write::upsert_device;
use crate::model::{DesiredDoc, DeviceKey, Origin, UnixMillis};

impl Db {
    /// A device's newest telemetry points, newest first, received at or after `since`.
    pub fn telemetry_of(
        &self,
        device: &DeviceKey,
        since: Option<UnixMillis>,
        limit: usize,
    ) -> Result<Vec<TelemetryView>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT t.id, t.device_ts, t.received_at, t.payload
             FROM telemetry t JOIN device v ON v.id = t.device_id
             WHERE v.key = ?1 AND t.received_at >= ?2 ORDER BY t.id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                device.as_str(),
                since.map_or(i64::MIN, |t| t.0),
                limit as i64
            ],
            |r| {
                Ok(TelemetryView {
                    id: r.get(0)?,
                    device_ts: r.get::<_, Option<i64>>(1)?.map(UnixMillis),
                    received_at: UnixMillis(r.get(2)?),
                    payload: parse_doc(&r.get::<_, String>(3)?),
                })
            },
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Whether the mirror knows this device (deleted or not).
    pub fn device_exists(&self, device: &DeviceKey) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM device WHERE key = ?1",
                [device.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Replaces a device's desired document (the local operator's edit, or a merged cloud
    /// value), creating the device if it is new. Returns the stored document.
    pub fn set_desired(
        &mut self,
        device: &DeviceKey,
        doc: &Value,
        by: Origin,
    ) -> Result<DesiredDoc, StoreError> {
        let now = UnixMillis::now().0;
        // IMMEDIATE: take the write lock before reading, so a commit by the daemon in between
        // cannot turn this into SQLITE_BUSY_SNAPSHOT (which the busy timeout does not cover).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (device_id, _) = upsert_device(&tx, device, by, now, false)?;
        let (seq, version) = write_desired(&tx, device_id, doc, by, now)?;
        tx.commit()?;
        Ok(DesiredDoc {
            device: device.clone(),
            doc: doc.clone(),
            version,
            seq,
        })
    }

    /// A device's desired document, if it has one.
    pub fn desired(&self, device: &DeviceKey) -> Result<Option<DesiredDoc>, StoreError> {
        self.conn
            .query_row(
                "SELECT d.doc, d.version, d.seq FROM desired_state d JOIN device v ON v.id = d.device_id
                 WHERE v.key = ?1",
                [device.as_str()],
                |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .map(|(doc, version, seq)| desired_doc(device.as_str(), &doc, version, seq))
            .transpose()
    }

    /// Desired documents changed after `seq`, oldest change first.
    pub fn desired_since(&self, seq: i64, limit: usize) -> Result<Vec<DesiredDoc>, StoreError> {
        self.desired_where("d.seq > ?1", seq, limit)
    }

    /// Desired documents whose newest change the broker has not acknowledged.
    pub fn desired_unpublished(&self, limit: usize) -> Result<Vec<DesiredDoc>, StoreError> {
        self.desired_where("d.published_seq < d.seq AND ?1 = ?1", 0, limit)
    }

    fn desired_where(
        &self,
        cond: &str,
        arg: i64,
        limit: usize,
    ) -> Result<Vec<DesiredDoc>, StoreError> {
        let sql = format!(
            "SELECT v.key, d.doc, d.version, d.seq FROM desired_state d JOIN device v ON v.id = d.device_id
             WHERE {cond} ORDER BY d.seq LIMIT ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![arg, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get(3)?,
            ))
        })?;
        rows.map(|row| {
            let (key, doc, version, seq) = row?;
            desired_doc(&key, &doc, version, seq)
        })
        .collect()
    }

    /// Records that the broker acknowledged the desired document with this `seq`.
    pub fn mark_desired_published(
        &mut self,
        device: &DeviceKey,
        seq: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE desired_state SET published_seq = max(published_seq, ?2)
             WHERE device_id = (SELECT id FROM device WHERE key = ?1)",
            params![device.as_str(), seq],
        )?;
        Ok(())
    }

    /// Every device, by key (`nn-gateway devices`).
    pub fn devices(&self) -> Result<Vec<DeviceView>, StoreError> {
        Ok(self.devices_page(None, usize::MAX, 0)?.0)
    }

    /// One page of devices by key, those whose key contains `search` (case-insensitive) if
    /// given, and how many match in all.
    pub fn devices_page(
        &self,
        search: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<DeviceView>, i64), StoreError> {
        // `instr` on lower(): no LIKE wildcards to escape in what an operator types.
        let filter = "v.deleted_at IS NULL AND (?1 IS NULL OR instr(lower(v.key), lower(?1)) > 0)";
        let search = search.filter(|s| !s.is_empty());
        let total: i64 = self.conn.query_row(
            &format!("SELECT count(*) FROM device v WHERE {filter}"),
            [search],
            |r| r.get(0),
        )?;
        let mut stmt = self.conn.prepare(&format!(
            "{DEVICE_VIEW} WHERE {filter} ORDER BY v.key LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(
            params![
                search,
                i64::try_from(limit).unwrap_or(i64::MAX),
                i64::try_from(offset).unwrap_or(i64::MAX)
            ],
            device_view,
        )?;
        Ok((rows.collect::<Result<Vec<_>, _>>()?, total))
    }

    /// One device with its ids in each cloud, or `None` if the mirror does not know it.
    pub fn device(
        &self,
        device: &DeviceKey,
    ) -> Result<Option<(DeviceView, DeviceLinks)>, StoreError> {
        let sql = format!("{DEVICE_VIEW} WHERE v.key = ?1 AND v.deleted_at IS NULL");
        self.conn
            .query_row(&sql, [device.as_str()], |r| {
                Ok((
                    device_view(r)?,
                    DeviceLinks {
                        golioth: r.get(11)?,
                        netneural: r.get(12)?,
                    },
                ))
            })
            .optional()
            .map_err(Into::into)
    }

    /// A device's telemetry payloads in arrival order (for tests and diagnostics).
    pub fn telemetry_payloads(&self, device: &DeviceKey) -> Result<Vec<Value>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT t.payload FROM telemetry t JOIN device v ON v.id = t.device_id
             WHERE v.key = ?1 ORDER BY t.id",
        )?;
        let rows = stmt.query_map([device.as_str()], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(parse_doc(&r?))).collect()
    }
}

/// The columns of a [`DeviceView`] (then the device's cloud ids), for [`device_view`].
const DEVICE_VIEW: &str =
    "SELECT v.key, v.origin, v.first_seen, v.last_seen, r.doc, r.version, d.doc,
            d.version, (SELECT count(*) FROM telemetry t WHERE t.device_id = v.id),
            v.golioth_removed_at, v.netneural_removed_at, v.golioth_id, v.netneural_id
     FROM device v
     LEFT JOIN reported_state r ON r.device_id = v.id
     LEFT JOIN desired_state d ON d.device_id = v.id";

fn device_view(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceView> {
    Ok(DeviceView {
        key: r.get(0)?,
        origin: r.get(1)?,
        first_seen: UnixMillis(r.get(2)?),
        last_seen: r.get::<_, Option<i64>>(3)?.map(UnixMillis),
        reported: r.get::<_, Option<String>>(4)?.map(|s| parse_doc(&s)),
        reported_version: r.get(5)?,
        desired: r.get::<_, Option<String>>(6)?.map(|s| parse_doc(&s)),
        desired_version: r.get(7)?,
        telemetry_points: r.get(8)?,
        removed_from: [("golioth", 9), ("netneural", 10)]
            .into_iter()
            .filter_map(|(cloud, i)| {
                r.get::<_, Option<i64>>(i)
                    .ok()
                    .flatten()
                    .map(|_| cloud.to_owned())
            })
            .collect(),
    })
}

fn desired_doc(key: &str, doc: &str, version: i64, seq: i64) -> Result<DesiredDoc, StoreError> {
    let device = DeviceKey::parse(key).map_err(StoreError::Corrupt)?;
    Ok(DesiredDoc {
        device,
        doc: parse_doc(doc),
        version,
        seq,
    })
}
