//! A fake Golioth Management API: devices, tags and LightDB State of one project, under
//! `/v1/projects/{projectId}/`, with the envelopes of the OpenAPI contract:
//! one object `{"data": …}`, a list `{"list": […], "page", "perPage", "total"}`, a delete `{}`,
//! an error `{"code": <gRPC code>, "message", "details": []}`. Every success is 200 (creates
//! too: the API is grpc-gateway). The key goes in `x-api-key`.
//!
//! Decisions where the contract is silent (see the module's tests for each):
//! - lists are in creation order; `perPage` 0 or absent means 100, above 100 or negative is
//!   400; a page past the end is an empty list with the true `total`;
//! - `tags` (list filter) repeats: `tags=a&tags=b`, all must be on the device;
//! - request bodies take camelCase or proto snake_case names and ignore unknown fields, as
//!   protojson does; `metadata.lastReport` / `lastSeenOnline` are absent until [`touch`]ed;
//! - LightDB State: `PUT` replaces the value at the path, `POST` and `PATCH` merge objects
//!   into it recursively (other values replace); either way siblings of the path are kept.
//!   `GET` of a path with nothing there is 200 `{"data": null}`; a write answers `{}`.
//!
//! [`touch`]: FakeGolioth::touch

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::faults::Faults;
use super::server::{Api, Request, Response, Server};

/// The key a fake accepts until [`FakeGolioth::set_key`].
pub const DEFAULT_KEY: &str = "golioth-test-key";
/// The project of [`FakeGolioth::start`].
pub const DEFAULT_PROJECT: &str = "nn-test";

const MAX_PER_PAGE: i64 = 100;

mod project;

use project::*;

#[derive(Debug)]
struct Golioth {
    project: String,
    state: Mutex<Project>,
}

/// A running fake Golioth. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeGolioth {
    server: Server,
    faults: Faults,
    api: Arc<Golioth>,
}

impl Golioth {
    fn lock(&self) -> MutexGuard<'_, Project> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn route(&self, req: &Request) -> Result<Value, Failed> {
        let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        let rest = match segs.as_slice() {
            ["v1", "projects", project, rest @ ..] if *project == self.project => rest,
            ["v1", "projects", _, ..] => {
                return Err((
                    403,
                    "the API key does not give access to this project".into(),
                ));
            }
            _ => return Err((404, "Not Found".into())),
        };
        let method = req.method.as_str();
        let mut p = self.lock();
        match (method, rest) {
            ("GET", ["devices"]) => p.list_devices(&req.query_pairs()),
            ("POST", ["devices"]) => {
                Ok(json!({"data": p.create_device(&object(&req.body)?)?.json(None)}))
            }
            ("GET", ["devices", id]) => Ok(json!({"data": p.device(id)?.json(None)})),
            ("PATCH" | "PUT", ["devices", id]) => {
                Ok(json!({"data": p.update_device(id, &object(&req.body)?)?.json(None)}))
            }
            ("DELETE", ["devices", id]) => {
                p.device(id)?;
                p.devices.retain(|d| d.id != *id);
                p.changed();
                Ok(json!({}))
            }
            (_, ["devices", id, "data", path @ ..]) if !path.is_empty() => {
                let segs: Vec<String> = path
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| (*s).to_owned())
                    .collect();
                let d = p.device_mut(id)?;
                match method {
                    "GET" => {
                        Ok(json!({"data": get_at(&d.state, &segs).cloned().unwrap_or(Value::Null)}))
                    }
                    "DELETE" => {
                        delete_at(&mut d.state, &segs);
                        Ok(json!({}))
                    }
                    "PUT" | "POST" | "PATCH" => {
                        let value: Value = serde_json::from_slice(&req.body)
                            .map_err(|e| bad(format!("invalid JSON body: {e}")))?;
                        if method == "PUT" {
                            *slot(&mut d.state, &segs) = value;
                        } else {
                            merge(slot(&mut d.state, &segs), value);
                        }
                        Ok(json!({}))
                    }
                    _ => Err((405, "Method Not Allowed".into())),
                }
            }
            ("GET", ["tags"]) => {
                let pairs = req.query_pairs();
                let (page, per_page) = paging(&pairs)?;
                let name = pairs
                    .iter()
                    .find(|(k, _)| k == "tagName")
                    .map(|(_, v)| v.clone());
                let ids: Vec<&str> = pairs
                    .iter()
                    .filter(|(k, _)| k == "ids")
                    .map(|(_, v)| v.as_str())
                    .collect();
                let items = p
                    .tags
                    .iter()
                    .filter(|t| name.as_ref().is_none_or(|n| &t.name == n))
                    .filter(|t| ids.is_empty() || ids.contains(&t.id.as_str()))
                    .map(Tag::json)
                    .collect();
                Ok(list_envelope(items, page, per_page))
            }
            ("POST", ["tags"]) => Ok(json!({"data": p.create_tag(&object(&req.body)?)?.json()})),
            ("GET", ["tags", id]) => Ok(json!({"data": p.tag_mut(id)?.json()})),
            ("PATCH" | "PUT", ["tags", id]) => {
                let body = object(&req.body)?;
                let name = string(&body, "name", "name")?;
                if let Some(n) = &name
                    && p.tags.iter().any(|t| &t.name == n && t.id != *id)
                {
                    return Err((409, format!("tag with name \"{n}\" already exists")));
                }
                let t = p.tag_mut(id)?;
                if let Some(n) = name {
                    t.name = n;
                }
                t.updated_at = OffsetDateTime::now_utc();
                Ok(json!({"data": t.json()}))
            }
            ("DELETE", ["tags", id]) => {
                p.tag_mut(id)?;
                p.tags.retain(|t| t.id != *id);
                for d in &mut p.devices {
                    d.tag_ids.retain(|t| t != id);
                }
                Ok(json!({}))
            }
            (_, ["devices"] | ["devices", _] | ["tags"] | ["tags", _]) => {
                Err((405, "Method Not Allowed".into()))
            }
            _ => Err((404, "Not Found".into())),
        }
    }
}

