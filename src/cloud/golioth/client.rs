//! Requests to Golioth's Management REST API.
//!
//! One [`reqwest::Client`] (connection pool) per [`Golioth`]; the key is read from the
//! [`ApiKey`] for every request, so a SIGHUP-replaced key takes effect at the next one.
//! Every error is a [`CloudError`] naming the request by its path template
//! (`GET /v1/projects/{projectId}/devices`), never by its URL.

use std::collections::{HashMap, HashSet};
use std::fmt;

use reqwest::Method;
use serde_json::Value;
use url::Url;

use super::mapping::{
    self, DeviceFilter, DeviceId, DevicePatch, NewDevice, RemoteDevice, Tag, TagId,
};
use super::wire;
use crate::cloud::{self, ApiKey, CloudError, http_client, secret_header, url_of};
use crate::config::GoliothConfig;
use crate::metrics::Metrics;
use crate::model::Target;

const T: Target = Target::Golioth;

/// Items per list page: Golioth's maximum, so that a list costs the fewest requests.
pub const PER_PAGE: i64 = 100;

/// Pages of one list read at once, once the first page gave the total.
const PAGES_AT_ONCE: usize = 4;

/// Pages one list may take (a million devices) before the answer is taken as broken: a
/// server whose `total` keeps growing must not loop a lane forever.
const MAX_PAGES: i64 = 10_000;

const LIST_DEVICES: &str = "GET /v1/projects/{projectId}/devices";
/// The request [`Golioth::probe`] makes.
pub const PROBE: &str = LIST_DEVICES;
const CREATE_DEVICE: &str = "POST /v1/projects/{projectId}/devices";
const GET_DEVICE: &str = "GET /v1/projects/{projectId}/devices/{deviceId}";
const PATCH_DEVICE: &str = "PATCH /v1/projects/{projectId}/devices/{deviceId}";
const DELETE_DEVICE: &str = "DELETE /v1/projects/{projectId}/devices/{deviceId}";
const LIST_TAGS: &str = "GET /v1/projects/{projectId}/tags";
const CREATE_TAG: &str = "POST /v1/projects/{projectId}/tags";
const GET_STATE: &str = "GET /v1/projects/{projectId}/devices/{deviceId}/data/{path}";
const PUT_STATE: &str = "PUT /v1/projects/{projectId}/devices/{deviceId}/data/{path}";
const DELETE_STATE: &str = "DELETE /v1/projects/{projectId}/devices/{deviceId}/data/{path}";

/// A Golioth project, through its Management API (header `x-api-key`).
#[derive(Clone)]
pub struct Golioth {
    http: reqwest::Client,
    base: Url,
    project: String,
    key: ApiKey,
    /// Where every request is counted and timed (see [`cloud::send_dated`]).
    metrics: Metrics,
}

impl fmt::Debug for Golioth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Golioth")
            .field("base", &self.base.as_str())
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

