//! The conflicts aggregate: conflicts as an operator sees them, and their resolution (the
//! field takes the chosen value in the mirror, the conflict's cloud gets its recorded value
//! as base, so the next sync run pushes the choice everywhere). Found conflicts are stored by
//! a run's commit (`store::sync`).
//!
//! Blocking; methods on [`Db`].

use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
use super::db::Db;
use super::doc::parse_doc;
use super::sync::{json_opt, rfc, target_of, text_opt, write_desired};
use crate::model::{Origin, Target, UnixMillis};

/// A conflict as `nn-gateway conflicts` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConflictView {
    pub id: i64,
    pub device: String,
    pub target: String,
    pub field: String,
    pub local: Option<Value>,
    pub remote: Option<Value>,
    pub base: Option<Value>,
    pub local_at: Option<String>,
    pub remote_at: Option<String>,
    pub detected_at: String,
    pub status: String,
    pub strategy: Option<String>,
    pub resolved_value: Option<Value>,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<String>,
    /// The row in NetNeural's `device_conflicts`, once written there.
    pub remote_ref: Option<String>,
}

/// How an operator settles a conflict.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    Local,
    Remote,
    Value(Value),
}

/// A conflict that could not be resolved as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no conflict {0}")]
    Unknown(i64),
    #[error("conflict {id} is already {status}")]
    NotPending { id: i64, status: String },
}

/// A conflict resolution applied: what the field now holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub conflict: ConflictView,
    pub value: Option<Value>,
}

impl Db {
    /// Conflicts, pending first then newest first; all of them with `all`, else pending only.
    pub fn conflicts(&self, all: bool, limit: usize) -> Result<Vec<ConflictView>, StoreError> {
        let filter = if all {
            ""
        } else {
            "WHERE c.status = 'pending'"
        };
        self.conflict_query(
            &format!(
                "{CONFLICT_SELECT} {filter}
                 ORDER BY c.status != 'pending', c.id DESC LIMIT ?1"
            ),
            params![limit as i64],
        )
    }

    pub fn conflict(&self, id: i64) -> Result<Option<ConflictView>, StoreError> {
        Ok(self
            .conflict_query(&format!("{CONFLICT_SELECT} WHERE c.id = ?1"), params![id])?
            .pop())
    }

    fn conflict_query(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<ConflictView>, StoreError> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(params, conflict_view)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Conflicts NetNeural has not been told about in their current status.
    pub fn conflicts_unreported(&self, limit: usize) -> Result<Vec<ConflictView>, StoreError> {
        self.conflict_query(
            &format!("{CONFLICT_SELECT} WHERE c.reported = 0 ORDER BY c.id LIMIT ?1"),
            params![limit as i64],
        )
    }

    /// Records that NetNeural holds conflict `id` in its current status, as row `remote_ref`.
    pub fn conflict_reported(
        &mut self,
        id: i64,
        remote_ref: Option<&str>,
        status: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE conflict SET reported = 1, remote_ref = coalesce(?2, remote_ref)
             WHERE id = ?1 AND status = ?3",
            params![id, remote_ref, status],
        )?;
        Ok(())
    }

