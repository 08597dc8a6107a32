//! NetNeural's rows ↔ the gateway's types, PostgREST filter values, the error body, and how
//! the key is presented.

use std::fmt;

use serde_json::{Map, Value};

pub use super::conflicts::{ConflictStatus, ConflictStrategy, NewConflict, RemoteConflict};
use super::wire;
use crate::cloud::parse_rfc3339;
use crate::model::UnixMillis;

/// A NetNeural device id (`devices.id`, a uuid).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub String);

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `devices.status`. A value outside the four NetNeural defines is kept as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceStatus {
    Online,
    Offline,
    Warning,
    Error,
    Other(String),
}

impl DeviceStatus {
    pub fn parse(raw: &str) -> DeviceStatus {
        match raw {
            "online" => DeviceStatus::Online,
            "offline" => DeviceStatus::Offline,
            "warning" => DeviceStatus::Warning,
            "error" => DeviceStatus::Error,
            other => DeviceStatus::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            DeviceStatus::Online => "online",
            DeviceStatus::Offline => "offline",
            DeviceStatus::Warning => "warning",
            DeviceStatus::Error => "error",
            DeviceStatus::Other(s) => s,
        }
    }
}

/// Rows of an incremental read, and the server's clock when it answered its first page
/// (`None` without a readable `Date` header).
#[derive(Clone, Debug, PartialEq)]
pub struct Changed<T> {
    pub rows: Vec<T>,
    pub server_time: Option<UnixMillis>,
}

/// A device as the NetNeural backend holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteDevice {
    pub id: DeviceId,
    pub organization_id: Option<String>,
    pub integration_id: Option<String>,
    /// The Golioth device id, when the device is linked to Golioth.
    pub external_device_id: Option<String>,
    pub name: String,
    pub serial_number: Option<String>,
    pub hardware_ids: Vec<String>,
    pub status: Option<DeviceStatus>,
    pub last_seen: Option<UnixMillis>,
    pub last_seen_online: Option<UnixMillis>,
    pub firmware_version: Option<String>,
    /// Shared with NetNeural's own writers: the gateway owns only the keys
    /// [`METADATA_REPORTED`] and [`METADATA_DESIRED`], and writes them one at a time with
    /// [`super::NetNeural::set_metadata_key`], or merged into the document it read with
    /// [`super::NetNeural::update_synced`]. A `null` or non-object column reads as empty.
    pub metadata: Map<String, Value>,
    pub created_at: Option<UnixMillis>,
    pub updated_at: Option<UnixMillis>,
    /// `updated_at` exactly as the server wrote it (microseconds, its offset): the version a
    /// guarded write checks ([`super::NetNeural::update_synced`]) and the cursor of a pull
    /// ([`super::NetNeural::devices_changed_since`]). Parsing it to milliseconds would lose
    /// what the `eq.` guard compares.
    pub version: Option<String>,
    /// Soft-deleted (`deleted_at` is set): only a pull of changes returns such rows.
    pub deleted: bool,
}

/// The `devices.metadata` key holding the device's reported state, written by the gateway.
pub const METADATA_REPORTED: &str = "reported";
/// The `devices.metadata` key holding the desired state (NetNeural has no column for it).
pub const METADATA_DESIRED: &str = "desired";

/// A device to create in the configured organization (and integration).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewDevice {
    pub name: String,
    pub hardware_ids: Vec<String>,
    pub serial_number: Option<String>,
    pub external_device_id: Option<String>,
    pub status: Option<DeviceStatus>,
    pub firmware_version: Option<String>,
    /// Initial metadata; left out when empty (the column's default applies).
    pub metadata: Map<String, Value>,
}

/// A change to a device: `None` columns stay as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceUpdate {
    pub name: Option<String>,
    pub serial_number: Option<String>,
    pub hardware_ids: Option<Vec<String>>,
    pub external_device_id: Option<String>,
    pub status: Option<DeviceStatus>,
    /// Set as given, even backwards; [`super::NetNeural::advance_last_seen`] only moves it
    /// forward.
    pub last_seen: Option<UnixMillis>,
    pub firmware_version: Option<String>,
    /// Replaces the **whole** metadata document, keys other writers own included. To write
    /// the gateway's own keys use [`super::NetNeural::set_metadata_key`].
    pub metadata: Option<Map<String, Value>>,
}