impl Golioth {
    /// # Errors
    /// When the HTTP client cannot be set up (see [`http_client`]).
    pub fn new(config: &GoliothConfig, key: ApiKey) -> Result<Golioth, CloudError> {
        Ok(Golioth {
            http: http_client(T, config.http())?,
            base: config.api_url.clone(),
            project: config.project_id.clone(),
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

    /// A request under `/v1/projects/{projectId}/`, with the key.
    fn request(
        &self,
        method: Method,
        name: &str,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder, CloudError> {
        let mut path = vec!["v1", "projects", self.project.as_str()];
        path.extend_from_slice(segments);
        let url = url_of(&self.base, &path, query);
        let key =
            secret_header(self.key.get().expose()).ok_or_else(|| CloudError::bad_key(T, name))?;
        Ok(self
            .http
            .request(method, url)
            .header("x-api-key", key)
            .header(reqwest::header::ACCEPT, "application/json"))
    }

    async fn send(&self, name: &str, rb: reqwest::RequestBuilder) -> Result<Vec<u8>, CloudError> {
        cloud::send(T, name, rb, mapping::error_body, &self.metrics).await
    }

    /// `{"data": …}` of a 2xx answer; an absent or null `data` is a decode error.
    fn data<W: serde::de::DeserializeOwned>(name: &str, body: &[u8]) -> Result<W, CloudError> {
        cloud::decode::<wire::Data<W>>(T, name, body)?
            .data
            .ok_or_else(|| CloudError::decode(T, name, "no `data` in the answer"))
    }

    /// Every page of a list: pages are 0-based, and the last one is reached when
    /// `(page + 1) * perPage >= total` (or, without a `total`, at a short or empty page).
    async fn list_all<W: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        segments: &[&str],
        filters: &[(&str, &str)],
    ) -> Result<Vec<W>, CloudError> {
        let first: wire::Page<W> = self.page(name, segments, filters, 0).await?;
        let page_size = first.per_page.filter(|n| *n > 0).unwrap_or(PER_PAGE);
        let mut items = Vec::new();
        let got = first.list.len();
        items.extend(first.list);
        let Some(total) = first.total.filter(|_| got > 0) else {
            return self
                .pages_in_turn(name, segments, filters, 1, page_size, got, items)
                .await;
        };
        // The total says how many pages there are: the rest are read PAGES_AT_ONCE at a time.
        let pages = (total + page_size - 1) / page_size;
        if pages > MAX_PAGES {
            return Err(CloudError::decode(
                T,
                name,
                format!("the list has {pages} pages, more than {MAX_PAGES}"),
            ));
        }
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(PAGES_AT_ONCE));
        let mut set = tokio::task::JoinSet::new();
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let (segs, name_owned) = (owned(segments), name.to_owned());
        let filt: Vec<(String, String)> = filters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        for page in 1..pages {
            let (me, gate) = (self.clone(), gate.clone());
            let (segs, filt, name) = (segs.clone(), filt.clone(), name_owned.clone());
            set.spawn(async move {
                let _permit = gate.acquire_owned().await;
                let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
                let filt: Vec<(&str, &str)> =
                    filt.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                (page, me.page::<W>(&name, &segs, &filt, page).await)
            });
        }
        let mut rest: Vec<(i64, wire::Page<W>)> = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (page, answer) = joined
                .map_err(|e| CloudError::request(T, name, format!("page task failed: {e}")))?;
            rest.push((page, answer?));
        }
        rest.sort_by_key(|(p, _)| *p);
        let mut last_total = total;
        let mut last_got = got;
        for (_, answer) in rest {
            last_got = answer.list.len();
            last_total = answer.total.unwrap_or(last_total);
            items.extend(answer.list);
        }
        // Devices created meanwhile: the list grew past the pages read; read on in turn.
        if pages.saturating_mul(page_size) < last_total && last_got > 0 {
            return self
                .pages_in_turn(name, segments, filters, pages, page_size, last_got, items)
                .await;
        }
        Ok(items)
    }

    /// One page of a list.
    async fn page<W: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        segments: &[&str],
        filters: &[(&str, &str)],
        page: i64,
    ) -> Result<wire::Page<W>, CloudError> {
        let (page_text, per_page) = (page.to_string(), PER_PAGE.to_string());
        let mut query = filters.to_vec();
        query.push(("page", &page_text));
        query.push(("perPage", &per_page));
        let rb = self.request(Method::GET, name, segments, &query)?;
        let body = self.send(name, rb).await?;
        cloud::decode(T, name, &body)
    }