    /// Pending conflicts that NetNeural holds: (local id, NetNeural's row id).
    pub fn conflicts_awaiting_netneural(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, remote_ref FROM conflict WHERE status = 'pending' AND remote_ref IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Resolves a pending conflict: the field takes the chosen value in the mirror, and the
    /// conflict's cloud gets the recorded remote value as its base, so the next run pushes the
    /// choice there (and to the other cloud, whose base still differs). Exactly one of two
    /// concurrent resolutions wins; the other gets [`ResolveError::NotPending`].
    pub fn resolve_conflict(
        &mut self,
        id: i64,
        choice: &Resolution,
        by: &str,
    ) -> Result<Result<Resolved, ResolveError>, StoreError> {
        let now = UnixMillis::now().0;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(view) = tx
            .query_row(
                &format!("{CONFLICT_SELECT} WHERE c.id = ?1"),
                [id],
                conflict_view,
            )
            .optional()?
        else {
            return Ok(Err(ResolveError::Unknown(id)));
        };
        if view.status != "pending" {
            return Ok(Err(ResolveError::NotPending {
                id,
                status: view.status,
            }));
        }
        let value = match choice {
            Resolution::Local => view.local.clone(),
            Resolution::Remote => view.remote.clone(),
            Resolution::Value(v) => (!v.is_null()).then(|| v.clone()),
        };
        let device_id: i64 =
            tx.query_row("SELECT device_id FROM conflict WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        set_field(&tx, device_id, &view.field, value.as_ref(), now)?;
        let target = target_of(&view.target)?;
        set_base_field(
            &tx,
            device_id,
            target,
            &view.field,
            view.remote.as_ref(),
            now,
        )?;
        let strategy = match choice {
            Resolution::Local => "local_wins",
            Resolution::Remote => "remote_wins",
            Resolution::Value(_) => "manual",
        };
        tx.execute(
            "UPDATE conflict SET status = 'resolved', resolution = ?2, resolved_value = ?3,
                 resolved_by = ?4, resolved_at = ?5, reported = 0
             WHERE id = ?1 AND status = 'pending'",
            params![id, strategy, text_opt(&value), by, now],
        )?;
        let conflict = tx.query_row(
            &format!("{CONFLICT_SELECT} WHERE c.id = ?1"),
            [id],
            conflict_view,
        )?;
        tx.commit()?;
        Ok(Ok(Resolved { conflict, value }))
    }
}

const CONFLICT_SELECT: &str =
    "SELECT c.id, v.key, c.target, c.field, c.local_value, c.remote_value,
        c.base_value, c.local_at, c.remote_at, c.detected_at, c.status, c.strategy,
        c.resolved_value, c.resolved_by, c.resolved_at, c.remote_ref
    FROM conflict c JOIN device v ON v.id = c.device_id";

fn conflict_view(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConflictView> {
    Ok(ConflictView {
        id: r.get(0)?,
        device: r.get(1)?,
        target: r.get(2)?,
        field: r.get(3)?,
        local: json_opt(r.get(4)?),
        remote: json_opt(r.get(5)?),
        base: json_opt(r.get(6)?),
        local_at: rfc(r.get(7)?),
        remote_at: rfc(r.get(8)?),
        detected_at: UnixMillis(r.get(9)?).to_rfc3339(),
        status: r.get(10)?,
        strategy: r.get(11)?,
        resolved_value: json_opt(r.get(12)?),
        resolved_by: r.get(13)?,
        resolved_at: rfc(r.get(14)?),
        remote_ref: r.get(15)?,
    })
}

/// Sets one field of a device's syncable document in the mirror (an operator's resolution).
fn set_field(
    tx: &Transaction<'_>,
    device_id: i64,
    field: &str,
    value: Option<&Value>,
    now: i64,
) -> rusqlite::Result<()> {
    match field {
        "/name" => {
            let name = value.and_then(Value::as_str);
            tx.execute(
                "UPDATE device SET name = ?2, meta_updated_at = ?3 WHERE id = ?1",
                params![device_id, name, now],
            )?;
        }
        "/tags" => {
            let tags = value
                .cloned()
                .unwrap_or(Value::Array(Vec::new()))
                .to_string();
            tx.execute(
                "UPDATE device SET tags = ?2, meta_updated_at = ?3 WHERE id = ?1",
                params![device_id, tags, now],
            )?;
        }
        "/enabled" => {
            let enabled = value.and_then(Value::as_bool);
            tx.execute(
                "UPDATE device SET enabled = ?2, meta_updated_at = ?3 WHERE id = ?1",
                params![device_id, enabled, now],
            )?;
        }
        pointer => {
            let current: Option<String> = tx
                .query_row(
                    "SELECT doc FROM desired_state WHERE device_id = ?1",
                    [device_id],
                    |r| r.get(0),
                )
                .optional()?;
            let mut doc = serde_json::json!({
                "desired": current.map(|s| parse_doc(&s)).unwrap_or(Value::Object(Default::default()))
            });
            let mut fields = crate::reconcile::flatten(&doc);
            match value {
                Some(v) => fields.insert(pointer.to_owned(), v.clone()),
                None => fields.remove(pointer),
            };
            doc = crate::reconcile::subtree(&fields, "/desired");
            write_desired(tx, device_id, &doc, Origin::Local, now)?;
        }
    }
    Ok(())
}

fn set_base_field(
    tx: &Transaction<'_>,
    device_id: i64,
    target: Target,
    field: &str,
    value: Option<&Value>,
    now: i64,
) -> rusqlite::Result<()> {
    match value {
        Some(v) => tx.execute(
            "INSERT INTO sync_base(device_id, target, field, value, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(device_id, target, field) DO UPDATE SET value = excluded.value,
                 updated_at = excluded.updated_at",
            params![device_id, target.as_str(), field, v.to_string(), now],
        )?,
        None => tx.execute(
            "DELETE FROM sync_base WHERE device_id = ?1 AND target = ?2 AND field = ?3",
            params![device_id, target.as_str(), field],
        )?,
    };
    Ok(())
}
