//! The reconciliation aggregate: what a sync run reads about every device (its syncable
//! document, per cloud the merge base, the cloud's last-read copy and the fields a pending
//! conflict holds) and what it commits in one transaction afterwards (the mirror's new values,
//! bases, copies, links, removal marks, conflicts, cursors and the sync log).
//!
//! Documents are handed out as their parts (name, tags, enabled, desired); the sync layer
//! turns them into fields ([`crate::reconcile::flatten`]). Bases and copies are stored as
//! field maps: a JSON object of JSON Pointer → value (`sync_base` one row per field).
//!
//! Blocking; methods on [`Db`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::Value;

use super::StoreError;
pub use super::conflict::{ConflictView, Resolution, ResolveError, Resolved};
use super::db::Db;
use super::doc::parse_doc;
pub use super::sync_log::SyncLogView;
use crate::model::{DeviceKey, Origin, Target, UnixMillis};

/// JSON Pointer → leaf value (the same shape as [`crate::reconcile::Fields`]).
pub type Fields = BTreeMap<String, Value>;

/// A cloud's copy of a device, as last read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteCopy {
    pub fields: Fields,
    /// The cloud's own change time of the row.
    pub remote_at: Option<UnixMillis>,
    /// The cloud's version of the row (NetNeural's exact `updated_at`), the guard of a write.
    pub version: Option<String>,
    /// What a write must carry back (NetNeural's whole `metadata`).
    pub extra: Option<Value>,
}

/// Per cloud, what the merge needs besides the cloud's current document.
#[derive(Clone, Debug, Default)]
pub struct SpokeState {
    pub base: Fields,
    pub copy: Option<RemoteCopy>,
    /// Fields a pending conflict holds.
    pub held: BTreeSet<String>,
}

/// A device as a sync run sees it.
#[derive(Clone, Debug)]
pub struct SyncDevice {
    pub id: i64,
    pub key: DeviceKey,
    pub origin: String,
    pub golioth_id: Option<String>,
    pub netneural_id: Option<String>,
    pub golioth_removed_at: Option<UnixMillis>,
    pub netneural_removed_at: Option<UnixMillis>,
    /// NetNeural's `sync_direction` for this integration, if an assignment said.
    pub netneural_direction: Option<String>,
    pub name: Option<String>,
    pub tags: Vec<String>,
    pub enabled: Option<bool>,
    pub desired: Option<Value>,
    /// The newest local change of the metadata or the desired document.
    pub local_at: Option<UnixMillis>,
    pub golioth: SpokeState,
    pub netneural: SpokeState,
}

impl SyncDevice {
    pub fn spoke(&self, target: Target) -> &SpokeState {
        match target {
            Target::Golioth => &self.golioth,
            Target::NetNeural => &self.netneural,
        }
    }

    pub fn remote_id(&self, target: Target) -> Option<&str> {
        match target {
            Target::Golioth => self.golioth_id.as_deref(),
            Target::NetNeural => self.netneural_id.as_deref(),
        }
    }

    pub fn removed_at(&self, target: Target) -> Option<UnixMillis> {
        match target {
            Target::Golioth => self.golioth_removed_at,
            Target::NetNeural => self.netneural_removed_at,
        }
    }
}

/// The device's metadata, as the mirror stores it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub name: Option<String>,
    pub tags: Vec<String>,
    pub enabled: Option<bool>,
}

/// A conflict found by a run, to be stored.
#[derive(Clone, Debug, PartialEq)]
pub struct NewConflict {
    pub target: Target,
    pub field: String,
    pub local: Option<Value>,
    pub remote: Option<Value>,
    pub base: Option<Value>,
    pub local_at: Option<UnixMillis>,
    pub remote_at: Option<UnixMillis>,
    /// `pending` (held for an operator) or `auto_resolved`.
    pub status: &'static str,
    /// The strategy that settled it (`local_wins`, `remote_wins`, `newest_wins`, `manual`).
    pub strategy: &'static str,
    pub resolved_value: Option<Value>,
}

/// What one run commits for one device. `None` / empty parts stay as they are.
#[derive(Clone, Debug, Default)]
pub struct DeviceCommit {
    pub id: i64,
    pub meta: Option<Meta>,
    /// A new desired document (`Some(None)`: removed, stored as `{}`), written by `by`.
    pub desired: Option<Value>,
    pub desired_by: Option<Origin>,
    /// New links to a cloud's device id.
    pub links: Vec<(Target, String)>,
    /// Removal marks: `Some(time)` marks the device removed there, `None` clears the mark.
    pub removed: Vec<(Target, Option<UnixMillis>)>,
    pub netneural_direction: Option<Option<String>>,
    /// Whole bases replaced.
    pub bases: Vec<(Target, Fields)>,
    pub copies: Vec<(Target, RemoteCopy)>,
    pub conflicts: Vec<NewConflict>,
}

