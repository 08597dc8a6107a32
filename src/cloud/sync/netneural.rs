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

/// Writes of one device's push, each after reading a row that only unsynced keys changed.
pub const PUSH_ATTEMPTS: usize = 3;

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

/// What a push writes: the name (if pushed) and the whole metadata, `extra` (the metadata
/// read) with the gateway's keys set to the pushed values.
fn written(
    extra: Option<&Value>,
    after: &Fields,
    pushed: &[(String, Option<Value>)],
) -> (Option<String>, Map<String, Value>) {
    let mut metadata: Map<String, Value> = match extra {
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
    (name, metadata)
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
    /// read (its version and whole metadata). If another writer changed the row since, it is
    /// read again: when only keys the merge does not own changed (the uplink's `reported`,
    /// NetNeural's own), the write is made again on the new row, up to [`PUSH_ATTEMPTS`]
    /// times, so a chatty device is not starved; when a synced field changed, nothing is
    /// written (`Ok(None)`) and the next run merges the new value.
    pub async fn push(
        &self,
        id: &str,
        copy: &RemoteCopy,
        after: &Fields,
        pushed: &[(String, Option<Value>)],
    ) -> Result<Option<RemoteCopy>, CloudError> {
        let device = DeviceId(id.to_owned());
        let (mut version, mut extra) = (copy.version.clone(), copy.extra.clone());
        for _ in 0..PUSH_ATTEMPTS {
            let (name, metadata) = written(extra.as_ref(), after, pushed);
            let row = self
                .client
                .update_synced(&device, version.as_deref(), name.as_deref(), &metadata)
                .await?;
            if let Some(row) = row {
                return Ok(Some(RemoteCopy {
                    fields: after.clone(),
                    remote_at: row.updated_at,
                    version: row.version.clone(),
                    extra: Some(Value::Object(row.metadata)),
                }));
            }
            let Some(now) = self.client.device(&device).await? else {
                return Ok(None);
            };
            let fresh = doc_of(&now);
            if fresh.fields != copy.fields {
                return Ok(None);
            }
            (version, extra) = (fresh.version, fresh.extra);
        }
        Ok(None)
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
    use crate::cloud::ApiKey;
    use crate::cloud::testing::serve;
    use crate::config::{NetNeuralConfig, Secret};
    use serde_json::json;

    fn row(desired: Value, reported: i64, updated_at: &str) -> Value {
        json!({"id": "u1", "organization_id": "org-1", "name": "s1", "hardware_ids": ["s1"],
               "metadata": {"desired": desired, "reported": {"n": reported}},
               "updated_at": updated_at, "deleted_at": null})
    }

    fn spoke(url: &url::Url) -> NetNeuralSpoke {
        let config = NetNeuralConfig {
            url: Some(url.clone()),
            organization_id: "org-1".into(),
            integration_id: "int-1".into(),
            ..NetNeuralConfig::default()
        };
        NetNeuralSpoke {
            client: NetNeural::new(&config, ApiKey::new(Secret::new("sb_secret_x"))).unwrap(),
        }
    }

    /// The push of `/desired/led` = "on" over a copy read at T1 with led "off".
    async fn push_over(answers: Vec<(u16, Value)>) -> (Option<RemoteCopy>, Vec<String>) {
        let answers = std::sync::Mutex::new(answers.into_iter());
        let fake = serve(move |_, _| {
            let (status, body) = answers.lock().unwrap().next().expect("no more requests");
            (status, body.to_string())
        })
        .await;
        let read = doc_of(&RemoteDevice::from(
            serde_json::from_value::<crate::cloud::netneural::wire::Device>(row(
                json!({"led": "off"}),
                1,
                "T1",
            ))
            .unwrap(),
        ));
        let mut after = read.fields.clone();
        after.insert("/desired/led".into(), json!("on"));
        let pushed = vec![("/desired/led".to_owned(), Some(json!("on")))];
        let got = spoke(&fake.url)
            .push("u1", &link_copy(&read), &after, &pushed)
            .await
            .unwrap();
        let seen = fake
            .seen()
            .iter()
            .map(|s| format!("{} {}", s.method, s.query("updated_at").unwrap_or("-")))
            .collect();
        (got, seen)
    }

    fn link_copy(doc: &RemoteDoc) -> RemoteCopy {
        super::super::link::copy_of(doc)
    }

    #[tokio::test]
    async fn a_push_that_lost_to_a_write_of_unsynced_keys_is_made_again_on_the_new_row() {
        let (got, seen) = push_over(vec![
            (200, json!([])),
            (200, json!([row(json!({"led": "off"}), 2, "T2")])),
            (200, json!([row(json!({"led": "on"}), 2, "T3")])),
        ])
        .await;
        assert_eq!(seen, ["PATCH eq.T1", "GET -", "PATCH eq.T2"]);
        let copy = got.expect("written on the second try");
        assert_eq!(copy.version.as_deref(), Some("T3"));
        assert_eq!(
            copy.extra.unwrap()["reported"]["n"],
            2,
            "the uplink's write kept"
        );
    }

    #[tokio::test]
    async fn a_push_that_lost_to_an_edit_of_a_synced_field_writes_nothing() {
        let (got, seen) = push_over(vec![
            (200, json!([])),
            (200, json!([row(json!({"led": "blue"}), 1, "T2")])),
        ])
        .await;
        assert_eq!(seen, ["PATCH eq.T1", "GET -"]);
        assert_eq!(got, None, "the next run merges the new value");
    }

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