impl Api for Golioth {
    fn check_key(&self, req: &Request, key: &str) -> Result<(), Response> {
        match req.header("x-api-key") {
            Some(k) if k == key => Ok(()),
            Some(_) => Err(error_response(401, "invalid API key")),
            None => Err(error_response(401, "missing API key (x-api-key header)")),
        }
    }

    fn error(&self, status: u16, message: &str) -> Response {
        error_response(status, message)
    }

    fn handle(&self, req: &Request) -> Response {
        match self.route(req) {
            Ok(body) => Response::json(200, &body),
            Err((status, message)) => error_response(status, &message),
        }
    }
}

impl FakeGolioth {
    /// A fake for project [`DEFAULT_PROJECT`] that accepts [`DEFAULT_KEY`].
    pub async fn start() -> FakeGolioth {
        FakeGolioth::start_with(DEFAULT_PROJECT, DEFAULT_KEY).await
    }

    pub async fn start_with(project: &str, key: &str) -> FakeGolioth {
        let faults = Faults::new(key);
        let api = Arc::new(Golioth {
            project: project.to_owned(),
            state: Mutex::new(Project::default()),
        });
        let server = Server::start(api.clone(), faults.clone()).await;
        FakeGolioth {
            server,
            faults,
            api,
        }
    }

    /// The base URL, `http://127.0.0.1:PORT` (the API paths start with `/v1/`).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn project(&self) -> &str {
        &self.api.project
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Replaces the valid key: requests with the old one get 401 from now on.
    pub fn set_key(&self, key: &str) {
        self.faults.set_key(key);
    }

    /// Every device as the API shows it (without `data`), in creation order.
    pub fn devices(&self) -> Vec<Value> {
        self.api
            .lock()
            .devices
            .iter()
            .map(|d| d.json(None))
            .collect()
    }

    pub fn device_count(&self) -> usize {
        self.api.lock().devices.len()
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        self.api.lock().device(id).ok().map(|d| d.json(None))
    }

    pub fn device_by_hardware_id(&self, hardware_id: &str) -> Option<Value> {
        let p = self.api.lock();
        p.devices
            .iter()
            .find(|d| d.hardware_ids.iter().any(|h| h == hardware_id))
            .map(|d| d.json(None))
    }

    pub fn device_by_name(&self, name: &str) -> Option<Value> {
        let p = self.api.lock();
        p.devices
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.json(None))
    }

    /// Creates a device as the console would; returns its id. Panics on a duplicate.
    pub fn create_device(&self, name: &str, hardware_ids: &[&str]) -> String {
        let body = json!({"name": name, "hardwareIds": hardware_ids});
        let mut p = self.api.lock();
        let d = p
            .create_device(body.as_object().expect("an object"))
            .unwrap_or_else(|e| panic!("create_device({name}): {e:?}"));
        d.id.clone()
    }

    /// Edits a device as another writer would, with PATCH semantics (`name`, `tagIds`,
    /// `addTagId`, `enabled`, ...); bumps `updatedAt`. Panics on an invalid update.
    pub fn update_device(&self, id: &str, patch: Value) -> Value {
        let mut p = self.api.lock();
        let body = patch.as_object().expect("a JSON object").clone();
        p.update_device(id, &body)
            .unwrap_or_else(|e| panic!("update_device({id}): {e:?}"))
            .json(None)
    }

    pub fn delete_device(&self, id: &str) {
        let mut p = self.api.lock();
        p.devices.retain(|d| d.id != id);
        p.changed();
    }

    /// Creates a tag; returns its id. Panics on a duplicate name.
    pub fn create_tag(&self, name: &str) -> String {
        let body = json!({"name": name});
        let mut p = self.api.lock();
        let t = p
            .create_tag(body.as_object().expect("an object"))
            .unwrap_or_else(|e| panic!("create_tag({name}): {e:?}"));
        t.id.clone()
    }

    pub fn tags(&self) -> Vec<Value> {
        self.api.lock().tags.iter().map(Tag::json).collect()
    }

    pub fn tag_id(&self, name: &str) -> Option<String> {
        let p = self.api.lock();
        p.tags.iter().find(|t| t.name == name).map(|t| t.id.clone())
    }

    /// The LightDB State of a device at `path` (`""` for the whole tree).
    pub fn state(&self, device_id: &str, path: &str) -> Option<Value> {
        let p = self.api.lock();
        let d = p.device(device_id).ok()?;
        get_at(&d.state, &segments(path)).cloned()
    }

    /// Writes LightDB State as the device (or the console) would: replaces the value at `path`.
    pub fn set_state(&self, device_id: &str, path: &str, value: Value) {
        let mut p = self.api.lock();
        let d = p
            .device_mut(device_id)
            .unwrap_or_else(|e| panic!("set_state: {e:?}"));
        *slot(&mut d.state, &segments(path)) = value;
    }

    /// The device reports now: sets `metadata.lastReport` and `metadata.lastSeenOnline`.
    pub fn touch(&self, device_id: &str) {
        self.touch_at(device_id, OffsetDateTime::now_utc());
    }

    pub fn touch_at(&self, device_id: &str, at: OffsetDateTime) {
        let mut p = self.api.lock();
        let d = p
            .device_mut(device_id)
            .unwrap_or_else(|e| panic!("touch: {e:?}"));
        d.last_report = Some(at);
        d.last_seen_online = Some(at);
    }
}
