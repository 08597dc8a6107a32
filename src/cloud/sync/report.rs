//! What a run exchanges with NetNeural about conflicts and itself: conflicts an operator
//! resolved there are applied to the mirror; new conflicts and local resolutions are written
//! to `device_conflicts`; a run that did anything leaves an `integration_sync_log` row.
//!
//! In `device_conflicts`, `local_value` is the mirror's value and `remote_value` the cloud's;
//! a conflict with Golioth is named `golioth:<field>` (the table has no column for the
//! cloud). A conflict of a device NetNeural does not know is not written there.

use std::collections::HashMap;

use serde_json::json;

use super::{NetNeuralSpoke, RunReport};
use crate::cloud::netneural::{
    ConflictStatus, ConflictStrategy, DeviceId, NewConflict, SyncLogEntry, SyncLogStatus,
    SyncOperation,
};
use crate::cloud::parse_rfc3339;
use crate::model::UnixMillis;
use crate::store::sync::{ConflictView, Resolution, SyncDevice};
use crate::store::{Store, StoreError};

/// Conflicts written to NetNeural per run at most (the rest at the next).
const REPORT_BATCH: usize = 500;

/// Applies the resolutions made in NetNeural to the pending conflicts it holds.
pub(super) async fn apply_remote_resolutions(
    store: &Store,
    nn: &NetNeuralSpoke,
    report: &mut RunReport,
) -> Result<(), StoreError> {
    let awaiting = store.call(|db| db.conflicts_awaiting_netneural()).await?;
    if awaiting.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = awaiting.iter().map(|(_, r)| r.clone()).collect();
    let remote = match nn.conflicts(&ids).await {
        Ok(r) => r,
        Err(e) => {
            report.errors.push(e.for_sync());
            return Ok(());
        }
    };
    let local_of: HashMap<&str, i64> = awaiting.iter().map(|(l, r)| (r.as_str(), *l)).collect();
    let mut resolutions = Vec::new();
    for rc in remote {
        if rc.resolution_status == ConflictStatus::Pending {
            continue;
        }
        let Some(local) = local_of.get(rc.id.as_str()) else {
            continue;
        };
        let choice = match (&rc.resolved_value, rc.resolution_strategy) {
            (Some(v), _) => Resolution::Value(v.clone()),
            (None, Some(ConflictStrategy::RemoteWins)) => Resolution::Remote,
            // Resolved or ignored without a value: the mirror keeps what it has.
            _ => Resolution::Local,
        };
        let by = format!(
            "netneural:{}",
            rc.resolved_by.as_deref().unwrap_or("operator")
        );
        resolutions.push((*local, choice, by));
    }
    store
        .call(move |db| {
            for (id, choice, by) in &resolutions {
                if let Ok(done) = db.resolve_conflict(*id, choice, by)? {
                    tracing::info!(conflict = id, field = %done.conflict.field,
                        device = %done.conflict.device, by = %by, "conflict resolved in NetNeural");
                    // NetNeural already knows.
                    db.conflict_reported(*id, None, "resolved")?;
                }
            }
            Ok(())
        })
        .await
}

fn status_of(view: &ConflictView) -> ConflictStatus {
    match view.status.as_str() {
        "resolved" => ConflictStatus::Resolved,
        "ignored" => ConflictStatus::Ignored,
        "auto_resolved" => ConflictStatus::AutoResolved,
        _ => ConflictStatus::Pending,
    }
}

fn strategy_of(view: &ConflictView) -> Option<ConflictStrategy> {
    match view.strategy.as_deref()? {
        "local_wins" => Some(ConflictStrategy::LocalWins),
        "remote_wins" => Some(ConflictStrategy::RemoteWins),
        "manual" => Some(ConflictStrategy::Manual),
        // NetNeural has no word for newest_wins: the value chosen says which side won.
        _ => Some(ConflictStrategy::Merge),
    }
}

