//! Requests to the NetNeural backend's PostgREST API (`<url>/rest/v1/<table>`).
//!
//! One [`reqwest::Client`] per [`NetNeural`]; the key is read from the [`ApiKey`] for every
//! request and sent as `apikey`, and for a legacy JWT key also as `Authorization: Bearer`.
//! Every query is scoped to the configured organization (and, for assignments, integration).

use std::fmt;

use reqwest::Method;
use serde_json::Value;
use url::Url;

use super::mapping::{
    self, Assignment, ConflictStatus, ConflictStrategy, DeviceId, DeviceUpdate, NewConflict,
    NewDevice, RemoteConflict, RemoteDevice, SyncLogEntry, TelemetryRow, contains_one, eq, gt, gte,
    in_list, last_seen_before, version_guard,
};
use super::wire;
use crate::cloud::{self, ApiKey, CloudError, http_client, secret_header, url_of};
use crate::config::NetNeuralConfig;
use crate::metrics::Metrics;
use crate::model::{Target, UnixMillis};

const T: Target = Target::NetNeural;

/// Conditional metadata writes tried before giving up with a retryable error: each lost race
/// means another writer changed the row in between, which is rare and brief.
pub const METADATA_ATTEMPTS: usize = 5;

/// Ids per `in.(…)` request (assignments of devices, conflicts by id): 100 uuids keep the
/// URL near 4 KiB, under every proxy's limit.
const ID_CHUNK: usize = 100;

/// The largest page a pull of changes asks for: Supabase's default `max_rows`. A server
/// capping pages below the `limit` asked for sends a short page, which ends the pull early;
/// asking for no more than it sends keeps "short page" meaning "last page".
pub const MAX_PAGE_SIZE: usize = 1000;

/// The `conflict_type` of every conflict the gateway records: the two sides hold different
/// values for one field.
const CONFLICT_TYPE: &str = "data_mismatch";

const GET_DEVICES: &str = "GET /rest/v1/devices";
/// The request [`NetNeural::probe`] makes.
pub const PROBE: &str = GET_DEVICES;
const POST_DEVICES: &str = "POST /rest/v1/devices";
const PATCH_DEVICES: &str = "PATCH /rest/v1/devices";
const POST_TELEMETRY: &str = "POST /rest/v1/device_telemetry_history";
const GET_ASSIGNMENTS: &str = "GET /rest/v1/device_service_assignments";
const POST_SYNC_LOG: &str = "POST /rest/v1/integration_sync_log";
const GET_CONFLICTS: &str = "GET /rest/v1/device_conflicts";
const POST_CONFLICTS: &str = "POST /rest/v1/device_conflicts";
const PATCH_CONFLICTS: &str = "PATCH /rest/v1/device_conflicts";

/// The NetNeural backend (Supabase), through PostgREST.
#[derive(Clone)]
pub struct NetNeural {
    http: reqwest::Client,
    base: Url,
    organization_id: String,
    integration_id: String,
    key: ApiKey,
    /// Where every request is counted and timed (see [`cloud::send_dated`]).
    metrics: Metrics,
}

impl fmt::Debug for NetNeural {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNeural")
            .field("base", &self.base.as_str())
            .field("organization_id", &self.organization_id)
            .field("integration_id", &self.integration_id)
            .finish_non_exhaustive()
    }
}

impl NetNeural {
    /// # Errors
    /// When `netneural.url` is unset or the HTTP client cannot be set up.
    pub fn new(config: &NetNeuralConfig, key: ApiKey) -> Result<NetNeural, CloudError> {
        let base = config
            .url
            .clone()
            .ok_or_else(|| CloudError::request(T, "client set-up", "netneural.url is not set"))?;
        Ok(NetNeural {
            http: http_client(T, config.http())?,
            base,
            organization_id: config.organization_id.clone(),
            integration_id: config.integration_id.clone(),
            key,
            metrics: Metrics::new(),
        })
    }

