//! Each cloud as an outbox lane sees it ([`crate::outbox::Uplink`]): registration by hardware
//! id, reported state, telemetry, the sync direction and the work summary.
//!
//! - **Identity.** A device is known in both clouds by `gateway.cloud_id` rendered over
//!   `gateway.site_id` and its local key; that string is its hardware id and its name.
//! - **Golioth** gets the reported document at `golioth.reported_path` in LightDB State (PUT,
//!   the whole document). It takes no telemetry: its REST API cannot write LightDB Stream.
//! - **NetNeural** gets the reported document under `devices.metadata.reported` (the gateway's
//!   own key; other keys are never touched), telemetry as bulk inserts into
//!   `device_telemetry_history`, and `last_seen` advanced at most once per device per
//!   [`TOUCH_EVERY`]. A device whose assignment for this integration says its data does not
//!   flow into NetNeural (`export` or `none`, or sync disabled) gets nothing sent; a device with
//!   no assignment row is synced (the gateway registered it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::golioth::{self, Golioth};
use super::netneural::{self, NetNeural, SyncDirection};
use super::{CloudError, Failure};
use crate::config::IdTemplate;
use crate::model::{DeviceKey, Target, UnixMillis};
use crate::outbox::{OutPoint, Registered, Summary, Uplink};
use crate::store::{DeviceIdent, OutboxRow};

/// How long a device's sync direction is trusted before it is read again.
pub const DIRECTION_TTL: Duration = Duration::from_secs(300);

/// `last_seen` in NetNeural is advanced at most this often per device.
pub const TOUCH_EVERY: Duration = Duration::from_secs(30);

/// The hardware id (and name) of devices in the clouds.
#[derive(Clone, Debug)]
pub struct Identity {
    pub template: IdTemplate,
    pub site: String,
}

impl Identity {
    pub fn of(&self, device: &DeviceIdent) -> String {
        self.template.render(&self.site, device.key.as_str())
    }

    /// The hardware id of the device with local key `key`.
    pub fn of_key(&self, key: &DeviceKey) -> String {
        self.template.render(&self.site, key.as_str())
    }

    /// The local key of the device with this hardware id, if the template (over this site)
    /// could have made it: a cloud's devices of other sites are not this gateway's.
    pub fn key_of(&self, hardware_id: &str) -> Option<DeviceKey> {
        let rendered = self.template.render(&self.site, "\u{0}");
        let (pre, post) = rendered.split_once('\u{0}')?;
        let key = hardware_id.strip_prefix(pre)?.strip_suffix(post)?;
        DeviceKey::parse(key).ok()
    }
}

fn unknown_operation(target: Target, row: &OutboxRow) -> CloudError {
    CloudError::request(
        target,
        "outbox row",
        format!("operation {:?} is not sent to this cloud", row.operation),
    )
}

fn gone(target: Target, request: &str) -> CloudError {
    CloudError {
        target,
        request: request.into(),
        failure: Failure::Status {
            status: 404,
            code: None,
            message: "the device no longer exists there".into(),
        },
        retry_after: None,
    }
}

pub struct GoliothUplink {
    pub client: Golioth,
    pub identity: Identity,
    pub reported_path: String,
}

impl Uplink for GoliothUplink {
    fn target(&self) -> Target {
        Target::Golioth
    }

    async fn probe(&self) -> Result<(), CloudError> {
        self.client.probe().await
    }

    async fn register(
        &self,
        device: &DeviceIdent,
        _row: Option<&OutboxRow>,
    ) -> Result<Registered, CloudError> {
        // Golioth's create takes no LightDB State: the row goes in its own PUT.
        let hw = self.identity.of(device);
        Ok(Registered {
            id: self.client.register(&hw, &hw, &[]).await?.id.0,
            delivered: false,
        })
    }

    // Golioth has no sync direction of ours, no last-seen time to set and no sync log: the
    // trait's defaults for `accepts`, `touch` and `summarise` hold.

