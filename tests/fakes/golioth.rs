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

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::faults::Faults;
use super::rfc3339;
use super::server::{Api, Request, Response, Server};

/// The key a fake accepts until [`FakeGolioth::set_key`].
pub const DEFAULT_KEY: &str = "golioth-test-key";
/// The project of [`FakeGolioth::start`].
pub const DEFAULT_PROJECT: &str = "nn-test";

const MAX_PER_PAGE: i64 = 100;

#[derive(Clone, Debug)]
struct Device {
    id: String,
    name: String,
    hardware_ids: Vec<String>,
    tag_ids: Vec<String>,
    enabled: bool,
    blueprint_id: String,
    cohort_id: String,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    last_report: Option<OffsetDateTime>,
    last_seen_online: Option<OffsetDateTime>,
    /// The LightDB State tree (an object at the root).
    state: Value,
}

#[derive(Clone, Debug)]
struct Tag {
    id: String,
    name: String,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

/// A Golioth error: HTTP status and message (the gRPC code follows from the status).
type Failed = (u16, String);

#[derive(Debug, Default)]
struct Project {
    devices: Vec<Device>,
    tags: Vec<Tag>,
    /// Where each device is in `devices`; `None` after anything but a create changed the list
    /// (rebuilt on the next lookup), so lookups in a large project cost no scan.
    lookup: RefCell<Option<Lookup>>,
}

/// Positions in [`Project::devices`] by id, name and hardware id.
#[derive(Debug, Default)]
struct Lookup {
    by_id: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    by_hw: HashMap<String, usize>,
}

impl Lookup {
    fn add(&mut self, i: usize, d: &Device) {
        self.by_id.insert(d.id.clone(), i);
        self.by_name.insert(d.name.clone(), i);
        for h in &d.hardware_ids {
            self.by_hw.insert(h.clone(), i);
        }
    }
}

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

/// A 24-hex-digit id like Golioth's (a MongoDB ObjectId).
fn object_id() -> String {
    let secs = OffsetDateTime::now_utc().unix_timestamp() as u32;
    format!("{secs:08x}{:016x}", fastrand::u64(..))
}

/// The gRPC code grpc-gateway maps to this HTTP status.
fn grpc_code(status: u16) -> i32 {
    match status {
        400 => 3,  // INVALID_ARGUMENT
        401 => 16, // UNAUTHENTICATED
        403 => 7,  // PERMISSION_DENIED
        404 => 5,  // NOT_FOUND
        405 | 501 => 12,
        408 | 504 => 4, // DEADLINE_EXCEEDED
        409 => 6,       // ALREADY_EXISTS
        429 => 8,       // RESOURCE_EXHAUSTED
        500 => 13,      // INTERNAL
        503 => 14,      // UNAVAILABLE
        _ => 2,         // UNKNOWN
    }
}

fn error_response(status: u16, message: &str) -> Response {
    Response::json(
        status,
        &json!({"code": grpc_code(status), "message": message, "details": []}),
    )
}

fn bad(message: impl Into<String>) -> Failed {
    (400, message.into())
}

/// LightDB path segments; leading, trailing and doubled slashes are ignored.
fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn get_at<'a>(root: &'a Value, segs: &[String]) -> Option<&'a Value> {
    segs.iter().try_fold(root, |v, s| v.get(s.as_str()))
}

/// The value at `segs`, creating objects on the way (a non-object on the way is replaced).
fn slot<'a>(root: &'a mut Value, segs: &[String]) -> &'a mut Value {
    let mut v = root;
    for s in segs {
        if !v.is_object() {
            *v = Value::Object(Map::new());
        }
        v = v
            .as_object_mut()
            .expect("an object")
            .entry(s.clone())
            .or_insert(Value::Null);
    }
    v
}

/// Objects merge key by key, recursively; anything else replaces.
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

fn delete_at(root: &mut Value, segs: &[String]) {
    let Some((last, parents)) = segs.split_last() else {
        *root = Value::Object(Map::new());
        return;
    };
    let mut v = root;
    for s in parents {
        match v.get_mut(s.as_str()) {
            Some(next) => v = next,
            None => return,
        }
    }
    if let Some(obj) = v.as_object_mut() {
        obj.remove(last);
    }
}

/// A body field by its JSON (camelCase) or proto (snake_case) name.
fn field<'a>(body: &'a Map<String, Value>, camel: &str, snake: &str) -> Option<&'a Value> {
    body.get(camel).or_else(|| body.get(snake))
}

fn strings(
    body: &Map<String, Value>,
    camel: &str,
    snake: &str,
) -> Result<Option<Vec<String>>, Failed> {
    match field(body, camel, snake) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("{camel}: expected strings")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad(format!("{camel}: expected an array of strings"))),
    }
}

fn string(body: &Map<String, Value>, camel: &str, snake: &str) -> Result<Option<String>, Failed> {
    match field(body, camel, snake) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{camel}: expected a string"))),
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, Failed> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("request body must be a JSON object")),
        Err(e) => Err(bad(format!("invalid JSON body: {e}"))),
    }
}