    /// Counts and times this client's requests in `metrics` (without, they go to a registry
    /// of the client's own that nobody reads).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// A request to `/rest/v1/<table>`, with the key headers.
    fn request(
        &self,
        method: Method,
        name: &str,
        table: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder, CloudError> {
        let url = url_of(&self.base, &["rest", "v1", table], query);
        let key = self.key.get();
        let unusable = || CloudError::bad_key(T, name);
        let mut rb = self
            .http
            .request(method, url)
            .header("apikey", secret_header(key.expose()).ok_or_else(unusable)?)
            .header(reqwest::header::ACCEPT, "application/json");
        if mapping::is_legacy_jwt(key.expose()) {
            let bearer = secret_header(&format!("Bearer {}", key.expose())).ok_or_else(unusable)?;
            rb = rb.header(reqwest::header::AUTHORIZATION, bearer);
        }
        Ok(rb)
    }

    async fn send(&self, name: &str, rb: reqwest::RequestBuilder) -> Result<Vec<u8>, CloudError> {
        cloud::send(T, name, rb, mapping::error_body, &self.metrics).await
    }

    /// Rows of a `return=representation` or GET answer.
    async fn rows<W: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        rb: reqwest::RequestBuilder,
    ) -> Result<Vec<W>, CloudError> {
        let body = self.send(name, rb).await?;
        cloud::decode(T, name, &body)
    }