/// One sync log row.
#[derive(Clone, Debug, Default)]
pub struct LogEntry {
    pub target: String,
    /// `up`, `down` or `both`.
    pub direction: &'static str,
    pub operation: String,
    pub device_id: Option<i64>,
    pub count: i64,
    pub conflicts: i64,
    /// `completed`, `partial` or `failed`.
    pub outcome: &'static str,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub details: Option<Value>,
}

/// Everything a run commits, in one transaction.
#[derive(Clone, Debug, Default)]
pub struct SyncCommit {
    pub devices: Vec<DeviceCommit>,
    /// (cloud, kind, value): where the next incremental read resumes.
    pub cursors: Vec<(Target, &'static str, String)>,
    /// The run's row first: its id becomes every row's `run_id`.
    pub log: Vec<LogEntry>,
    /// The run's summary, kept (quiet runs too) for `status` and `sync now`.
    pub summary: Option<Value>,
}

/// What a commit did, for the caller's logging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    pub run_id: Option<i64>,
    /// Desired documents that changed (each published to its device once, by the downlink).
    pub desired_changed: usize,
    pub conflicts_stored: usize,
}

pub(super) fn json_opt(raw: Option<String>) -> Option<Value> {
    raw.map(|s| parse_doc(&s))
}

pub(super) fn text_opt(v: &Option<Value>) -> Option<String> {
    v.as_ref().map(Value::to_string)
}

pub(super) fn target_of(raw: &str) -> Result<Target, StoreError> {
    match raw {
        "golioth" => Ok(Target::Golioth),
        "netneural" => Ok(Target::NetNeural),
        other => Err(StoreError::Corrupt(format!("unknown cloud {other:?}"))),
    }
}

fn fields_of(raw: &str) -> Fields {
    match parse_doc(raw) {
        Value::Object(m) => m.into_iter().collect(),
        _ => Fields::new(),
    }
}

fn fields_text(fields: &Fields) -> String {
    Value::Object(fields.clone().into_iter().collect()).to_string()
}

pub(super) fn rfc(t: Option<i64>) -> Option<String> {
    t.map(|t| UnixMillis(t).to_rfc3339())
}