impl Device {
    fn json(&self, state_path: Option<&[String]>) -> Value {
        let mut metadata = json!({"status": "-"});
        if let Some(t) = self.last_report {
            metadata["lastReport"] = rfc3339(t).into();
        }
        if let Some(t) = self.last_seen_online {
            metadata["lastSeenOnline"] = rfc3339(t).into();
        }
        let mut d = json!({
            "id": self.id,
            "name": self.name,
            "hardwareIds": self.hardware_ids,
            "tagIds": self.tag_ids,
            "enabled": self.enabled,
            "createdAt": rfc3339(self.created_at),
            "updatedAt": rfc3339(self.updated_at),
            "status": "-",
            "metadata": metadata,
        });
        if let Some(t) = self.last_report {
            d["lastReport"] = rfc3339(t).into();
        }
        if !self.blueprint_id.is_empty() {
            d["blueprintId"] = self.blueprint_id.clone().into();
        }
        if !self.cohort_id.is_empty() {
            d["cohortId"] = self.cohort_id.clone().into();
        }
        if let Some(segs) = state_path
            && let Some(v) = get_at(&self.state, segs)
        {
            d["data"] = v.clone();
        }
        d
    }
}

impl Tag {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "createdAt": rfc3339(self.created_at),
            "updatedAt": rfc3339(self.updated_at),
        })
    }
}

/// `page`/`perPage` of a list request: 0-based page, 1–100 per page, 0 or absent meaning 100.
fn paging(pairs: &[(String, String)]) -> Result<(i64, i64), Failed> {
    let int = |name: &str| -> Result<i64, Failed> {
        match pairs.iter().rev().find(|(k, _)| k == name) {
            None => Ok(0),
            Some((_, v)) => v
                .parse::<i64>()
                .map_err(|e| bad(format!("type mismatch, parameter: {name}, error: {e}"))),
        }
    };
    let page = int("page")?;
    let per_page = match int("perPage")? {
        0 => MAX_PER_PAGE,
        n if (1..=MAX_PER_PAGE).contains(&n) => n,
        n => return Err(bad(format!("perPage must be between 1 and 100, got {n}"))),
    };
    if page < 0 {
        return Err(bad(format!("page must not be negative, got {page}")));
    }
    Ok((page, per_page))
}

fn list_envelope(items: Vec<Value>, page: i64, per_page: i64) -> Value {
    let total = items.len();
    let list: Vec<Value> = items
        .into_iter()
        .skip((page * per_page) as usize)
        .take(per_page as usize)
        .collect();
    json!({"list": list, "page": page, "perPage": per_page, "total": total})
}

impl Project {
    fn with_lookup<R>(&self, f: impl FnOnce(&Lookup) -> R) -> R {
        let mut slot = self.lookup.borrow_mut();
        let lookup = slot.get_or_insert_with(|| {
            let mut l = Lookup::default();
            for (i, d) in self.devices.iter().enumerate() {
                l.add(i, d);
            }
            l
        });
        f(lookup)
    }

    /// The device list changed other than by a create.
    fn changed(&mut self) {
        *self.lookup.get_mut() = None;
    }

    fn position(&self, id: &str) -> Result<usize, Failed> {
        self.with_lookup(|l| l.by_id.get(id).copied())
            .ok_or_else(|| (404, format!("device {id} not found")))
    }

    fn device(&self, id: &str) -> Result<&Device, Failed> {
        Ok(&self.devices[self.position(id)?])
    }

    fn device_mut(&mut self, id: &str) -> Result<&mut Device, Failed> {
        let i = self.position(id)?;
        Ok(&mut self.devices[i])
    }

    fn check_unique(&self, except: Option<&str>, name: &str, hw: &[String]) -> Result<(), Failed> {
        let other =
            |i: Option<&usize>| i.is_some_and(|i| Some(self.devices[*i].id.as_str()) != except);
        self.with_lookup(|l| {
            if other(l.by_name.get(name)) {
                return Err((409, format!("device with name \"{name}\" already exists")));
            }
            if let Some(h) = hw.iter().find(|h| other(l.by_hw.get(h.as_str()))) {
                return Err((409, format!("hardware ID \"{h}\" already exists")));
            }
            Ok(())
        })
    }

    fn check_tags(&self, tag_ids: &[String]) -> Result<(), Failed> {
        match tag_ids
            .iter()
            .find(|t| !self.tags.iter().any(|x| &x.id == *t))
        {
            Some(t) => Err(bad(format!("tag {t} does not exist"))),
            None => Ok(()),
        }
    }

