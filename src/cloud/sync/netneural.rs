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
//! **Cursor.** The server's own clock when it answered the read's first page (its `Date`
//! header; the gateway's clock never enters): pages are keyed by id, so a row updated during
//! the read on a page already read is missed by it, but its new `updated_at` is later than
//! that. The next read asks for rows with `updated_at >=` the cursor minus [`OVERLAP`], which
//! also covers transactions that commit late with an earlier timestamp. So each read sees the
//! changes of about one interval plus two minutes, however many rows a burst once wrote (a
//! cursor taken from the rows read would stay at the burst, and every read would read it
//! again). Without a `Date` header the cursor is the newest row read, moved back by as long
//! as the read took. Reading a row twice is harmless (it merges to nothing); missing one is
//! not.

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

/// The next cursor of a read that started from `old`: the server's clock when it answered
/// the first page (every change the read may have missed is later than that), or, from a
/// server that sends no `Date`, the newest row read moved back by as long as the read took.
/// Never behind `old`.
fn advance<'a>(
    old: &Option<String>,
    seen: impl Iterator<Item = Option<&'a String>>,
    server_time: Option<UnixMillis>,
    took: Duration,
) -> Option<String> {
    let old_t = old.as_deref().and_then(parse_rfc3339);
    let new_t = match server_time {
        // `Date` has whole seconds (truncated): it is not later than the answer.
        Some(t) => Some(t),
        None => seen
            .flatten()
            .filter_map(|v| parse_rfc3339(v))
            .max()
            .map(|t| UnixMillis(t.0 - took.as_millis() as i64)),
    };
    match (old_t, new_t) {
        (Some(o), Some(n)) if n <= o => old.clone(),
        (_, Some(n)) => Some(n.to_rfc3339()),
        (_, None) => old.clone(),
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
            .devices_changed(since(cursors.devices.as_ref()).as_deref(), PAGE)
            .await?;
        let assignments = self
            .client
            .assignments_changed(since(cursors.assignments.as_ref()).as_deref(), PAGE)
            .await?;
        let took = started.elapsed();
        let device_cursor = advance(
            &cursors.devices,
            devices.rows.iter().map(|d| d.version.as_ref()),
            devices.server_time,
            took,
        );
        let assignment_cursor = advance(
            &cursors.assignments,
            assignments.rows.iter().map(|(_, at)| at.as_ref()),
            assignments.server_time,
            took,
        );
        let directions = assignments
            .rows
            .into_iter()
            .map(|(a, _)| (a.device_id.0, direction_word(a.direction)))
            .collect();
        let mut new_cursors = Vec::new();
        if let Some(c) = device_cursor {
            new_cursors.push((DEVICES_CURSOR, c));
        }
        if let Some(c) = assignment_cursor {
            new_cursors.push((ASSIGNMENTS_CURSOR, c));
        }
        Ok(Pull {
            target: Some(Target::NetNeural),
            docs: devices.rows.iter().map(doc_of).collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(raw: &str) -> UnixMillis {
        parse_rfc3339(raw).unwrap()
    }

    #[test]
    fn the_cursor_is_the_servers_clock_at_the_first_page_never_going_back() {
        let old = Some("2026-12-03T10:00:00.000Z".to_owned());
        let burst = "2026-12-03T10:00:00.500000+00:00".to_owned();
        // A read long after a burst moves the cursor to the server's clock, not the burst's.
        let next = advance(
            &old,
            [Some(&burst)].into_iter(),
            Some(t("2026-12-03T11:00:00Z")),
            Duration::from_millis(300),
        );
        assert_eq!(next.as_deref().map(t), Some(t("2026-12-03T11:00:00Z")));
        // Never back, even if the server's clock is behind the old cursor.
        let back = advance(
            &old,
            std::iter::empty(),
            Some(t("2026-12-03T09:00:00Z")),
            Duration::ZERO,
        );
        assert_eq!(back, old);
        // Without a Date: the newest row read, moved back by the read's duration.
        let dateless = advance(
            &old,
            [Some(&burst), None].into_iter(),
            None,
            Duration::from_millis(300),
        );
        assert_eq!(
            dateless.as_deref().map(t),
            Some(t("2026-12-03T10:00:00.200Z"))
        );
        // The next read starts OVERLAP before the cursor.
        assert_eq!(
            since(Some(&"2026-12-03T11:00:00Z".to_owned()))
                .as_deref()
                .map(t),
            Some(t("2026-12-03T10:58:00Z"))
        );
    }
}
