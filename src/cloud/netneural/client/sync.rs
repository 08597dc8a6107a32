//! The NetNeural calls of reconciliation: incremental reads (devices and assignments changed
//! since a cursor), the guarded write of a device's synced fields, and `device_conflicts`.

use reqwest::Method;
use serde_json::{Map, Value};

use super::*;
use crate::cloud::netneural::Changed;

impl NetNeural {
    /// Every device of the organization changed at or after `since` (`updated_at=gte.`;
    /// `None` for all), soft-deleted ones included ([`RemoteDevice::deleted`]), in id order,
    /// all pages ([`MAX_PAGE_SIZE`] bounds `page_size`).
    ///
    /// `since` is a [`RemoteDevice::version`] as the server wrote it. `gte` re-reads the rows
    /// at the cursor itself, so that rows sharing that instant are not lost; the caller skips
    /// versions it has. Pages are keyed by id, so a row changed during the pull may be read
    /// at its new version or, if its id is on a page already read, not at all: its new
    /// `updated_at` is later than the pull's start, so the next pull's `since` must not be
    /// later than that (the largest version read may be later: it may be such a row's).
    ///
    /// # Errors
    /// The first failed page; nothing partial is returned.
    pub async fn devices_changed_since(
        &self,
        since: Option<&str>,
        page_size: usize,
    ) -> Result<Vec<RemoteDevice>, CloudError> {
        Ok(self.devices_changed(since, page_size).await?.rows)
    }

    /// [`NetNeural::devices_changed_since`], with the server's clock when it answered the
    /// first page: every change the pull missed is later than that, whatever it read.
    ///
    /// # Errors
    /// As [`NetNeural::devices_changed_since`].
    pub async fn devices_changed(
        &self,
        since: Option<&str>,
        page_size: usize,
    ) -> Result<Changed<RemoteDevice>, CloudError> {
        let org = eq(&self.organization_id);
        let since = since.map(gte);
        let mut filters = vec![
            ("select", wire::DEVICE_COLUMNS),
            ("organization_id", org.as_str()),
        ];
        if let Some(s) = &since {
            filters.push(("updated_at", s.as_str()));
        }
        let (rows, server_time) = self
            .keyset_pages(
                GET_DEVICES,
                "devices",
                &filters,
                page_size,
                |d: &wire::Device| Some(d.id.as_str()),
            )
            .await?;
        Ok(Changed {
            rows: rows.into_iter().map(RemoteDevice::from).collect(),
            server_time,
        })
    }

    /// Writes what a sync settled for one device in one PATCH: `name` (when `Some`) and the
    /// **whole** `metadata` (the caller merged its keys into the document it read), only if
    /// the row is still at `version` (`updated_at=eq.<version>`, `is.null` for `None`). Also
    /// sets `updated_at`, so that the guard works with or without an update trigger.
    /// Returns the row as written, or `None` when the guard matched nothing: another writer
    /// changed the device since it was read (or it is gone). Nothing is read or retried
    /// here; the next sync reads the new version and merges again.
    ///
    /// # Errors
    /// Any failure.
    pub async fn update_synced(
        &self,
        id: &DeviceId,
        version: Option<&str>,
        name: Option<&str>,
        metadata: &Map<String, Value>,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        let body = wire::DeviceUpdate {
            name,
            metadata: Some(metadata),
            updated_at: Some(UnixMillis::now().to_rfc3339()),
            ..wire::DeviceUpdate::default()
        };
        self.patch_device(id, ("updated_at", &version_guard(version)), &body)
            .await
    }

    /// Assignments of the configured integration changed at or after `since`
    /// (`updated_at=gte.`; `None` for all), each with its `updated_at` as the server wrote it
    /// (the cursor of the next pull), keyset-paged by id like
    /// [`NetNeural::devices_changed_since`], with the same caveat on the next cursor.
    ///
    /// # Errors
    /// The first failed page; nothing partial is returned.
    pub async fn assignments_changed_since(
        &self,
        since: Option<&str>,
        page_size: usize,
    ) -> Result<Vec<(Assignment, Option<String>)>, CloudError> {
        Ok(self.assignments_changed(since, page_size).await?.rows)
    }

    /// [`NetNeural::assignments_changed_since`], with the server's clock when it answered the
    /// first page.
    ///
    /// # Errors
    /// As [`NetNeural::assignments_changed_since`].
    pub async fn assignments_changed(
        &self,
        since: Option<&str>,
        page_size: usize,
    ) -> Result<Changed<(Assignment, Option<String>)>, CloudError> {
        let integration = eq(&self.integration_id);
        let since = since.map(gte);
        let mut filters = vec![
            ("select", wire::ASSIGNMENT_COLUMNS),
            ("integration_id", integration.as_str()),
        ];
        if let Some(s) = &since {
            filters.push(("updated_at", s.as_str()));
        }
        let (rows, server_time) = self
            .keyset_pages(
                GET_ASSIGNMENTS,
                "device_service_assignments",
                &filters,
                page_size,
                |a: &wire::Assignment| a.id.as_deref(),
            )
            .await?;
        let rows = rows
            .into_iter()
            .map(|a: wire::Assignment| {
                let version = a.updated_at.clone();
                (Assignment::from(a), version)
            })
            .collect();
        Ok(Changed { rows, server_time })
    }