impl Db {
    /// Every device (removed ones included), with its per-cloud merge state.
    pub fn sync_devices(&self) -> Result<Vec<SyncDevice>, StoreError> {
        let mut devices: Vec<SyncDevice> = Vec::new();
        let mut index: HashMap<i64, usize> = HashMap::new();
        {
            let mut stmt = self.conn.prepare(
                "SELECT v.id, v.key, v.origin, v.golioth_id, v.netneural_id, v.golioth_removed_at,
                        v.netneural_removed_at, v.netneural_direction, v.name, v.tags, v.enabled,
                        d.doc, max(coalesce(v.meta_updated_at, 0), coalesce(d.updated_at, 0))
                 FROM device v LEFT JOIN desired_state d ON d.device_id = v.id
                 WHERE v.deleted_at IS NULL ORDER BY v.id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let key: String = r.get(1)?;
                let tags: String = r.get(9)?;
                let at: i64 = r.get(12)?;
                let device = SyncDevice {
                    id: r.get(0)?,
                    key: DeviceKey::parse(&key).map_err(StoreError::Corrupt)?,
                    origin: r.get(2)?,
                    golioth_id: r.get(3)?,
                    netneural_id: r.get(4)?,
                    golioth_removed_at: r.get::<_, Option<i64>>(5)?.map(UnixMillis),
                    netneural_removed_at: r.get::<_, Option<i64>>(6)?.map(UnixMillis),
                    netneural_direction: r.get(7)?,
                    name: r.get(8)?,
                    tags: serde_json::from_str(&tags).unwrap_or_default(),
                    enabled: r.get::<_, Option<i64>>(10)?.map(|e| e != 0),
                    desired: json_opt(r.get(11)?),
                    local_at: (at > 0).then_some(UnixMillis(at)),
                    golioth: SpokeState::default(),
                    netneural: SpokeState::default(),
                };
                index.insert(device.id, devices.len());
                devices.push(device);
            }
        }
        let at = |id: i64, target: &str| -> Option<(usize, Target)> {
            let t = target_of(target).ok()?;
            index.get(&id).map(|i| (*i, t))
        };
        {
            let mut stmt = self
                .conn
                .prepare("SELECT device_id, target, field, value FROM sync_base")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (id, target): (i64, String) = (r.get(0)?, r.get(1)?);
                if let Some((i, t)) = at(id, &target) {
                    let field: String = r.get(2)?;
                    let value: String = r.get(3)?;
                    spoke_mut(&mut devices[i], t)
                        .base
                        .insert(field, parse_doc(&value));
                }
            }
        }
        {
            let mut stmt = self.conn.prepare(
                "SELECT device_id, target, doc, remote_at, version, extra FROM sync_remote",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (id, target): (i64, String) = (r.get(0)?, r.get(1)?);
                if let Some((i, t)) = at(id, &target) {
                    spoke_mut(&mut devices[i], t).copy = Some(RemoteCopy {
                        fields: fields_of(&r.get::<_, String>(2)?),
                        remote_at: r.get::<_, Option<i64>>(3)?.map(UnixMillis),
                        version: r.get(4)?,
                        extra: json_opt(r.get(5)?),
                    });
                }
            }
        }
        {
            let mut stmt = self.conn.prepare(
                "SELECT device_id, target, field FROM conflict WHERE status = 'pending'",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (id, target): (i64, String) = (r.get(0)?, r.get(1)?);
                if let Some((i, t)) = at(id, &target) {
                    spoke_mut(&mut devices[i], t).held.insert(r.get(2)?);
                }
            }
        }
        Ok(devices)
    }

    /// A device first seen in a cloud: a mirror entry (origin golioth / netneural) linked to
    /// its id there, so that its desired state waits for it. An existing key is linked, not
    /// created again. Returns its row id.
    pub fn sync_import(
        &mut self,
        key: &DeviceKey,
        origin: Origin,
        target: Target,
        remote_id: &str,
    ) -> Result<i64, StoreError> {
        let now = UnixMillis::now().0;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existing: Option<i64> = tx
            .query_row(
                "SELECT id FROM device WHERE key = ?1",
                [key.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => {
                tx.execute(
                    "INSERT INTO device(key, origin, first_seen) VALUES (?1, ?2, ?3)",
                    params![key.as_str(), origin.as_str(), now],
                )?;
                tx.last_insert_rowid()
            }
        };
        link(&tx, id, target, remote_id)?;
        tx.commit()?;
        Ok(id)
    }

    /// Commits a run: every device's changes, the cursors and the log, or nothing.
    pub fn sync_commit(&mut self, commit: &SyncCommit) -> Result<Committed, StoreError> {
        let now = UnixMillis::now().0;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut done = Committed::default();
        for d in &commit.devices {
            apply_device(&tx, d, now, &mut done)?;
        }
        for (target, kind, value) in &commit.cursors {
            tx.execute(
                "INSERT INTO sync_cursor(target, kind, value, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(target, kind) DO UPDATE SET value = excluded.value,
                     updated_at = excluded.updated_at",
                params![target.as_str(), kind, value, now],
            )?;
        }
        for (i, e) in commit.log.iter().enumerate() {
            tx.execute(
                "INSERT INTO sync_log(target, direction, operation, device_id, count, outcome,
                                      error, duration_ms, at, run_id, conflicts, details)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    e.target,
                    e.direction,
                    e.operation,
                    e.device_id,
                    e.count,
                    e.outcome,
                    e.error,
                    e.duration_ms,
                    now,
                    done.run_id,
                    e.conflicts,
                    e.details.as_ref().map(Value::to_string),
                ],
            )?;
            if i == 0 {
                let id = tx.last_insert_rowid();
                tx.execute("UPDATE sync_log SET run_id = ?1 WHERE id = ?1", [id])?;
                done.run_id = Some(id);
            }
        }
        if let Some(summary) = &commit.summary {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ('sync_last_run', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [summary.to_string()],
            )?;
        }
        tx.commit()?;
        Ok(done)
    }

    /// The summary of the daemon's last sync run, if it made one.
    pub fn sync_last_run(&self) -> Result<Option<Value>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'sync_last_run'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .map(|s| parse_doc(&s)))
    }

    /// Where an incremental read of `target` resumes.
    pub fn sync_cursor(&self, target: Target, kind: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM sync_cursor WHERE target = ?1 AND kind = ?2",
                params![target.as_str(), kind],
                |r| r.get(0),
            )
            .optional()?)
    }
}

fn spoke_mut(d: &mut SyncDevice, target: Target) -> &mut SpokeState {
    match target {
        Target::Golioth => &mut d.golioth,
        Target::NetNeural => &mut d.netneural,
    }
}

fn link(tx: &Transaction<'_>, id: i64, target: Target, remote_id: &str) -> rusqlite::Result<()> {
    // A remote id is unique: one held by another (stale) entry moves to this one.
    let column = match target {
        Target::Golioth => "golioth_id",
        Target::NetNeural => "netneural_id",
    };
    tx.execute(
        &format!("UPDATE device SET {column} = NULL WHERE {column} = ?1 AND id != ?2"),
        params![remote_id, id],
    )?;
    tx.execute(
        &format!("UPDATE device SET {column} = ?1 WHERE id = ?2"),
        params![remote_id, id],
    )?;
    Ok(())
}