    async fn send_row(&self, remote_id: &str, row: &OutboxRow) -> Result<(), CloudError> {
        match row.operation.as_str() {
            "reported_state" => {
                let doc = row.payload.clone().unwrap_or(Value::Null);
                self.client
                    .put_state(
                        &golioth::DeviceId(remote_id.to_owned()),
                        &self.reported_path,
                        &doc,
                    )
                    .await
            }
            _ => Err(unknown_operation(Target::Golioth, row)),
        }
    }

    async fn send_telemetry(&self, _points: &[OutPoint<'_>]) -> Result<(), CloudError> {
        Err(CloudError::request(
            Target::Golioth,
            "telemetry",
            "Golioth's REST API cannot write LightDB Stream",
        ))
    }
}

pub struct NetNeuralUplink {
    pub client: NetNeural,
    pub identity: Identity,
    directions: Mutex<HashMap<String, (bool, Instant)>>,
    touched: Mutex<HashMap<String, Instant>>,
}

impl NetNeuralUplink {
    pub fn new(client: NetNeural, identity: Identity) -> NetNeuralUplink {
        NetNeuralUplink {
            client,
            identity,
            directions: Mutex::default(),
            touched: Mutex::default(),
        }
    }
}

impl Uplink for NetNeuralUplink {
    fn target(&self) -> Target {
        Target::NetNeural
    }

    async fn probe(&self) -> Result<(), CloudError> {
        self.client.probe().await
    }

    async fn register(
        &self,
        device: &DeviceIdent,
        row: Option<&OutboxRow>,
    ) -> Result<Registered, CloudError> {
        let hw = self.identity.of(device);
        // Look up first: `hardware_ids` has no unique constraint, so a create after a crash
        // between an earlier create and our commit would make a second device.
        if let Some(found) = self.client.find_by_hardware_id(&hw).await? {
            return Ok(Registered {
                id: found.id.0,
                delivered: false,
            });
        }
        // A new device carries its reported state in the create: one request, not a read and
        // a conditional write (nobody else can have written its metadata yet).
        let mut metadata = serde_json::Map::new();
        let carried = row.filter(|r| r.operation == "reported_state");
        if let Some(r) = carried {
            metadata.insert(
                netneural::METADATA_REPORTED.to_owned(),
                r.payload.clone().unwrap_or(Value::Null),
            );
        }
        let new = netneural::NewDevice {
            name: hw.clone(),
            hardware_ids: vec![hw],
            external_device_id: device.golioth_id.clone(),
            metadata,
            ..Default::default()
        };
        let created = self.client.create_device(&new).await?;
        // On a 409 the client returns the device another writer made: its metadata is then
        // not what we sent, and it may have an assignment.
        let ours = created.metadata == new.metadata;
        if ours {
            // Just created: no assignment can name it yet, so it syncs (no read needed).
            self.directions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(created.id.0.clone(), (true, Instant::now()));
        }
        let delivered = ours && carried.is_some();
        Ok(Registered {
            id: created.id.0,
            delivered,
        })
    }

    async fn accepts(&self, remote_ids: &[&str]) -> Result<Vec<bool>, CloudError> {
        let mut known: HashMap<&str, bool> = HashMap::new();
        let mut unknown: Vec<netneural::DeviceId> = Vec::new();
        {
            let directions = self.directions.lock().unwrap_or_else(|p| p.into_inner());
            for id in remote_ids {
                match directions.get(*id) {
                    Some((ok, at)) if at.elapsed() < DIRECTION_TTL => {
                        known.insert(id, *ok);
                    }
                    _ => unknown.push(netneural::DeviceId((*id).to_owned())),
                }
            }
        }
        if !unknown.is_empty() {
            // One read for all of them (the client chunks long lists).
            let assignments = self.client.assignments(&unknown).await?;
            let mut directions = self.directions.lock().unwrap_or_else(|p| p.into_inner());
            for id in &unknown {
                let ok = assignments
                    .iter()
                    .find(|a| a.device_id == *id)
                    .is_none_or(|a| {
                        a.direction.imports() || a.direction == SyncDirection::Bidirectional
                    });
                directions.insert(id.0.clone(), (ok, Instant::now()));
            }
            for id in remote_ids {
                if let Some((ok, _)) = directions.get(*id) {
                    known.entry(id).or_insert(*ok);
                }
            }
        }
        Ok(remote_ids
            .iter()
            .map(|id| known.get(id).copied().unwrap_or(true))
            .collect())
    }