    /// Records conflicts in `device_conflicts` in one insert (`conflict_type` is
    /// `data_mismatch`); returns their ids in the order of `rows`. A row settled already
    /// (status other than pending) gets `resolved_at` now.
    ///
    /// # Errors
    /// Any failure; then none is recorded. A device unknown to the backend is a 409
    /// [`CloudError::is_foreign_key_violation`].
    pub async fn insert_conflicts(&self, rows: &[NewConflict]) -> Result<Vec<String>, CloudError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let now = UnixMillis::now().to_rfc3339();
        let body: Vec<wire::ConflictInsert<'_>> = rows
            .iter()
            .map(|c| wire::ConflictInsert {
                device_id: c.device_id.as_str(),
                conflict_type: CONFLICT_TYPE,
                field_name: &c.field_name,
                local_value: c.local_value.as_ref(),
                remote_value: c.remote_value.as_ref(),
                local_updated_at: c.local_updated_at.map(UnixMillis::to_rfc3339),
                remote_updated_at: c.remote_updated_at.map(UnixMillis::to_rfc3339),
                resolution_status: c.resolution_status.as_str(),
                resolution_strategy: c.resolution_strategy.map(ConflictStrategy::as_str),
                resolved_value: c.resolved_value.as_ref(),
                resolved_at: settled_at(c.resolution_status, &now),
            })
            .collect();
        let rb = self
            .request(
                Method::POST,
                POST_CONFLICTS,
                "device_conflicts",
                &[("columns", wire::CONFLICT_INSERT_COLUMNS), ("select", "id")],
            )?
            .header("Prefer", "return=representation")
            .json(&body);
        let ids: Vec<wire::IdOnly> = self.rows(POST_CONFLICTS, rb).await?;
        if ids.len() != rows.len() {
            return Err(CloudError::decode(
                T,
                POST_CONFLICTS,
                format!("{} rows inserted, {} ids answered", rows.len(), ids.len()),
            ));
        }
        Ok(ids.into_iter().map(|r| r.id).collect())
    }

    /// The conflicts with these ids (an id not found is absent from the answer), as NetNeural
    /// holds them now: an operator may have settled them there.
    ///
    /// # Errors
    /// Any failure.
    pub async fn conflicts(&self, ids: &[String]) -> Result<Vec<RemoteConflict>, CloudError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(ID_CHUNK) {
            let ids = in_list(chunk.iter().map(String::as_str));
            let rb = self.request(
                Method::GET,
                GET_CONFLICTS,
                "device_conflicts",
                &[("select", wire::CONFLICT_COLUMNS), ("id", &ids)],
            )?;
            let rows: Vec<wire::Conflict> = self.rows(GET_CONFLICTS, rb).await?;
            out.extend(rows.into_iter().map(RemoteConflict::from));
        }
        Ok(out)
    }

    /// Settles (or, with [`ConflictStatus::Pending`], reopens) one conflict: its status,
    /// strategy and value (`None` clears them), who settled it, and `resolved_at` now (cleared
    /// when pending, as NetNeural's schema requires). An id that matches no row changes
    /// nothing and is not an error.
    ///
    /// # Errors
    /// Any failure.
    pub async fn resolve_conflict(
        &self,
        id: &str,
        status: ConflictStatus,
        strategy: Option<ConflictStrategy>,
        resolved_value: Option<&Value>,
        resolved_by: &str,
    ) -> Result<(), CloudError> {
        let body = wire::ConflictResolution {
            resolution_status: status.as_str(),
            resolution_strategy: strategy.map(ConflictStrategy::as_str),
            resolved_value,
            resolved_by,
            resolved_at: settled_at(status, &UnixMillis::now().to_rfc3339()),
        };
        let id_filter = eq(id);
        let rb = self
            .request(
                Method::PATCH,
                PATCH_CONFLICTS,
                "device_conflicts",
                &[("id", &id_filter)],
            )?
            .header("Prefer", "return=minimal")
            .json(&body);
        self.send(PATCH_CONFLICTS, rb).await.map(drop)
    }
}

/// `resolved_at` of a conflict in `status`: `now` once settled, none while pending.
fn settled_at(status: ConflictStatus, now: &str) -> Option<String> {
    (status != ConflictStatus::Pending).then(|| now.to_owned())
}
