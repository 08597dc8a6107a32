//! The NetNeural backend (a Supabase project), through PostgREST at `<url>/rest/v1`.
//!
//! - [`client`]: [`NetNeural`] — devices (find, create, update, one metadata key at a time),
//!   bulk telemetry with idempotency keys, `last_seen` that only moves forward, sync
//!   assignments, the sync log; and for reconciliation: pulls of the devices and assignments
//!   changed since a cursor (keyset-paged), a guarded write of what a sync settled, and
//!   `device_conflicts` (record, read back, settle).
//! - [`wire`]: the rows as PostgREST sends and takes them; the only place serde meets them.
//! - [`mapping`]: rows ↔ the gateway's types, PostgREST filter values, the error body, and
//!   whether the key is a legacy JWT.
//!
//! The gateway shares `devices.metadata` with NetNeural's own code: it writes only the keys
//! it owns ([`METADATA_REPORTED`], [`METADATA_DESIRED`]), always with an optimistic check on
//! `updated_at`, either one key at a time ([`NetNeural::set_metadata_key`], which reads and
//! retries) or as the whole document it read with its keys merged in
//! ([`NetNeural::update_synced`], which does not retry), so another writer's keys are never
//! lost to a stale copy.

pub mod client;
mod conflicts;
pub mod mapping;
pub mod wire;

pub use client::{MAX_PAGE_SIZE, METADATA_ATTEMPTS, NetNeural};
pub use mapping::{
    Assignment, Changed, ConflictStatus, ConflictStrategy, DeviceId, DeviceStatus, DeviceUpdate,
    METADATA_DESIRED, METADATA_REPORTED, NewConflict, NewDevice, RemoteConflict, RemoteDevice,
    SyncDirection, SyncLogEntry, SyncLogStatus, SyncOperation, TelemetryRow, is_legacy_jwt,
};

use crate::cloud::CloudError;
use crate::model::Target;

/// SQLSTATE of a unique violation.
pub const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE of a foreign-key violation.
pub const FOREIGN_KEY_VIOLATION: &str = "23503";

impl CloudError {
    /// A NetNeural write refused because a row with the same unique key exists (PostgREST
    /// answers 409 with SQLSTATE 23505). For a create this is often an earlier attempt's
    /// success: look the row up.
    pub fn is_unique_violation(&self) -> bool {
        self.target == Target::NetNeural && self.code() == Some(UNIQUE_VIOLATION)
    }

    /// A NetNeural write naming a row that does not exist (409, SQLSTATE 23503): telemetry
    /// for a device the backend deleted, say. Retrying cannot help until the device exists.
    pub fn is_foreign_key_violation(&self) -> bool {
        self.target == Target::NetNeural && self.code() == Some(FOREIGN_KEY_VIOLATION)
    }
}
