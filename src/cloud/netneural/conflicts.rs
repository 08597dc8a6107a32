//! NetNeural's `device_conflicts` as the gateway writes and reads it: the words of its
//! status and strategy columns, a conflict to record, and one as NetNeural holds it.

use serde_json::Value;

use super::mapping::{DeviceId, time_of};
use super::wire;
use crate::model::UnixMillis;

/// `device_conflicts.resolution_status`, NetNeural's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictStatus {
    Pending,
    Resolved,
    Ignored,
    AutoResolved,
}

impl ConflictStatus {
    /// A word this gateway does not know reads as [`ConflictStatus::Pending`]: nothing is
    /// applied from a conflict until it says plainly that it is settled.
    pub fn parse(raw: &str) -> ConflictStatus {
        match raw {
            "resolved" => ConflictStatus::Resolved,
            "ignored" => ConflictStatus::Ignored,
            "auto_resolved" => ConflictStatus::AutoResolved,
            _ => ConflictStatus::Pending,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConflictStatus::Pending => "pending",
            ConflictStatus::Resolved => "resolved",
            ConflictStatus::Ignored => "ignored",
            ConflictStatus::AutoResolved => "auto_resolved",
        }
    }
}

/// `device_conflicts.resolution_strategy`, NetNeural's words: `local` is NetNeural's side,
/// `remote` the integration's (the gateway's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictStrategy {
    LocalWins,
    RemoteWins,
    Merge,
    Manual,
}

impl ConflictStrategy {
    /// `None` for a word this gateway does not know.
    pub fn parse(raw: &str) -> Option<ConflictStrategy> {
        match raw {
            "local_wins" => Some(ConflictStrategy::LocalWins),
            "remote_wins" => Some(ConflictStrategy::RemoteWins),
            "merge" => Some(ConflictStrategy::Merge),
            "manual" => Some(ConflictStrategy::Manual),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConflictStrategy::LocalWins => "local_wins",
            ConflictStrategy::RemoteWins => "remote_wins",
            ConflictStrategy::Merge => "merge",
            ConflictStrategy::Manual => "manual",
        }
    }
}

/// A conflict to record in `device_conflicts` (its `conflict_type` is `data_mismatch`).
#[derive(Clone, Debug, PartialEq)]
pub struct NewConflict {
    pub device_id: DeviceId,
    /// What differs, e.g. `desired.led`.
    pub field_name: String,
    pub local_value: Option<Value>,
    pub remote_value: Option<Value>,
    pub local_updated_at: Option<UnixMillis>,
    pub remote_updated_at: Option<UnixMillis>,
    /// Anything but [`ConflictStatus::Pending`] also sets `resolved_at` (NetNeural's schema
    /// requires it of a settled conflict).
    pub resolution_status: ConflictStatus,
    pub resolution_strategy: Option<ConflictStrategy>,
    pub resolved_value: Option<Value>,
}

/// A `device_conflicts` row as NetNeural holds it: an operator may have settled it there.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteConflict {
    pub id: String,
    pub device_id: DeviceId,
    pub field_name: String,
    pub resolution_status: ConflictStatus,
    pub resolution_strategy: Option<ConflictStrategy>,
    /// `None` also for a JSON `null` (PostgREST shows SQL NULL and `'null'::jsonb` alike).
    pub resolved_value: Option<Value>,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<UnixMillis>,
    pub local_value: Option<Value>,
    pub remote_value: Option<Value>,
}

impl From<wire::Conflict> for RemoteConflict {
    fn from(c: wire::Conflict) -> RemoteConflict {
        RemoteConflict {
            resolution_status: c
                .resolution_status
                .as_deref()
                .map_or(ConflictStatus::Pending, ConflictStatus::parse),
            resolution_strategy: c
                .resolution_strategy
                .as_deref()
                .and_then(ConflictStrategy::parse),
            resolved_at: time_of(c.resolved_at.as_ref()),
            id: c.id,
            device_id: DeviceId(c.device_id),
            field_name: c.field_name.unwrap_or_default(),
            resolved_value: c.resolved_value,
            resolved_by: c.resolved_by,
            local_value: c.local_value,
            remote_value: c.remote_value,
        }
    }
}
