//! What the operator commands and the HTTP API both show: one serialisable view per screen,
//! gathered from the store. `nn-gateway status --json` and `GET /api/v1/status` are the same
//! document (the API adds `live`, what only the running daemon knows); the CLI's text is a
//! rendering of these views, never a second query.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::health::{CloudHealth, Health, LinkState};
use crate::model::{DeviceKey, Target};
use crate::store::{Db, DeviceLinks, DeviceView, Status, StoreError};

/// `status --json`, `GET /api/v1/status`.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    /// Whether a daemon holds the database's lock.
    pub daemon_running: bool,
    #[serde(flatten)]
    pub status: Status,
    /// The daemon's own view, fresher than its last heartbeat (API only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
}

/// What the running daemon knows now.
#[derive(Clone, Debug, Serialize)]
pub struct Live {
    pub mqtt: LinkState,
    /// Why the broker link is not up (a TLS problem names the certificate), when it is not.
    pub mqtt_error: Option<String>,
    pub clouds: BTreeMap<Target, CloudHealth>,
    /// Messages stored per second, over the last few seconds.
    pub ingest_per_s: Option<f64>,
    pub sync_enabled: bool,
}

impl Live {
    pub fn of(health: &Health, ingest_per_s: Option<f64>, sync_enabled: bool) -> Live {
        Live {
            mqtt: health.mqtt(),
            mqtt_error: health.mqtt_error(),
            clouds: health.clouds(),
            ingest_per_s,
            sync_enabled,
        }
    }
}

/// The store's counts; `daemon_running` from [`crate::store::daemon_running`] (a command) or
/// `true` (the daemon itself).
///
/// # Errors
/// The store's.
pub fn status(db: &Db, daemon_running: bool) -> Result<StatusView, StoreError> {
    Ok(StatusView {
        daemon_running,
        status: db.status()?,
        live: None,
    })
}

/// A page of devices (`GET /api/v1/devices`).
#[derive(Clone, Debug, Serialize)]
pub struct DevicePage {
    pub devices: Vec<DeviceView>,
    /// Devices matching the search, all pages together.
    pub total: i64,
    pub limit: usize,
    pub offset: usize,
}

/// # Errors
/// The store's.
pub fn device_page(
    db: &Db,
    search: Option<&str>,
    limit: usize,
    offset: usize,
) -> Result<DevicePage, StoreError> {
    let (devices, total) = db.devices_page(search, limit, offset)?;
    Ok(DevicePage {
        devices,
        total,
        limit,
        offset,
    })
}

/// One device with its ids in each cloud (`GET /api/v1/devices/{key}`).
#[derive(Clone, Debug, Serialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceView,
    pub links: DeviceLinks,
}

/// # Errors
/// The store's; `Ok(None)` for a device the mirror does not know.
pub fn device(db: &Db, key: &DeviceKey) -> Result<Option<DeviceDetail>, StoreError> {
    Ok(db
        .device(key)?
        .map(|(device, links)| DeviceDetail { device, links }))
}