/// One telemetry point for `device_telemetry_history`.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryRow {
    pub device_id: DeviceId,
    pub telemetry: Value,
    pub device_timestamp: Option<UnixMillis>,
    pub received_at: UnixMillis,
    /// Unique per point and stable across retries: a batch sent again after its first
    /// attempt committed stores nothing twice.
    pub idempotency_key: String,
}

/// `device_service_assignments.sync_direction`, NetNeural's words seen from the backend:
/// `import` brings the integration's data into NetNeural, `export` sends NetNeural's out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncDirection {
    Import,
    Export,
    Bidirectional,
    /// Not synced: `none`, `sync_enabled = false`, or a direction this gateway does not know.
    None,
}

impl SyncDirection {
    pub fn parse(raw: &str) -> SyncDirection {
        match raw {
            "import" => SyncDirection::Import,
            "export" => SyncDirection::Export,
            "bidirectional" => SyncDirection::Bidirectional,
            _ => SyncDirection::None,
        }
    }

    /// Whether data flows from the gateway (the integration) into NetNeural.
    pub fn imports(self) -> bool {
        matches!(self, SyncDirection::Import | SyncDirection::Bidirectional)
    }

    /// Whether NetNeural's changes flow out to the gateway.
    pub fn exports(self) -> bool {
        matches!(self, SyncDirection::Export | SyncDirection::Bidirectional)
    }
}

/// How one device syncs with the configured integration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub device_id: DeviceId,
    pub external_device_id: Option<String>,
    /// Already [`SyncDirection::None`] when `sync_enabled` is false.
    pub direction: SyncDirection,
    pub sync_status: Option<String>,
    pub last_sync_at: Option<UnixMillis>,
}

/// `integration_sync_log.operation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOperation {
    Import,
    Export,
    Bidirectional,
    Webhook,
}

impl SyncOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncOperation::Import => "import",
            SyncOperation::Export => "export",
            SyncOperation::Bidirectional => "bidirectional",
            SyncOperation::Webhook => "webhook",
        }
    }
}

/// `integration_sync_log.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncLogStatus {
    Started,
    Processing,
    Completed,
    Failed,
    Partial,
}

impl SyncLogStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncLogStatus::Started => "started",
            SyncLogStatus::Processing => "processing",
            SyncLogStatus::Completed => "completed",
            SyncLogStatus::Failed => "failed",
            SyncLogStatus::Partial => "partial",
        }
    }
}

/// One `integration_sync_log` row (the organization and integration come from the config).
#[derive(Clone, Debug, PartialEq)]
pub struct SyncLogEntry {
    pub operation: SyncOperation,
    pub status: SyncLogStatus,
    pub device_id: Option<DeviceId>,
    pub devices_processed: u32,
    pub devices_succeeded: u32,
    pub devices_failed: u32,
    pub conflicts_detected: u32,
    pub error_message: Option<String>,
    pub details: Value,
    pub started_at: UnixMillis,
    pub completed_at: Option<UnixMillis>,
    pub duration_ms: Option<i64>,
}

pub(super) fn time_of(raw: Option<&String>) -> Option<UnixMillis> {
    raw.and_then(|s| parse_rfc3339(s))
}

impl From<wire::Device> for RemoteDevice {
    fn from(d: wire::Device) -> RemoteDevice {
        RemoteDevice {
            metadata: match d.metadata {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            },
            created_at: time_of(d.created_at.as_ref()),
            updated_at: time_of(d.updated_at.as_ref()),
            version: d.updated_at,
            last_seen: time_of(d.last_seen.as_ref()),
            last_seen_online: time_of(d.last_seen_online.as_ref()),
            deleted: d.deleted_at.is_some(),
            id: DeviceId(d.id),
            organization_id: d.organization_id,
            integration_id: d.integration_id,
            external_device_id: d.external_device_id,
            name: d.name.unwrap_or_default(),
            serial_number: d.serial_number,
            hardware_ids: d.hardware_ids,
            status: d.status.as_deref().map(DeviceStatus::parse),
            firmware_version: d.firmware_version,
        }
    }
}

impl From<wire::Assignment> for Assignment {
    fn from(a: wire::Assignment) -> Assignment {
        // The column defaults are `sync_enabled = true`, `sync_direction = 'bidirectional'`.
        let direction = match a.sync_enabled {
            Some(false) => SyncDirection::None,
            _ => a
                .sync_direction
                .as_deref()
                .map_or(SyncDirection::Bidirectional, SyncDirection::parse),
        };
        Assignment {
            device_id: DeviceId(a.device_id),
            external_device_id: a.external_device_id,
            direction,
            sync_status: a.sync_status,
            last_sync_at: time_of(a.last_sync_at.as_ref()),
        }
    }
}

