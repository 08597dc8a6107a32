//! NetNeural as a spoke of the reconciliation: devices read incrementally (rows changed since
//! a cursor), their sync directions, conflicts an operator resolved there, and the writes that
//! carry the mirror's changes back.
//!
//! NetNeural's view of a device: `devices.name`, and in `devices.metadata` the keys the
//! gateway owns: `desired` (the desired document), `tags`, `enabled`. Other metadata keys are
//! written back as they were read, and every write is guarded by the row's exact
//! `updated_at`: a row another writer changed since the read is not overwritten (the push
//! counts as failed, and the next run reads the row again).
//!
//! **Cursor.** The newest `updated_at` seen (the server's own clock, so the gateway's clock
//! never enters), moved back by as long as the read took: pages are keyed by id, so a row
//! updated during the read on a page already read is missed by it, and its new `updated_at`
//! may be older than a row read later. The next read asks for rows with `updated_at >=` the
//! cursor minus [`OVERLAP`], which also covers transactions that commit late with an earlier
//! timestamp. Reading a row twice is harmless (it merges to nothing); missing one is not.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{Pull, RemoteDoc};
use crate::cloud::netneural::{
    ConflictStatus, ConflictStrategy, DeviceId, NetNeural, NewConflict, RemoteConflict,
    RemoteDevice, SyncDirection,
};
use crate::cloud::{CloudError, parse_rfc3339};
use crate::model::{Target, UnixMillis};
use crate::reconcile::{self, Fields};
use crate::store::sync::RemoteCopy;

/// How far before its cursor an incremental read starts again.
pub const OVERLAP: Duration = Duration::from_secs(120);

/// Rows per page of an incremental read.
pub const PAGE: usize = 1000;

/// Cursor kinds in `sync_cursor`.
pub const DEVICES_CURSOR: &str = "devices";
pub const ASSIGNMENTS_CURSOR: &str = "assignments";

/// The gateway's keys in `devices.metadata`.
pub const METADATA_TAGS: &str = "tags";
pub const METADATA_ENABLED: &str = "enabled";

pub struct NetNeuralSpoke {
    pub client: NetNeural,
}

/// Where the reads of a run start.
#[derive(Clone, Debug, Default)]
pub struct Cursors {
    pub devices: Option<String>,
    pub assignments: Option<String>,
}

fn since(cursor: Option<&String>) -> Option<String> {
    let t = parse_rfc3339(cursor?)?;
    Some(UnixMillis(t.0 - OVERLAP.as_millis() as i64).to_rfc3339())
}

fn newest(current: Option<String>, seen: Option<&String>) -> Option<String> {
    match (current, seen) {
        (Some(c), Some(s)) => {
            let (ct, st) = (parse_rfc3339(&c), parse_rfc3339(s));
            Some(if st > ct { s.clone() } else { c })
        }
        (c, s) => c.or_else(|| s.cloned()),
    }
}

/// NetNeural's device row as the merge sees it.
pub fn doc_of(d: &RemoteDevice) -> RemoteDoc {
    let fields = reconcile::flatten(&json!({
        "name": d.name,
        "tags": d.metadata.get(METADATA_TAGS),
        "enabled": d.metadata.get(METADATA_ENABLED),
        "desired": d.metadata.get(crate::cloud::netneural::METADATA_DESIRED),
    }));
    RemoteDoc {
        id: d.id.0.clone(),
        hardware_ids: d.hardware_ids.clone(),
        golioth_id: d.external_device_id.clone(),
        fields,
        remote_at: d.updated_at,
        version: d.version.clone(),
        extra: Some(Value::Object(d.metadata.clone())),
        deleted: d.deleted,
    }
}

/// `device_service_assignments.sync_direction` as stored in the mirror.
pub fn direction_word(d: SyncDirection) -> &'static str {
    match d {
        SyncDirection::Import => "import",
        SyncDirection::Export => "export",
        SyncDirection::Bidirectional => "bidirectional",
        SyncDirection::None => "none",
    }
}