    /// Pages from `page` on, one after the other, until one says it is the last (by its
    /// total, or by coming back short when it has none).
    #[allow(clippy::too_many_arguments)]
    async fn pages_in_turn<W: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        segments: &[&str],
        filters: &[(&str, &str)],
        mut page: i64,
        mut page_size: i64,
        mut got: usize,
        mut items: Vec<W>,
    ) -> Result<Vec<W>, CloudError> {
        if got == 0 || (got as i64) < page_size {
            return Ok(items);
        }
        loop {
            if page >= MAX_PAGES {
                return Err(CloudError::decode(
                    T,
                    name,
                    format!("the list did not end within {MAX_PAGES} pages"),
                ));
            }
            let answer: wire::Page<W> = self.page(name, segments, filters, page).await?;
            got = answer.list.len();
            items.extend(answer.list);
            page_size = answer.per_page.filter(|n| *n > 0).unwrap_or(page_size);
            let last = got == 0
                || match answer.total {
                    Some(total) => (page + 1).saturating_mul(page_size) >= total,
                    None => (got as i64) < page_size,
                };
            if last {
                return Ok(items);
            }
            page += 1;
        }
    }

    /// One cheap authenticated read (the first device of the project): is Golioth reachable,
    /// and do the key and the project id work?
    ///
    /// # Errors
    /// Any failure, as [`CloudError`] (a bad key is [`CloudError::is_auth`]).
    pub async fn probe(&self) -> Result<(), CloudError> {
        let rb = self.request(Method::GET, LIST_DEVICES, &["devices"], &[("perPage", "1")])?;
        let body = self.send(LIST_DEVICES, rb).await?;
        cloud::decode::<wire::Page<serde::de::IgnoredAny>>(T, LIST_DEVICES, &body)?;
        Ok(())
    }

    /// Every device matching `filter`, all pages, each device once.
    ///
    /// # Errors
    /// The first failed page; nothing partial is returned.
    pub async fn list_devices(
        &self,
        filter: &DeviceFilter,
    ) -> Result<Vec<RemoteDevice>, CloudError> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(hw) = &filter.hardware_id {
            query.push(("hardwareId", hw));
        }
        for tag in &filter.tag_ids {
            query.push(("tags", tag.as_str()));
        }
        if let Some(path) = &filter.state_path {
            query.push(("statePath", path));
        }
        let devices: Vec<wire::Device> = self.list_all(LIST_DEVICES, &["devices"], &query).await?;
        // A device created or deleted between two pages shifts the rest by one: drop repeats.
        let mut seen = HashSet::new();
        Ok(devices
            .into_iter()
            .map(RemoteDevice::from)
            .filter(|d| seen.insert(d.id.clone()))
            .collect())
    }

    /// The device that has `hardware_id` among its hardware ids, if there is one.
    ///
    /// # Errors
    /// Any failure of the list request.
    pub async fn find_by_hardware_id(
        &self,
        hardware_id: &str,
    ) -> Result<Option<RemoteDevice>, CloudError> {
        let filter = DeviceFilter {
            hardware_id: Some(hardware_id.to_owned()),
            ..DeviceFilter::default()
        };
        Ok(self
            .list_devices(&filter)
            .await?
            .into_iter()
            .find(|d| d.hardware_ids.iter().any(|h| h == hardware_id)))
    }

    /// One device by its Golioth id; `None` if there is no such device (404).
    ///
    /// # Errors
    /// Any failure other than 404.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<RemoteDevice>, CloudError> {
        let rb = self.request(Method::GET, GET_DEVICE, &["devices", id.as_str()], &[])?;
        match self.send(GET_DEVICE, rb).await {
            Ok(body) => Ok(Some(Self::data::<wire::Device>(GET_DEVICE, &body)?.into())),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a device. Not idempotent: a retry after a lost answer makes a 409 (names are
    /// unique) — use [`Golioth::register`] for devices known by hardware id.
    ///
    /// # Errors
    /// Any failure; a taken name or hardware id is a 409 (`ALREADY_EXISTS`).
    pub async fn create_device(&self, device: &NewDevice) -> Result<RemoteDevice, CloudError> {
        let tag_ids = mapping::tag_strings(&device.tag_ids);
        let body = wire::CreateDevice {
            name: &device.name,
            hardware_ids: &device.hardware_ids,
            tag_ids: &tag_ids,
        };
        let rb = self
            .request(Method::POST, CREATE_DEVICE, &["devices"], &[])?
            .json(&body);
        let answer = self.send(CREATE_DEVICE, rb).await?;
        Ok(Self::data::<wire::Device>(CREATE_DEVICE, &answer)?.into())
    }

    /// Finds the device by hardware id, else creates it, and if the create loses a race (409)
    /// finds it again. Safe to repeat after a crash between the create and the local commit:
    /// the second run finds what the first one created instead of making a duplicate.
    ///
    /// # Errors
    /// Any failure; a 409 for which no device with this hardware id exists (another device
    /// already has the name) is returned as it came.
    pub async fn register(
        &self,
        hardware_id: &str,
        name: &str,
        tag_ids: &[TagId],
    ) -> Result<RemoteDevice, CloudError> {
        if let Some(found) = self.find_by_hardware_id(hardware_id).await? {
            return Ok(found);
        }
        let new = NewDevice {
            name: name.to_owned(),
            hardware_ids: vec![hardware_id.to_owned()],
            tag_ids: tag_ids.to_vec(),
        };
        match self.create_device(&new).await {
            Ok(created) => Ok(created),
            Err(e) if is_already_exists(&e) => match self.find_by_hardware_id(hardware_id).await? {
                Some(found) => Ok(found),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Changes the fields set in `patch`; returns the device as Golioth now holds it.
    ///
    /// # Errors
    /// Any failure; a device that no longer exists is a 404.
    pub async fn patch_device(
        &self,
        id: &DeviceId,
        patch: &DevicePatch,
    ) -> Result<RemoteDevice, CloudError> {
        let tag_ids = patch.tag_ids.as_deref().map(mapping::tag_strings);
        let body = wire::UpdateDevice {
            name: patch.name.as_deref(),
            hardware_ids: patch.hardware_ids.as_deref(),
            tag_ids: tag_ids.as_deref(),
            enabled: patch.enabled,
        };
        let rb = self
            .request(Method::PATCH, PATCH_DEVICE, &["devices", id.as_str()], &[])?
            .json(&body);
        let answer = self.send(PATCH_DEVICE, rb).await?;
        Ok(Self::data::<wire::Device>(PATCH_DEVICE, &answer)?.into())
    }

    /// Deletes a device and all its data. Returns `false` if it was already gone (404), so
    /// that a retried delete succeeds.
    ///
    /// # Errors
    /// Any failure other than 404.
    pub async fn delete_device(&self, id: &DeviceId) -> Result<bool, CloudError> {
        let rb = self.request(
            Method::DELETE,
            DELETE_DEVICE,
            &["devices", id.as_str()],
            &[],
        )?;
        match self.send(DELETE_DEVICE, rb).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every tag of the project.
    ///
    /// # Errors
    /// The first failed page.
    pub async fn list_tags(&self) -> Result<Vec<Tag>, CloudError> {
        let tags: Vec<wire::Tag> = self.list_all(LIST_TAGS, &["tags"], &[]).await?;
        Ok(tags.into_iter().map(Tag::from).collect())
    }

    /// Creates a tag.
    ///
    /// # Errors
    /// Any failure; an existing name is a 409.
    pub async fn create_tag(&self, name: &str) -> Result<Tag, CloudError> {
        let rb = self
            .request(Method::POST, CREATE_TAG, &["tags"], &[])?
            .json(&wire::CreateTag { name });
        let answer = self.send(CREATE_TAG, rb).await?;
        Ok(Self::data::<wire::Tag>(CREATE_TAG, &answer)?.into())
    }

    /// The ids of the tags named `names`, in the same order, creating those that do not exist
    /// (a create that loses a race to another writer finds the winner's tag).
    ///
    /// # Errors
    /// Any failure of the list or of a create.
    pub async fn resolve_tags(&self, names: &[String]) -> Result<Vec<TagId>, CloudError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut known: HashMap<String, TagId> = self
            .list_tags()
            .await?
            .into_iter()
            .map(|t| (t.name, t.id))
            .collect();
        for name in names {
            if known.contains_key(name) {
                continue;
            }
            match self.create_tag(name).await {
                Ok(tag) => {
                    known.insert(name.clone(), tag.id);
                }
                Err(e) if is_already_exists(&e) => {
                    let tag = self
                        .list_tags()
                        .await?
                        .into_iter()
                        .find(|t| t.name == *name);
                    match tag {
                        Some(tag) => known.insert(name.clone(), tag.id),
                        None => return Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        Ok(names.iter().filter_map(|n| known.get(n).cloned()).collect())
    }

    /// The LightDB State document at `path` (e.g. `desired`, `gw/state`); `None` when nothing
    /// is stored there (a `null` document, or a 404).
    ///
    /// # Errors
    /// Any other failure; a path with an empty segment is refused before sending.
    pub async fn get_state(&self, id: &DeviceId, path: &str) -> Result<Option<Value>, CloudError> {
        let segments = state_segments(GET_STATE, id, path)?;
        let rb = self.request(Method::GET, GET_STATE, &segments, &[])?;
        match self.send(GET_STATE, rb).await {
            Ok(body) => Ok(cloud::decode::<wire::Data<Value>>(T, GET_STATE, &body)?
                .data
                .filter(|v| !v.is_null())),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets the LightDB State document at `path` to `value` (PUT: the value at that path is
    /// replaced; the rest of the device's tree is untouched).
    ///
    /// # Errors
    /// Any failure.
    pub async fn put_state(
        &self,
        id: &DeviceId,
        path: &str,
        value: &Value,
    ) -> Result<(), CloudError> {
        let segments = state_segments(PUT_STATE, id, path)?;
        let rb = self
            .request(Method::PUT, PUT_STATE, &segments, &[])?
            .json(value);
        self.send(PUT_STATE, rb).await.map(drop)
    }

    /// Removes the document at `path`. Already absent (404) counts as done.
    ///
    /// # Errors
    /// Any other failure.
    pub async fn delete_state(&self, id: &DeviceId, path: &str) -> Result<(), CloudError> {
        let segments = state_segments(DELETE_STATE, id, path)?;
        let rb = self.request(Method::DELETE, DELETE_STATE, &segments, &[])?;
        match self.send(DELETE_STATE, rb).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Golioth says "exists" with HTTP 409 and gRPC `ALREADY_EXISTS`.
fn is_already_exists(e: &CloudError) -> bool {
    e.status() == Some(409) || e.code() == Some("ALREADY_EXISTS")
}

/// `devices/{id}/data/<path segments>`: each segment encoded on its own, so the path keeps
/// its levels and nothing in it can reach the query.
fn state_segments<'a>(
    name: &str,
    id: &'a DeviceId,
    path: &'a str,
) -> Result<Vec<&'a str>, CloudError> {
    if path.is_empty() || path.split('/').any(str::is_empty) {
        return Err(CloudError::request(
            T,
            name,
            format!("LightDB path {path:?} has an empty segment"),
        ));
    }
    let mut segments = vec!["devices", id.as_str(), "data"];
    segments.extend(path.split('/'));
    Ok(segments)
}

#[cfg(test)]
mod tests;
