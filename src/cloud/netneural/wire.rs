//! The NetNeural backend's rows as PostgREST sends and takes them — the only place serde
//! meets them.
//!
//! Rows are read with an explicit `select` (see [`DEVICE_COLUMNS`]), every column but the key
//! is optional (nullable in Postgres, or absent in an older schema), and unknown columns are
//! ignored.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// The `devices` columns the gateway reads.
pub const DEVICE_COLUMNS: &str = "id,organization_id,integration_id,external_device_id,name,\
serial_number,hardware_ids,status,last_seen,last_seen_online,firmware_version,metadata,\
created_at,updated_at,deleted_at";

/// The `device_service_assignments` columns the gateway reads (`id` is the key of a keyset
/// page, `updated_at` the cursor of a pull).
pub const ASSIGNMENT_COLUMNS: &str = "id,device_id,external_device_id,sync_enabled,\
sync_direction,sync_status,last_sync_at,updated_at";

/// The `device_conflicts` columns the gateway reads.
pub const CONFLICT_COLUMNS: &str = "id,device_id,field_name,local_value,remote_value,\
resolution_status,resolution_strategy,resolved_value,resolved_by,resolved_at";

/// The `device_conflicts` columns the gateway writes, named in `?columns=` like
/// [`TELEMETRY_COLUMNS`].
pub const CONFLICT_INSERT_COLUMNS: &str = "device_id,conflict_type,field_name,local_value,\
remote_value,local_updated_at,remote_updated_at,resolution_status,resolution_strategy,\
resolved_value,resolved_at";

/// The `device_telemetry_history` columns the gateway writes, named in `?columns=` so that
/// PostgREST takes every row of a bulk insert by the same list.
pub const TELEMETRY_COLUMNS: &str =
    "device_id,organization_id,telemetry,device_timestamp,received_at,idempotency_key";

/// A `devices` row.
#[derive(Debug, Deserialize)]
pub struct Device {
    pub id: String,
    pub organization_id: Option<String>,
    pub integration_id: Option<String>,
    pub external_device_id: Option<String>,
    pub name: Option<String>,
    pub serial_number: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub hardware_ids: Vec<String>,
    pub status: Option<String>,
    pub last_seen: Option<String>,
    pub last_seen_online: Option<String>,
    pub firmware_version: Option<String>,
    /// jsonb: usually an object, but nothing in Postgres makes it one.
    pub metadata: Option<Value>,
    pub created_at: Option<String>,
    /// Kept as Postgres wrote it: it is the version the conditional metadata write checks.
    pub updated_at: Option<String>,
    pub deleted_at: Option<String>,
}

/// A new `devices` row.
#[derive(Debug, Serialize)]
pub struct DeviceInsert<'a> {
    pub organization_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<&'a str>,
    pub name: &'a str,
    pub hardware_ids: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a Map<String, Value>>,
}

/// A `devices` PATCH body: absent columns stay as they are.
#[derive(Debug, Default, Serialize)]
pub struct DeviceUpdate<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_ids: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_device_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl DeviceUpdate<'_> {
    pub fn is_empty(&self) -> bool {
        serde_json::to_value(self).is_ok_and(|v| v.as_object().is_some_and(Map::is_empty))
    }
}

/// A row that only carries its id (`select=id`).
#[derive(Debug, Deserialize)]
pub struct IdOnly {
    pub id: String,
}

/// A `device_telemetry_history` row to insert.
#[derive(Debug, Serialize)]
pub struct TelemetryInsert<'a> {
    pub device_id: &'a str,
    pub organization_id: &'a str,
    pub telemetry: &'a Value,
    pub device_timestamp: Option<String>,
    pub received_at: String,
    pub idempotency_key: &'a str,
}

/// A `device_service_assignments` row.
#[derive(Debug, Deserialize)]
pub struct Assignment {
    /// Read only to page by; absent from rows of an older `select`.
    pub id: Option<String>,
    pub device_id: String,
    pub external_device_id: Option<String>,
    pub sync_enabled: Option<bool>,
    pub sync_direction: Option<String>,
    pub sync_status: Option<String>,
    pub last_sync_at: Option<String>,
    /// Kept as Postgres wrote it: the cursor of the next pull.
    pub updated_at: Option<String>,
}