impl NetNeuralSpoke {
    /// Devices and assignments changed since the cursors.
    pub async fn pull(&self, cursors: &Cursors) -> Result<Pull, CloudError> {
        let started = std::time::Instant::now();
        let devices = self
            .client
            .devices_changed_since(since(cursors.devices.as_ref()).as_deref(), PAGE)
            .await?;
        let assignments = self
            .client
            .assignments_changed_since(since(cursors.assignments.as_ref()).as_deref(), PAGE)
            .await?;
        let mut device_cursor = cursors.devices.clone();
        for d in &devices {
            device_cursor = newest(device_cursor, d.version.as_ref());
        }
        let mut assignment_cursor = cursors.assignments.clone();
        let mut directions = Vec::with_capacity(assignments.len());
        for (a, at) in assignments {
            assignment_cursor = newest(assignment_cursor, at.as_ref());
            directions.push((a.device_id.0, direction_word(a.direction)));
        }
        // Moved back by the read's duration only when it saw something newer (else a cursor
        // would drift back a little every run), and never behind where it was.
        let took = started.elapsed().as_millis() as i64;
        let back = |new: Option<String>, old: &Option<String>| {
            if new == *old {
                return new;
            }
            let t = parse_rfc3339(new.as_ref()?)?.0 - took;
            let floor = old
                .as_deref()
                .and_then(parse_rfc3339)
                .map_or(i64::MIN, |o| o.0);
            Some(UnixMillis(t.max(floor)).to_rfc3339())
        };
        let device_cursor = back(device_cursor, &cursors.devices);
        let assignment_cursor = back(assignment_cursor, &cursors.assignments);
        let mut new_cursors = Vec::new();
        if let Some(c) = device_cursor {
            new_cursors.push((DEVICES_CURSOR, c));
        }
        if let Some(c) = assignment_cursor {
            new_cursors.push((ASSIGNMENTS_CURSOR, c));
        }
        Ok(Pull {
            target: Some(Target::NetNeural),
            docs: devices.iter().map(doc_of).collect(),
            complete: false,
            cursors: new_cursors,
            directions,
        })
    }

    /// Writes the pushed fields of one device in one guarded PATCH. `copy` is the row as last
    /// read (its version and whole metadata). `Ok(None)`: another writer changed the row
    /// since; nothing was written.
    pub async fn push(
        &self,
        id: &str,
        copy: &RemoteCopy,
        after: &Fields,
        pushed: &[(String, Option<Value>)],
    ) -> Result<Option<RemoteCopy>, CloudError> {
        let mut metadata: Map<String, Value> = match &copy.extra {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        let mut name = None;
        let mut set = |key: &str, value: Option<Value>| match value {
            Some(v) => {
                metadata.insert(key.to_owned(), v);
            }
            None => {
                metadata.remove(key);
            }
        };
        let mut desired = false;
        for (field, value) in pushed {
            match field.as_str() {
                "/name" => name = value.as_ref().and_then(Value::as_str).map(str::to_owned),
                "/tags" => set(METADATA_TAGS, value.clone()),
                "/enabled" => set(METADATA_ENABLED, value.clone()),
                _ => desired = true,
            }
        }
        if desired {
            let doc = reconcile::subtree(after, "/desired");
            let empty = doc.as_object().is_none_or(Map::is_empty);
            set(
                crate::cloud::netneural::METADATA_DESIRED,
                (!empty).then_some(doc),
            );
        }
        let row = self
            .client
            .update_synced(
                &DeviceId(id.to_owned()),
                copy.version.as_deref(),
                name.as_deref(),
                &metadata,
            )
            .await?;
        Ok(row.map(|row| RemoteCopy {
            fields: after.clone(),
            remote_at: row.updated_at,
            version: row.version.clone(),
            extra: Some(Value::Object(row.metadata)),
        }))
    }

    /// The conflicts NetNeural holds for us, by their row ids there.
    pub async fn conflicts(&self, ids: &[String]) -> Result<Vec<RemoteConflict>, CloudError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.client.conflicts(ids).await
    }

    pub async fn insert_conflicts(&self, rows: &[NewConflict]) -> Result<Vec<String>, CloudError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.client.insert_conflicts(rows).await
    }

    pub async fn resolve_conflict(
        &self,
        id: &str,
        status: ConflictStatus,
        strategy: Option<ConflictStrategy>,
        value: Option<&Value>,
        by: &str,
    ) -> Result<(), CloudError> {
        self.client
            .resolve_conflict(id, status, strategy, value, by)
            .await
    }
}
