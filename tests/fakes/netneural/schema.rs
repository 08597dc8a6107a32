//! The tables of the fake NetNeural: columns, types, defaults and constraints (DESIGN.md §5,
//! plus the gateway's `idempotency_key`).

use super::super::postgrest::Kind;

#[derive(Clone, Copy, Debug)]
pub(super) enum Default {
    Null,
    Uuid,
    Now,
    Bool(bool),
    Int(i64),
    Text(&'static str),
    EmptyObject,
}

#[derive(Debug)]
pub(super) struct Column {
    pub(super) name: &'static str,
    pub(super) kind: Kind,
    pub(super) default: Default,
    pub(super) not_null: bool,
    /// Allowed values (a CHECK constraint), empty for any.
    pub(super) one_of: &'static [&'static str],
    /// The referenced table (its `id`), and whether deleting the parent cascades (else SET NULL).
    pub(super) references: Option<(&'static str, bool)>,
}

pub(super) const fn col(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        default: Default::Null,
        not_null: false,
        one_of: &[],
        references: None,
    }
}

impl Column {
    const fn default(mut self, d: Default) -> Column {
        self.default = d;
        self
    }
    const fn not_null(mut self) -> Column {
        self.not_null = true;
        self
    }
    const fn one_of(mut self, values: &'static [&'static str]) -> Column {
        self.one_of = values;
        self
    }
    const fn references(mut self, table: &'static str, cascade: bool) -> Column {
        self.references = Some((table, cascade));
        self
    }
}

#[derive(Debug)]
pub(super) struct Table {
    pub(super) name: &'static str,
    pub(super) columns: Vec<Column>,
    /// The primary key first, then the UNIQUE constraints.
    pub(super) unique: Vec<&'static [&'static str]>,
}

impl Table {
    pub(super) fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub(super) fn kind(&self, name: &str) -> Kind {
        self.column(name).map_or(Kind::Text, |c| c.kind)
    }

    pub(super) fn has_updated_at(&self) -> bool {
        self.column("updated_at").is_some()
    }

    pub(super) fn constraint_name(&self, cols: &[&str]) -> String {
        if cols == ["id"] {
            format!("{}_pkey", self.name)
        } else {
            format!("{}_{}_key", self.name, cols.join("_"))
        }
    }
}

pub(super) fn id() -> Column {
    col("id", Kind::Uuid).default(Default::Uuid).not_null()
}
pub(super) fn created_at() -> Column {
    col("created_at", Kind::Timestamp)
        .default(Default::Now)
        .not_null()
}
pub(super) fn updated_at() -> Column {
    col("updated_at", Kind::Timestamp)
        .default(Default::Now)
        .not_null()
}

pub(super) const SYNC_DIRECTIONS: &[&str] = &["import", "export", "bidirectional", "none"];

pub(super) fn schema() -> Vec<Table> {
    use Kind::*;
    vec![
        Table {
            name: "devices",
            columns: vec![
                id(),
                col("organization_id", Uuid).not_null(),
                col("integration_id", Uuid),
                col("external_device_id", Text),
                col("name", Text).not_null(),
                col("serial_number", Text),
                col("hardware_ids", TextArray),
                col("status", Text)
                    .default(Default::Text("offline"))
                    .one_of(&["online", "offline", "warning", "error"]),
                col("last_seen", Timestamp),
                col("last_seen_online", Timestamp),
                col("firmware_version", Text),
                col("metadata", Json).default(Default::EmptyObject),
                created_at(),
                updated_at(),
                col("deleted_at", Timestamp),
            ],
            unique: vec![&["id"]],
        },
        Table {
            name: "device_service_assignments",
            columns: vec![
                id(),
                col("device_id", Uuid)
                    .not_null()
                    .references("devices", true),
                col("integration_id", Uuid).not_null(),
                col("external_device_id", Text),
                col("sync_enabled", Bool)
                    .default(Default::Bool(true))
                    .not_null(),
                col("sync_direction", Text)
                    .default(Default::Text("bidirectional"))
                    .one_of(SYNC_DIRECTIONS),
                col("sync_status", Text).default(Default::Text("pending")),
                col("last_sync_at", Timestamp),
                col("sync_error", Text),
                created_at(),
                updated_at(),
            ],
            unique: vec![
                &["id"],
                &["device_id", "integration_id"],
                &["integration_id", "external_device_id"],
            ],
        },
        Table {
            name: "integration_sync_log",
            columns: vec![
                id(),
                col("organization_id", Uuid).not_null(),
                col("integration_id", Uuid),
                col("operation", Text).not_null().one_of(&[
                    "import",
                    "export",
                    "bidirectional",
                    "webhook",
                ]),
                col("status", Text).not_null().one_of(&[
                    "started",
                    "processing",
                    "completed",
                    "failed",
                    "partial",
                ]),
                col("device_id", Uuid).references("devices", false),
                col("devices_processed", Int).default(Default::Int(0)),
                col("devices_succeeded", Int).default(Default::Int(0)),
                col("devices_failed", Int).default(Default::Int(0)),
                col("conflicts_detected", Int).default(Default::Int(0)),
                col("error_message", Text),
                col("details", Json).default(Default::EmptyObject),
                col("started_at", Timestamp).default(Default::Now),
                col("completed_at", Timestamp),
                col("duration_ms", Int),
                created_at(),
            ],
            unique: vec![&["id"]],
        },
        Table {
            name: "device_telemetry_history",
            columns: vec![
                id(),
                col("device_id", Uuid)
                    .not_null()
                    .references("devices", true),
                col("organization_id", Uuid).not_null(),
                col("telemetry", Json).not_null(),
                col("device_timestamp", Timestamp),
                col("received_at", Timestamp)
                    .default(Default::Now)
                    .not_null(),
                col("activity_log_id", Uuid),
                col("idempotency_key", Text),
                created_at(),
            ],
            unique: vec![&["id"], &["idempotency_key"]],
        },
        Table {
            name: "device_conflicts",
            columns: vec![
                id(),
                col("device_id", Uuid)
                    .not_null()
                    .references("devices", true),
                col("conflict_type", Text).not_null().one_of(&[
                    "data_mismatch",
                    "timestamp_conflict",
                    "status_conflict",
                ]),
                col("field_name", Text).not_null(),
                col("local_value", Json),
                col("remote_value", Json),
                col("local_updated_at", Timestamp),
                col("remote_updated_at", Timestamp),
                col("resolution_status", Text)
                    .default(Default::Text("pending"))
                    .not_null()
                    .one_of(&["pending", "resolved", "ignored", "auto_resolved"]),
                col("resolution_strategy", Text).one_of(&[
                    "local_wins",
                    "remote_wins",
                    "merge",
                    "manual",
                ]),
                col("resolved_value", Json),
                col("resolved_at", Timestamp),
                col("resolved_by", Text),
                created_at(),
                updated_at(),
            ],
            unique: vec![&["id"]],
        },
    ]
}