    /// Every row of `table` matching `filters`, keyset-paged by `id`
    /// (`order=id.asc&limit=N`, then `id=gt.<last id>`): a row changed while the pages are read
    /// moves no other row to another page, as an `offset` would. The last page is the first
    /// one shorter than `page_size` (clamped to 1..=[`MAX_PAGE_SIZE`]).
    ///
    /// # Errors
    /// The first failed page; nothing partial is returned. A full page whose last row has
    /// no id, or whose last id does not sort after the previous page's, is a decode error
    /// (the server ignored the keyset, and the pull would never end).
    /// Also returns the server's clock when it answered the first page (its `Date`), the
    /// lower bound of every change the pages may have missed.
    async fn keyset_pages<W: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        table: &str,
        filters: &[(&str, &str)],
        page_size: usize,
        id_of: fn(&W) -> Option<&str>,
    ) -> Result<(Vec<W>, Option<UnixMillis>), CloudError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let limit = page_size.to_string();
        let mut out: Vec<W> = Vec::new();
        let mut after: Option<String> = None;
        let mut first_date: Option<Option<UnixMillis>> = None;
        loop {
            let after_filter = after.as_deref().map(gt);
            let mut query = filters.to_vec();
            query.push(("order", "id.asc"));
            query.push(("limit", &limit));
            if let Some(f) = &after_filter {
                query.push(("id", f));
            }
            let rb = self.request(Method::GET, name, table, &query)?;
            let (body, date) =
                cloud::send_dated(T, name, rb, mapping::error_body, &self.metrics).await?;
            let first_date = *first_date.get_or_insert(date);
            let rows: Vec<W> = cloud::decode(T, name, &body)?;
            let full = rows.len() >= page_size;
            let last = rows.last().map(|r| id_of(r).map(str::to_owned));
            out.extend(rows);
            if !full {
                return Ok((out, first_date));
            }
            let last = last.flatten().ok_or_else(|| {
                CloudError::decode(T, name, "a row of a full page has no id to page by")
            })?;
            if after.as_ref().is_some_and(|a| last.as_str() <= a.as_str()) {
                return Err(CloudError::decode(
                    T,
                    name,
                    "a page did not move past the previous one (id=gt. ignored?)",
                ));
            }
            after = Some(last);
        }
    }

    /// One cheap authenticated read (one device id of the organization): is the backend
    /// reachable, and does the key work?
    ///
    /// # Errors
    /// Any failure, as [`CloudError`] (a bad key is [`CloudError::is_auth`]).
    pub async fn probe(&self) -> Result<(), CloudError> {
        let org = eq(&self.organization_id);
        let rb = self.request(
            Method::GET,
            GET_DEVICES,
            "devices",
            &[("select", "id"), ("organization_id", &org), ("limit", "1")],
        )?;
        self.rows::<wire::IdOnly>(GET_DEVICES, rb).await.map(drop)
    }

    /// The first (oldest) live device of the organization matching `filter`.
    async fn find_one(&self, filter: (&str, &str)) -> Result<Option<wire::Device>, CloudError> {
        let org = eq(&self.organization_id);
        let rb = self.request(
            Method::GET,
            GET_DEVICES,
            "devices",
            &[
                ("select", wire::DEVICE_COLUMNS),
                ("organization_id", &org),
                filter,
                ("deleted_at", "is.null"),
                ("order", "created_at.asc"),
                ("limit", "1"),
            ],
        )?;
        Ok(self.rows(GET_DEVICES, rb).await?.into_iter().next())
    }

    /// The live device of the organization that has `hardware_id` in `hardware_ids`.
    ///
    /// # Errors
    /// Any failure.
    pub async fn find_by_hardware_id(
        &self,
        hardware_id: &str,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        let filter = contains_one(hardware_id);
        Ok(self
            .find_one(("hardware_ids", &filter))
            .await?
            .map(RemoteDevice::from))
    }

    /// The live device of the organization linked to this Golioth device id.
    ///
    /// # Errors
    /// Any failure.
    pub async fn find_by_external_id(
        &self,
        golioth_id: &str,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        let filter = eq(golioth_id);
        Ok(self
            .find_one(("external_device_id", &filter))
            .await?
            .map(RemoteDevice::from))
    }

    /// One live device of the organization by id.
    ///
    /// # Errors
    /// Any failure.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<RemoteDevice>, CloudError> {
        Ok(self.device_row(id).await?.map(RemoteDevice::from))
    }

    async fn device_row(&self, id: &DeviceId) -> Result<Option<wire::Device>, CloudError> {
        let filter = eq(id.as_str());
        self.find_one(("id", &filter)).await
    }

    /// Creates a device in the configured organization and integration. A 409 unique
    /// violation usually means an earlier attempt (whose answer was lost) or another writer
    /// created it: the device is then looked up by its hardware ids and its Golioth id, and
    /// returned if found.
    ///
    /// # Errors
    /// Any failure; a unique violation with no such device to be found is returned as it
    /// came ([`CloudError::is_unique_violation`]).
    pub async fn create_device(&self, device: &NewDevice) -> Result<RemoteDevice, CloudError> {
        let integration = (!self.integration_id.is_empty()).then_some(self.integration_id.as_str());
        let body = wire::DeviceInsert {
            organization_id: &self.organization_id,
            integration_id: integration,
            name: &device.name,
            hardware_ids: &device.hardware_ids,
            serial_number: device.serial_number.as_deref(),
            external_device_id: device.external_device_id.as_deref(),
            status: device.status.as_ref().map(|s| s.as_str()),
            firmware_version: device.firmware_version.as_deref(),
            metadata: (!device.metadata.is_empty()).then_some(&device.metadata),
        };
        let rb = self
            .request(
                Method::POST,
                POST_DEVICES,
                "devices",
                &[("select", wire::DEVICE_COLUMNS)],
            )?
            .header("Prefer", "return=representation")
            .json(&body);
        let err = match self.rows::<wire::Device>(POST_DEVICES, rb).await {
            Ok(rows) => {
                return rows
                    .into_iter()
                    .next()
                    .map(RemoteDevice::from)
                    .ok_or_else(|| CloudError::decode(T, POST_DEVICES, "no row in the answer"));
            }
            Err(e) if e.is_unique_violation() => e,
            Err(e) => return Err(e),
        };
        for hw in &device.hardware_ids {
            if let Some(found) = self.find_by_hardware_id(hw).await? {
                return Ok(found);
            }
        }
        if let Some(golioth_id) = &device.external_device_id
            && let Some(found) = self.find_by_external_id(golioth_id).await?
        {
            return Ok(found);
        }
        Err(err)
    }

    /// Changes the columns set in `update`; returns the row as it is now, or `None` if the
    /// device does not exist (or is deleted) in the organization.
    ///
    /// # Errors
    /// Any failure.
    pub async fn update_device(
        &self,
        id: &DeviceId,
        update: &DeviceUpdate,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        let body = wire::DeviceUpdate {
            name: update.name.as_deref(),
            serial_number: update.serial_number.as_deref(),
            hardware_ids: update.hardware_ids.as_deref(),
            external_device_id: update.external_device_id.as_deref(),
            status: update.status.as_ref().map(|s| s.as_str()),
            last_seen: update.last_seen.map(UnixMillis::to_rfc3339),
            firmware_version: update.firmware_version.as_deref(),
            metadata: update.metadata.as_ref(),
            updated_at: None,
        };
        if body.is_empty() {
            return self.device(id).await;
        }
        self.patch_device(id, ("deleted_at", "is.null"), &body)
            .await
    }

    /// One PATCH of the organization's device `id`, narrowed by one more filter (a live row,
    /// or a version guard); the row as written, `None` if the filters matched nothing.
    async fn patch_device(
        &self,
        id: &DeviceId,
        (column, filter): (&str, &str),
        body: &wire::DeviceUpdate<'_>,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        let (id_filter, org) = (eq(id.as_str()), eq(&self.organization_id));
        let rb = self
            .request(
                Method::PATCH,
                PATCH_DEVICES,
                "devices",
                &[
                    ("id", &id_filter),
                    ("organization_id", &org),
                    (column, filter),
                    ("select", wire::DEVICE_COLUMNS),
                ],
            )?
            .header("Prefer", "return=representation")
            .json(body);
        Ok(self
            .rows::<wire::Device>(PATCH_DEVICES, rb)
            .await?
            .into_iter()
            .next()
            .map(RemoteDevice::from))
    }

    /// Sets one key of the device's `metadata`, leaving every other key as whoever wrote it
    /// left it. Reads `metadata` and `updated_at`, merges the key, and writes only if
    /// `updated_at` is unchanged (`PATCH ?id=eq.X&updated_at=eq.T`); an empty answer means
    /// another writer got in between, so it reads and tries again, up to
    /// [`METADATA_ATTEMPTS`] times. The write also sets `updated_at`, so that the check works
    /// whether or not the table has a trigger for it. Writing the value already there sends
    /// no write. Returns the row after the write, or `None` if the device does not exist.
    ///
    /// # Errors
    /// Any failure; every attempt lost to another writer is a retryable
    /// [`crate::cloud::Failure::Contended`].
    pub async fn set_metadata_key(
        &self,
        id: &DeviceId,
        key: &str,
        value: &Value,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        for _ in 0..METADATA_ATTEMPTS {
            let Some(row) = self.device_row(id).await? else {
                return Ok(None);
            };
            let mut metadata = match &row.metadata {
                Some(Value::Object(m)) => m.clone(),
                _ => serde_json::Map::new(),
            };
            if metadata.get(key) == Some(value) {
                return Ok(Some(row.into()));
            }
            metadata.insert(key.to_owned(), value.clone());
            let body = wire::DeviceUpdate {
                metadata: Some(&metadata),
                updated_at: Some(UnixMillis::now().to_rfc3339()),
                ..wire::DeviceUpdate::default()
            };
            let version = version_guard(row.updated_at.as_deref());
            if let Some(row) = self
                .patch_device(id, ("updated_at", &version), &body)
                .await?
            {
                return Ok(Some(row));
            }
        }
        Err(CloudError::contended(
            T,
            PATCH_DEVICES,
            format!("metadata.{key} of device {id}: {METADATA_ATTEMPTS} attempts"),
        ))
    }

    /// Inserts a batch of telemetry points in one request. Points whose `idempotency_key` is
    /// already stored are skipped (`on_conflict=idempotency_key`, `resolution=ignore-duplicates`),
    /// so a batch retried after its first attempt committed stores nothing twice. Needs the
    /// backend migration in `contrib/supabase/migrations/`.
    ///
    /// # Errors
    /// Any failure; the whole batch is then not stored. A device unknown to the backend is a
    /// 409 [`CloudError::is_foreign_key_violation`]; a batch above
    /// [`NetNeuralConfig::MAX_TELEMETRY_BATCH`] is refused before sending.
    pub async fn insert_telemetry(&self, rows: &[TelemetryRow]) -> Result<(), CloudError> {
        if rows.is_empty() {
            return Ok(());
        }
        if rows.len() > NetNeuralConfig::MAX_TELEMETRY_BATCH {
            return Err(CloudError::request(
                T,
                POST_TELEMETRY,
                format!(
                    "{} points in one batch, the most is {}",
                    rows.len(),
                    NetNeuralConfig::MAX_TELEMETRY_BATCH
                ),
            ));
        }
        let body: Vec<wire::TelemetryInsert<'_>> = rows
            .iter()
            .map(|r| wire::TelemetryInsert {
                device_id: r.device_id.as_str(),
                organization_id: &self.organization_id,
                telemetry: &r.telemetry,
                device_timestamp: r.device_timestamp.map(UnixMillis::to_rfc3339),
                received_at: r.received_at.to_rfc3339(),
                idempotency_key: &r.idempotency_key,
            })
            .collect();
        let rb = self
            .request(
                Method::POST,
                POST_TELEMETRY,
                "device_telemetry_history",
                &[
                    ("on_conflict", "idempotency_key"),
                    ("columns", wire::TELEMETRY_COLUMNS),
                ],
            )?
            .header("Prefer", "resolution=ignore-duplicates,return=minimal")
            .json(&body);
        self.send(POST_TELEMETRY, rb).await.map(drop)
    }

    /// Moves the device's `last_seen` to `at` unless it is already there or later
    /// (`?or=(last_seen.is.null,last_seen.lt.T)`), so that batches arriving out of order
    /// never move it back. Returns whether it moved.
    ///
    /// # Errors
    /// Any failure.
    pub async fn advance_last_seen(
        &self,
        id: &DeviceId,
        at: UnixMillis,
    ) -> Result<bool, CloudError> {
        let (id_filter, org) = (eq(id.as_str()), eq(&self.organization_id));
        let older = last_seen_before(at);
        let body = wire::DeviceUpdate {
            last_seen: Some(at.to_rfc3339()),
            ..wire::DeviceUpdate::default()
        };
        let rb = self
            .request(
                Method::PATCH,
                PATCH_DEVICES,
                "devices",
                &[
                    ("id", &id_filter),
                    ("organization_id", &org),
                    ("or", &older),
                    ("select", "id"),
                ],
            )?
            .header("Prefer", "return=representation")
            .json(&body);
        Ok(!self
            .rows::<wire::IdOnly>(PATCH_DEVICES, rb)
            .await?
            .is_empty())
    }

    /// How each of `devices` syncs with the configured integration. A device without an
    /// assignment row is absent from the answer (the caller decides what that means).
    ///
    /// # Errors
    /// Any failure.
    pub async fn assignments(&self, devices: &[DeviceId]) -> Result<Vec<Assignment>, CloudError> {
        let integration = eq(&self.integration_id);
        let mut out = Vec::new();
        for chunk in devices.chunks(ID_CHUNK) {
            let ids = in_list(chunk.iter().map(DeviceId::as_str));
            let rb = self.request(
                Method::GET,
                GET_ASSIGNMENTS,
                "device_service_assignments",
                &[
                    ("select", wire::ASSIGNMENT_COLUMNS),
                    ("integration_id", &integration),
                    ("device_id", &ids),
                ],
            )?;
            let rows: Vec<wire::Assignment> = self.rows(GET_ASSIGNMENTS, rb).await?;
            out.extend(rows.into_iter().map(Assignment::from));
        }
        Ok(out)
    }

    /// Writes one `integration_sync_log` row for the configured organization and integration.
    ///
    /// # Errors
    /// Any failure.
    pub async fn log_sync(&self, entry: &SyncLogEntry) -> Result<(), CloudError> {
        let body = wire::SyncLogInsert {
            organization_id: &self.organization_id,
            integration_id: &self.integration_id,
            operation: entry.operation.as_str(),
            status: entry.status.as_str(),
            device_id: entry.device_id.as_ref().map(DeviceId::as_str),
            devices_processed: entry.devices_processed,
            devices_succeeded: entry.devices_succeeded,
            devices_failed: entry.devices_failed,
            conflicts_detected: entry.conflicts_detected,
            error_message: entry.error_message.as_deref(),
            details: &entry.details,
            started_at: entry.started_at.to_rfc3339(),
            completed_at: entry.completed_at.map(UnixMillis::to_rfc3339),
            duration_ms: entry.duration_ms,
        };
        let rb = self
            .request(Method::POST, POST_SYNC_LOG, "integration_sync_log", &[])?
            .header("Prefer", "return=minimal")
            .json(&body);
        self.send(POST_SYNC_LOG, rb).await.map(drop)
    }
}

mod sync;
#[cfg(test)]
mod tests;