/// A PostgREST filter value in double quotes, so that `,` `.` `:` `(` `)` `{` `}` in it are
/// data, not syntax (also valid as a Postgres array literal element).
pub(crate) fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `eq.<value>`: everything after `eq.` is the value, so no quoting is needed.
pub(crate) fn eq(value: &str) -> String {
    format!("eq.{value}")
}

/// `gt.<value>`: after the last key of a keyset page.
pub(crate) fn gt(value: &str) -> String {
    format!("gt.{value}")
}

/// `gte.<value>`: at or after a cursor.
pub(crate) fn gte(value: &str) -> String {
    format!("gte.{value}")
}

/// `eq.<version>`, or `is.null` for a row that has none: the guard of a conditional write.
pub(crate) fn version_guard(version: Option<&str>) -> String {
    version.map_or_else(|| "is.null".to_owned(), eq)
}

/// `hardware_ids=cs.{"<hw>"}`: the array contains this hardware id.
pub(crate) fn contains_one(value: &str) -> String {
    format!("cs.{{{}}}", quoted(value))
}

/// `in.("a","b")`.
pub(crate) fn in_list<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = values.into_iter().map(quoted).collect();
    format!("in.({})", items.join(","))
}

/// `or=(last_seen.is.null,last_seen.lt."<at>")`: rows whose `last_seen` is older than `at`.
pub(crate) fn last_seen_before(at: UnixMillis) -> String {
    format!(
        "(last_seen.is.null,last_seen.lt.{})",
        quoted(&at.to_rfc3339())
    )
}

/// Reads PostgREST's error body `{code, message, details, hint}`. The message keeps
/// `details` (which row or key) and `hint`; the code is the SQLSTATE (`23505`) or
/// PostgREST's own (`PGRST116`).
pub(crate) fn error_body(body: &[u8]) -> Option<(Option<String>, String)> {
    let e: wire::Error = serde_json::from_slice(body).ok()?;
    if e.code.is_none() && e.message.is_none() {
        return None;
    }
    let mut message = e.message.unwrap_or_default();
    for extra in [e.details, e.hint].into_iter().flatten() {
        if !extra.is_empty() {
            if !message.is_empty() {
                message.push_str(" — ");
            }
            message.push_str(&extra);
        }
    }
    Some((e.code, message))
}