    fn create_device(&mut self, body: &Map<String, Value>) -> Result<&Device, Failed> {
        let name = string(body, "name", "name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("name is required"))?;
        let hardware_ids = strings(body, "hardwareIds", "hardware_ids")?
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| vec![object_id()]);
        let tag_ids = strings(body, "tagIds", "tag_ids")?.unwrap_or_default();
        self.check_unique(None, &name, &hardware_ids)?;
        self.check_tags(&tag_ids)?;
        let now = OffsetDateTime::now_utc();
        self.devices.push(Device {
            id: object_id(),
            name,
            hardware_ids,
            tag_ids,
            enabled: true,
            blueprint_id: string(body, "blueprintId", "blueprint_id")?.unwrap_or_default(),
            cohort_id: string(body, "cohortId", "cohort_id")?.unwrap_or_default(),
            created_at: now,
            updated_at: now,
            last_report: None,
            last_seen_online: None,
            state: Value::Object(Map::new()),
        });
        let i = self.devices.len() - 1;
        if let Some(l) = self.lookup.get_mut() {
            l.add(i, &self.devices[i]);
        }
        Ok(&self.devices[i])
    }

    /// `goliothDeviceUpdate`: full lists replace; `add…`/`remove…` edit; absent fields stay.
    fn update_device(&mut self, id: &str, body: &Map<String, Value>) -> Result<&Device, Failed> {
        let mut d = self.device(id)?.clone();
        if let Some(name) = string(body, "name", "name")? {
            d.name = name;
        }
        if let Some(enabled) = field(body, "enabled", "enabled") {
            d.enabled = enabled
                .as_bool()
                .ok_or_else(|| bad("enabled: expected a boolean"))?;
        }
        if let Some(v) = string(body, "blueprintId", "blueprint_id")? {
            d.blueprint_id = v;
        }
        if let Some(v) = string(body, "cohortId", "cohort_id")? {
            d.cohort_id = v;
        }
        let edit = |list: &mut Vec<String>,
                    all: Option<Vec<String>>,
                    add: Option<Vec<String>>,
                    remove: Option<Vec<String>>| {
            if let Some(all) = all {
                *list = all;
            }
            for a in add.unwrap_or_default() {
                if !list.contains(&a) {
                    list.push(a);
                }
            }
            let remove = remove.unwrap_or_default();
            list.retain(|x| !remove.contains(x));
        };
        edit(
            &mut d.hardware_ids,
            strings(body, "hardwareIds", "hardware_ids")?,
            strings(body, "addHardwareId", "add_hardware_id")?,
            strings(body, "removeHardwareId", "remove_hardware_id")?,
        );
        edit(
            &mut d.tag_ids,
            strings(body, "tagIds", "tag_ids")?,
            strings(body, "addTagId", "add_tag_id")?,
            strings(body, "removeTagId", "remove_tag_id")?,
        );
        if d.name.is_empty() {
            return Err(bad("name must not be empty"));
        }
        self.check_unique(Some(id), &d.name, &d.hardware_ids)?;
        self.check_tags(&d.tag_ids)?;
        d.updated_at = OffsetDateTime::now_utc();
        let i = self.position(id)?;
        self.devices[i] = d;
        self.changed();
        Ok(&self.devices[i])
    }

    fn list_devices(&self, pairs: &[(String, String)]) -> Result<Value, Failed> {
        let (page, per_page) = paging(pairs)?;
        let one = |name: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let tags: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| k == "tags")
            .map(|(_, v)| v.as_str())
            .collect();
        let enabled = match one("enabled") {
            None => None,
            Some(v) => Some(
                v.parse::<bool>()
                    .map_err(|e| bad(format!("type mismatch, parameter: enabled, error: {e}")))?,
            ),
        };
        let state_path = one("statePath").map(segments);
        // Read once, not per device: a lookup in a large project stays cheap.
        let (hardware_id, name, term) = (one("hardwareId"), one("deviceName"), one("term"));
        let found: Vec<&Device> = match hardware_id {
            Some(h) => self
                .with_lookup(|l| l.by_hw.get(h).copied())
                .map(|i| &self.devices[i])
                .into_iter()
                .collect(),
            None => self.devices.iter().collect(),
        };
        let items = found
            .into_iter()
            .filter(|d| hardware_id.is_none_or(|h| d.hardware_ids.iter().any(|x| x == h)))
            .filter(|d| name.is_none_or(|n| d.name == n))
            .filter(|d| tags.iter().all(|t| d.tag_ids.iter().any(|x| x == t)))
            .filter(|d| enabled.is_none_or(|e| d.enabled == e))
            .filter(|d| {
                term.is_none_or(|t| {
                    d.name.contains(t) || d.hardware_ids.iter().any(|h| h.contains(t))
                })
            })
            .map(|d| d.json(state_path.as_deref()))
            .collect();
        Ok(list_envelope(items, page, per_page))
    }

    fn create_tag(&mut self, body: &Map<String, Value>) -> Result<&Tag, Failed> {
        let name = string(body, "name", "name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("name is required"))?;
        if self.tags.iter().any(|t| t.name == name) {
            return Err((409, format!("tag with name \"{name}\" already exists")));
        }
        let now = OffsetDateTime::now_utc();
        self.tags.push(Tag {
            id: object_id(),
            name,
            created_at: now,
            updated_at: now,
        });
        Ok(self.tags.last().expect("just pushed"))
    }

    fn tag_mut(&mut self, id: &str) -> Result<&mut Tag, Failed> {
        self.tags
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| (404, format!("tag {id} not found")))
    }
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