    async fn send_row(&self, remote_id: &str, row: &OutboxRow) -> Result<(), CloudError> {
        match row.operation.as_str() {
            "reported_state" => {
                let doc = row.payload.clone().unwrap_or(Value::Null);
                let id = netneural::DeviceId(remote_id.to_owned());
                match self
                    .client
                    .set_metadata_key(&id, netneural::METADATA_REPORTED, &doc)
                    .await?
                {
                    Some(_) => Ok(()),
                    None => Err(gone(Target::NetNeural, "PATCH /rest/v1/devices")),
                }
            }
            _ => Err(unknown_operation(Target::NetNeural, row)),
        }
    }

    async fn send_telemetry(&self, points: &[OutPoint<'_>]) -> Result<(), CloudError> {
        let rows: Vec<netneural::TelemetryRow> = points
            .iter()
            .map(|p| netneural::TelemetryRow {
                device_id: netneural::DeviceId(p.remote_id.to_owned()),
                telemetry: p.item.payload.clone(),
                device_timestamp: p.item.device_ts,
                received_at: p.item.received_at,
                idempotency_key: p.idempotency_key.clone(),
            })
            .collect();
        self.client.insert_telemetry(&rows).await.map_err(|e| {
            // A backend without the idempotency migration refuses every batch for its shape,
            // not its content: wait for the migration instead of dead-lettering everything.
            if matches!(e.code(), Some("PGRST204" | "42703" | "42P10")) {
                CloudError::contended(
                    Target::NetNeural,
                    e.request.clone(),
                    format!(
                        "{e} — the backend lacks the idempotency_key migration \
                         (contrib/supabase/migrations); telemetry waits until it is applied"
                    ),
                )
            } else {
                e
            }
        })
    }

    async fn touch(&self, seen: &[(String, UnixMillis)]) -> Result<(), CloudError> {
        let due: Vec<&(String, UnixMillis)> = {
            let touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            seen.iter()
                .filter(|(id, _)| touched.get(id).is_none_or(|at| at.elapsed() >= TOUCH_EVERY))
                .collect()
        };
        for (id, at) in due {
            self.client
                .advance_last_seen(&netneural::DeviceId(id.clone()), *at)
                .await?;
            self.touched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), Instant::now());
        }
        Ok(())
    }

    async fn summarise(&self, s: &Summary) -> Result<(), CloudError> {
        let succeeded = s.rows_sent + s.points_sent;
        let failed = s.rows_failed + s.rows_dead + s.points_dead;
        let status = match (succeeded, failed) {
            (_, 0) => netneural::SyncLogStatus::Completed,
            (0, _) => netneural::SyncLogStatus::Failed,
            _ => netneural::SyncLogStatus::Partial,
        };
        let now = UnixMillis::now();
        let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let entry = netneural::SyncLogEntry {
            operation: netneural::SyncOperation::Import,
            status,
            device_id: None,
            devices_processed: count(succeeded + failed),
            devices_succeeded: count(succeeded),
            devices_failed: count(failed),
            conflicts_detected: 0,
            error_message: s.last_error.clone(),
            details: serde_json::json!({
                "source": "nn-gateway uplink",
                "rows_sent": s.rows_sent,
                "rows_dead": s.rows_dead,
                "points_sent": s.points_sent,
                "points_dead": s.points_dead,
                "devices_registered": s.devices_registered,
                "requests_failed": s.requests_failed,
            }),
            started_at: UnixMillis(s.started_at),
            completed_at: Some(now),
            duration_ms: Some(now.0 - s.started_at),
        };
        self.client.log_sync(&entry).await
    }
}