/// A `device_conflicts` row to insert. Every column is sent, `null` included, so that every
/// row of a bulk insert has the same keys.
#[derive(Debug, Serialize)]
pub struct ConflictInsert<'a> {
    pub device_id: &'a str,
    pub conflict_type: &'a str,
    pub field_name: &'a str,
    pub local_value: Option<&'a Value>,
    pub remote_value: Option<&'a Value>,
    pub local_updated_at: Option<String>,
    pub remote_updated_at: Option<String>,
    pub resolution_status: &'a str,
    pub resolution_strategy: Option<&'a str>,
    pub resolved_value: Option<&'a Value>,
    pub resolved_at: Option<String>,
}

/// A `device_conflicts` row.
#[derive(Debug, Deserialize)]
pub struct Conflict {
    pub id: String,
    pub device_id: String,
    pub field_name: Option<String>,
    pub local_value: Option<Value>,
    pub remote_value: Option<Value>,
    pub resolution_status: Option<String>,
    pub resolution_strategy: Option<String>,
    pub resolved_value: Option<Value>,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<String>,
}

/// A `device_conflicts` PATCH body that settles a conflict. `resolution_strategy` and
/// `resolved_value` are always sent, so that `null` clears what an earlier resolution set.
#[derive(Debug, Serialize)]
pub struct ConflictResolution<'a> {
    pub resolution_status: &'a str,
    pub resolution_strategy: Option<&'a str>,
    pub resolved_value: Option<&'a Value>,
    pub resolved_by: &'a str,
    pub resolved_at: Option<String>,
}

/// An `integration_sync_log` row to insert.
#[derive(Debug, Serialize)]
pub struct SyncLogInsert<'a> {
    pub organization_id: &'a str,
    pub integration_id: &'a str,
    pub operation: &'a str,
    pub status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<&'a str>,
    pub devices_processed: u32,
    pub devices_succeeded: u32,
    pub devices_failed: u32,
    pub conflicts_detected: u32,
    pub error_message: Option<&'a str>,
    pub details: &'a Value,
    pub started_at: String,
    pub completed_at: Option<String>,
    pub duration_ms: Option<i64>,
}

/// PostgREST's error body `{code, message, details, hint}`; any of them may be `null`.
#[derive(Debug, Deserialize)]
pub struct Error {
    pub code: Option<String>,
    pub message: Option<String>,
    pub details: Option<String>,
    pub hint: Option<String>,
}

/// A Postgres array column that may be `null`.
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_row_with_nulls_missing_and_unknown_columns_parses() {
        let rows: Vec<Device> = serde_json::from_str(
            r#"[{"id": "7c1e", "organization_id": "o1", "name": "s1", "hardware_ids": null,
                 "metadata": {"reported": {"t": 1}, "owner": "ui"},
                 "updated_at": "2024-05-01T10:00:00.123456+00:00", "location_id": "x",
                 "battery_level": 80},
                {"id": "8d2f"}]"#,
        )
        .unwrap();
        assert!(rows[0].hardware_ids.is_empty());
        assert_eq!(
            rows[0].updated_at.as_deref(),
            Some("2024-05-01T10:00:00.123456+00:00")
        );
        assert!(rows[1].name.is_none() && rows[1].metadata.is_none());
    }

    #[test]
    fn an_update_sends_only_what_changes() {
        let update = DeviceUpdate {
            name: Some("n"),
            ..DeviceUpdate::default()
        };
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"name": "n"})
        );
        assert!(!update.is_empty() && DeviceUpdate::default().is_empty());
    }

    #[test]
    fn telemetry_rows_carry_every_column_so_a_bulk_insert_is_uniform() {
        let v = serde_json::json!({"t": 1});
        let row = TelemetryInsert {
            device_id: "d",
            organization_id: "o",
            telemetry: &v,
            device_timestamp: None,
            received_at: "2024-05-01T10:00:00Z".into(),
            idempotency_key: "k",
        };
        let json = serde_json::to_value(&row).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut columns: Vec<&str> = TELEMETRY_COLUMNS.split(',').collect();
        columns.sort_unstable();
        assert_eq!(keys, columns);
    }

    #[test]
    fn conflict_rows_carry_every_column_so_a_bulk_insert_is_uniform() {
        let row = ConflictInsert {
            device_id: "d",
            conflict_type: "data_mismatch",
            field_name: "desired.led",
            local_value: None,
            remote_value: None,
            local_updated_at: None,
            remote_updated_at: None,
            resolution_status: "pending",
            resolution_strategy: None,
            resolved_value: None,
            resolved_at: None,
        };
        let json = serde_json::to_value(&row).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut columns: Vec<&str> = CONFLICT_INSERT_COLUMNS.split(',').collect();
        columns.sort_unstable();
        assert_eq!(keys, columns);
    }
}