/// Whether `key` is a legacy Supabase JWT key (`anon`, `service_role`): three base64url parts
/// with a JSON header, so starting `eyJ`. Those go in `Authorization: Bearer` as well as in
/// `apikey`; the newer `sb_secret_…` / `sb_publishable_…` keys go in `apikey` alone (they are
/// not JWTs, and the Supabase gateway rejects them as bearer tokens).
pub fn is_legacy_jwt(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_keys_are_told_from_new_supabase_keys() {
        assert!(is_legacy_jwt(
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.dGVzdC1zaWc"
        ));
        assert!(!is_legacy_jwt("sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"));
        assert!(!is_legacy_jwt("sb_publishable_abc.def.ghi"));
        assert!(!is_legacy_jwt("eyJa.eyJb"));
        assert!(!is_legacy_jwt("eyJa..sig"));
        assert!(!is_legacy_jwt("eyJa.b c.d"));
        assert!(!is_legacy_jwt("abc.def.ghi"));
    }

    #[test]
    fn filter_values_are_quoted_so_that_their_punctuation_stays_data() {
        assert_eq!(contains_one("site-1:dev.2"), r#"cs.{"site-1:dev.2"}"#);
        assert_eq!(contains_one(r#"a"b\c"#), r#"cs.{"a\"b\\c"}"#);
        assert_eq!(in_list(["u1", "u2"]), r#"in.("u1","u2")"#);
        assert_eq!(eq("o1"), "eq.o1");
        assert_eq!(gt("7c1e"), "gt.7c1e");
        assert_eq!(
            gte("2024-05-01T10:00:00.123456+00:00"),
            "gte.2024-05-01T10:00:00.123456+00:00"
        );
        assert_eq!(version_guard(Some("T1")), "eq.T1");
        assert_eq!(version_guard(None), "is.null");
        assert_eq!(
            last_seen_before(UnixMillis(1_714_557_600_123)),
            r#"(last_seen.is.null,last_seen.lt."2024-05-01T10:00:00.123Z")"#
        );
    }

    #[test]
    fn postgrest_errors_keep_code_message_details_and_hint() {
        let body = br#"{"code": "23505", "message": "duplicate key value violates unique constraint \"devices_pkey\"",
                        "details": "Key (id)=(x) already exists.", "hint": null}"#;
        let (code, message) = error_body(body).unwrap();
        assert_eq!(code.as_deref(), Some("23505"));
        assert!(
            message.ends_with("— Key (id)=(x) already exists."),
            "{message}"
        );
        assert_eq!(
            error_body(
                br#"{"code": "PGRST301", "message": "JWT expired", "details": null, "hint": null}"#
            ),
            Some((Some("PGRST301".into()), "JWT expired".into()))
        );
        assert_eq!(error_body(b"upstream connect error"), None);
    }

    #[test]
    fn rows_map_with_nulls_and_assignments_honour_sync_enabled() {
        let d: wire::Device = serde_json::from_str(
            r#"{"id": "u1", "name": null, "metadata": "oops", "status": "maintenance",
                "last_seen": "2024-05-01T10:00:00.123456+00:00", "deleted_at": null}"#,
        )
        .unwrap();
        let d = RemoteDevice::from(d);
        assert_eq!(d.name, "");
        assert!(d.metadata.is_empty() && !d.deleted);
        assert_eq!(d.status, Some(DeviceStatus::Other("maintenance".into())));
        assert_eq!(d.last_seen, Some(UnixMillis(1_714_557_600_123)));

        let a =
            |json: &str| Assignment::from(serde_json::from_str::<wire::Assignment>(json).unwrap());
        assert_eq!(
            a(r#"{"device_id": "u1", "sync_enabled": true, "sync_direction": "export"}"#).direction,
            SyncDirection::Export
        );
        assert_eq!(
            a(r#"{"device_id": "u1", "sync_enabled": false, "sync_direction": "bidirectional"}"#)
                .direction,
            SyncDirection::None
        );
        assert_eq!(
            a(r#"{"device_id": "u1", "sync_direction": "sideways"}"#).direction,
            SyncDirection::None
        );
        assert_eq!(
            a(r#"{"device_id": "u1"}"#).direction,
            SyncDirection::Bidirectional
        );
        assert!(SyncDirection::Bidirectional.imports() && !SyncDirection::Import.exports());
    }

    #[test]
    fn a_device_keeps_its_updated_at_text_as_its_version() {
        let d: wire::Device = serde_json::from_str(
            r#"{"id": "u1", "updated_at": "2024-05-01T10:00:00.123456+00:00",
                "deleted_at": "2024-05-02T00:00:00+00:00"}"#,
        )
        .unwrap();
        let d = RemoteDevice::from(d);
        assert_eq!(
            d.version.as_deref(),
            Some("2024-05-01T10:00:00.123456+00:00")
        );
        assert_eq!(d.updated_at, Some(UnixMillis(1_714_557_600_123)));
        assert!(d.deleted);
    }

    #[test]
    fn conflict_words_round_trip_and_unknown_ones_fall_back() {
        for s in [
            ConflictStatus::Pending,
            ConflictStatus::Resolved,
            ConflictStatus::Ignored,
            ConflictStatus::AutoResolved,
        ] {
            assert_eq!(ConflictStatus::parse(s.as_str()), s);
        }
        for s in [
            ConflictStrategy::LocalWins,
            ConflictStrategy::RemoteWins,
            ConflictStrategy::Merge,
            ConflictStrategy::Manual,
        ] {
            assert_eq!(ConflictStrategy::parse(s.as_str()), Some(s));
        }
        assert_eq!(ConflictStatus::parse("escalated"), ConflictStatus::Pending);
        assert_eq!(ConflictStrategy::parse("newest_wins"), None);

        let c: wire::Conflict = serde_json::from_str(
            r#"{"id": "c1", "device_id": "u1", "field_name": null, "resolution_status": null,
                "resolution_strategy": "coin_toss", "resolved_value": {"led": 2},
                "resolved_at": "2024-05-01T10:00:00+00:00", "unknown": 1}"#,
        )
        .unwrap();
        let c = RemoteConflict::from(c);
        assert_eq!(
            (
                c.field_name.as_str(),
                c.resolution_status,
                c.resolution_strategy
            ),
            ("", ConflictStatus::Pending, None)
        );
        assert_eq!(c.resolved_value, Some(serde_json::json!({"led": 2})));
        assert_eq!(c.resolved_at, Some(UnixMillis(1_714_557_600_000)));
    }
}