fn apply_device(
    tx: &Transaction<'_>,
    d: &DeviceCommit,
    now: i64,
    done: &mut Committed,
) -> rusqlite::Result<()> {
    if let Some(meta) = &d.meta {
        let tags = serde_json::to_string(&meta.tags).unwrap_or_else(|_| "[]".into());
        tx.prepare_cached(
            "UPDATE device SET name = ?2, tags = ?3, enabled = ?4, meta_updated_at = ?5 WHERE id = ?1",
        )?
        .execute(params![d.id, meta.name, tags, meta.enabled, now])?;
    }
    if let Some(doc) = &d.desired {
        let by = d.desired_by.unwrap_or(Origin::Local);
        write_desired(tx, d.id, doc, by, now)?;
        done.desired_changed += 1;
    }
    for (target, remote_id) in &d.links {
        link(tx, d.id, *target, remote_id)?;
    }
    for (target, at) in &d.removed {
        let column = match target {
            Target::Golioth => "golioth_removed_at",
            Target::NetNeural => "netneural_removed_at",
        };
        tx.execute(
            &format!("UPDATE device SET {column} = ?2 WHERE id = ?1"),
            params![d.id, at.map(|t| t.0)],
        )?;
    }
    if let Some(direction) = &d.netneural_direction {
        tx.prepare_cached("UPDATE device SET netneural_direction = ?2 WHERE id = ?1")?
            .execute(params![d.id, direction])?;
    }
    for (target, base) in &d.bases {
        tx.prepare_cached("DELETE FROM sync_base WHERE device_id = ?1 AND target = ?2")?
            .execute(params![d.id, target.as_str()])?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO sync_base(device_id, target, field, value, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (field, value) in base {
            insert.execute(params![
                d.id,
                target.as_str(),
                field,
                value.to_string(),
                now
            ])?;
        }
    }
    for (target, copy) in &d.copies {
        tx.prepare_cached(
            "INSERT INTO sync_remote(device_id, target, doc, remote_at, version, extra)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(device_id, target) DO UPDATE SET doc = excluded.doc,
                 remote_at = excluded.remote_at, version = excluded.version, extra = excluded.extra",
        )?
        .execute(params![
            d.id,
            target.as_str(),
            fields_text(&copy.fields),
            copy.remote_at.map(|t| t.0),
            copy.version,
            text_opt(&copy.extra),
        ])?;
    }
    for c in &d.conflicts {
        let resolved_at = (c.status != "pending").then_some(now);
        // A field already held is not found again; `OR IGNORE` keeps one pending per field.
        let n = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO conflict(device_id, target, field, local_value, remote_value,
                     base_value, detected_at, status, resolution, resolved_by, resolved_at,
                     local_at, remote_at, strategy, resolved_value)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?9, ?14)",
            )?
            .execute(params![
                d.id,
                c.target.as_str(),
                c.field,
                text_opt(&c.local),
                text_opt(&c.remote),
                text_opt(&c.base),
                now,
                c.status,
                c.strategy,
                (c.status != "pending").then_some("gateway"),
                resolved_at,
                c.local_at.map(|t| t.0),
                c.remote_at.map(|t| t.0),
                text_opt(&c.resolved_value),
            ])?;
        done.conflicts_stored += n;
    }
    Ok(())
}

/// Replaces a device's desired document inside `tx`, with a new change number so the
/// downlink publishes it once.
pub(super) fn write_desired(
    tx: &Transaction<'_>,
    device_id: i64,
    doc: &Value,
    by: Origin,
    now: i64,
) -> rusqlite::Result<(i64, i64)> {
    let seq: i64 = tx.query_row(
        "SELECT coalesce(max(seq), 0) + 1 FROM desired_state",
        [],
        |r| r.get(0),
    )?;
    tx.prepare_cached(
        "INSERT INTO desired_state(device_id, doc, version, seq, updated_at, updated_by)
         VALUES (?1, ?2, 1, ?3, ?4, ?5)
         ON CONFLICT(device_id) DO UPDATE SET doc = excluded.doc, version = version + 1,
             seq = excluded.seq, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
    )?
    .execute(params![device_id, doc.to_string(), seq, now, by.as_str()])?;
    let version: i64 = tx.query_row(
        "SELECT version FROM desired_state WHERE device_id = ?1",
        [device_id],
        |r| r.get(0),
    )?;
    Ok((seq, version))
}