/// Writes unreported conflicts to `device_conflicts`, and the run to `integration_sync_log`.
/// Failures are logged and retried at the next run (the conflicts stay unreported).
pub(super) async fn tell_netneural(
    store: &Store,
    nn: &NetNeuralSpoke,
    devices: &[SyncDevice],
    run: &RunReport,
) {
    if let Err(e) = report_conflicts(store, nn, devices).await {
        tracing::warn!(error = %e, "conflicts not written to NetNeural (the next sync run tries again)");
    }
    if run.is_quiet() {
        return;
    }
    let now = UnixMillis::now();
    let entry = SyncLogEntry {
        operation: SyncOperation::Bidirectional,
        status: if run.errors.is_empty() {
            SyncLogStatus::Completed
        } else if run.devices == 0 {
            SyncLogStatus::Failed
        } else {
            SyncLogStatus::Partial
        },
        device_id: None,
        devices_processed: run.devices as u32,
        devices_succeeded: (run.devices - run.push_failed.min(run.devices)) as u32,
        devices_failed: run.push_failed as u32,
        conflicts_detected: run.conflicts as u32,
        error_message: (!run.errors.is_empty()).then(|| run.errors.join("; ")),
        details: json!({
            "source": "nn-gateway", "run_id": run.run_id, "imported": run.imported,
            "taken": run.taken, "pushed": run.pushed, "removed": run.removed,
        }),
        started_at: UnixMillis(now.0 - run.duration_ms as i64),
        completed_at: Some(now),
        duration_ms: Some(run.duration_ms as i64),
    };
    if let Err(e) = nn.client.log_sync(&entry).await {
        tracing::warn!(error = %e, "sync run not written to NetNeural's integration_sync_log");
    }
}

async fn report_conflicts(
    store: &Store,
    nn: &NetNeuralSpoke,
    devices: &[SyncDevice],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let unreported = store
        .call(|db| db.conflicts_unreported(REPORT_BATCH))
        .await?;
    if unreported.is_empty() {
        return Ok(());
    }
    let nn_id: HashMap<&str, &str> = devices
        .iter()
        .filter_map(|d| Some((d.key.as_str(), d.netneural_id.as_deref()?)))
        .collect();
    let mut inserts = Vec::new();
    let mut marks: Vec<(i64, Option<String>, String)> = Vec::new();
    for c in &unreported {
        let Some(device) = nn_id.get(c.device.as_str()) else {
            // NetNeural does not know the device: nothing to tell it.
            marks.push((c.id, None, c.status.clone()));
            continue;
        };
        let field_name = if c.target == "netneural" {
            c.field.clone()
        } else {
            format!("{}:{}", c.target, c.field)
        };
        match (&c.remote_ref, c.status.as_str()) {
            (Some(remote), "resolved" | "ignored") => {
                nn.resolve_conflict(
                    remote,
                    status_of(c),
                    strategy_of(c),
                    c.resolved_value.as_ref(),
                    c.resolved_by.as_deref().unwrap_or("nn-gateway"),
                )
                .await?;
                marks.push((c.id, None, c.status.clone()));
            }
            (Some(_), _) => marks.push((c.id, None, c.status.clone())),
            (None, _) => inserts.push((
                c,
                NewConflict {
                    device_id: DeviceId((*device).to_owned()),
                    field_name,
                    local_value: c.local.clone(),
                    remote_value: c.remote.clone(),
                    local_updated_at: c.local_at.as_deref().and_then(parse_rfc3339),
                    remote_updated_at: c.remote_at.as_deref().and_then(parse_rfc3339),
                    resolution_status: status_of(c),
                    resolution_strategy: strategy_of(c),
                    resolved_value: c.resolved_value.clone(),
                },
            )),
        }
    }
    if !inserts.is_empty() {
        let rows: Vec<NewConflict> = inserts.iter().map(|(_, r)| r.clone()).collect();
        let ids = nn.insert_conflicts(&rows).await?;
        for ((c, _), id) in inserts.iter().zip(ids) {
            marks.push((c.id, Some(id), c.status.clone()));
        }
    }
    store
        .call(move |db| {
            for (id, remote, status) in &marks {
                db.conflict_reported(*id, remote.as_deref(), status)?;
            }
            Ok(())
        })
        .await?;
    Ok(())
}
