//! The fake Golioth's project in memory: devices, tags, LightDB State trees, and the
//! operations the API offers on them (paging, filters, merges), with their errors.

use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::super::rfc3339;
use super::super::server::Response;
use super::MAX_PER_PAGE;

#[derive(Clone, Debug)]
pub(super) struct Device {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) hardware_ids: Vec<String>,
    pub(super) tag_ids: Vec<String>,
    pub(super) enabled: bool,
    pub(super) blueprint_id: String,
    pub(super) cohort_id: String,
    pub(super) created_at: OffsetDateTime,
    pub(super) updated_at: OffsetDateTime,
    pub(super) last_report: Option<OffsetDateTime>,
    pub(super) last_seen_online: Option<OffsetDateTime>,
    /// The LightDB State tree (an object at the root).
    pub(super) state: Value,
}

#[derive(Clone, Debug)]
pub(super) struct Tag {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) created_at: OffsetDateTime,
    pub(super) updated_at: OffsetDateTime,
}

/// A Golioth error: HTTP status and message (the gRPC code follows from the status).
pub(super) type Failed = (u16, String);

#[derive(Debug, Default)]
pub(super) struct Project {
    pub(super) devices: Vec<Device>,
    pub(super) tags: Vec<Tag>,
    /// Where each device is in `devices`; `None` after anything but a create changed the list
    /// (rebuilt on the next lookup), so lookups in a large project cost no scan.
    pub(super) lookup: RefCell<Option<Lookup>>,
}

/// Positions in [`Project::devices`] by id, name and hardware id.
#[derive(Debug, Default)]
pub(super) struct Lookup {
    pub(super) by_id: HashMap<String, usize>,
    pub(super) by_name: HashMap<String, usize>,
    pub(super) by_hw: HashMap<String, usize>,
}

impl Lookup {
    pub(super) fn add(&mut self, i: usize, d: &Device) {
        self.by_id.insert(d.id.clone(), i);
        self.by_name.insert(d.name.clone(), i);
        for h in &d.hardware_ids {
            self.by_hw.insert(h.clone(), i);
        }
    }
}

/// A 24-hex-digit id like Golioth's (a MongoDB ObjectId).
pub(super) fn object_id() -> String {
    let secs = OffsetDateTime::now_utc().unix_timestamp() as u32;
    format!("{secs:08x}{:016x}", fastrand::u64(..))
}

/// The gRPC code grpc-gateway maps to this HTTP status.
pub(super) fn grpc_code(status: u16) -> i32 {
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

pub(super) fn error_response(status: u16, message: &str) -> Response {
    Response::json(
        status,
        &json!({"code": grpc_code(status), "message": message, "details": []}),
    )
}

pub(super) fn bad(message: impl Into<String>) -> Failed {
    (400, message.into())
}

/// LightDB path segments; leading, trailing and doubled slashes are ignored.
pub(super) fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(super) fn get_at<'a>(root: &'a Value, segs: &[String]) -> Option<&'a Value> {
    segs.iter().try_fold(root, |v, s| v.get(s.as_str()))
}

/// The value at `segs`, creating objects on the way (a non-object on the way is replaced).
pub(super) fn slot<'a>(root: &'a mut Value, segs: &[String]) -> &'a mut Value {
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
pub(super) fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

pub(super) fn delete_at(root: &mut Value, segs: &[String]) {
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
pub(super) fn field<'a>(
    body: &'a Map<String, Value>,
    camel: &str,
    snake: &str,
) -> Option<&'a Value> {
    body.get(camel).or_else(|| body.get(snake))
}

pub(super) fn strings(
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

pub(super) fn string(
    body: &Map<String, Value>,
    camel: &str,
    snake: &str,
) -> Result<Option<String>, Failed> {
    match field(body, camel, snake) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("{camel}: expected a string"))),
    }
}

pub(super) fn object(body: &[u8]) -> Result<Map<String, Value>, Failed> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("request body must be a JSON object")),
        Err(e) => Err(bad(format!("invalid JSON body: {e}"))),
    }
}

impl Device {
    pub(super) fn json(&self, state_path: Option<&[String]>) -> Value {
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
    pub(super) fn json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "createdAt": rfc3339(self.created_at),
            "updatedAt": rfc3339(self.updated_at),
        })
    }
}

/// `page`/`perPage` of a list request: 0-based page, 1–100 per page, 0 or absent meaning 100.
pub(super) fn paging(pairs: &[(String, String)]) -> Result<(i64, i64), Failed> {
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

pub(super) fn list_envelope(items: Vec<Value>, page: i64, per_page: i64) -> Value {
    let total = items.len();
    let list: Vec<Value> = items
        .into_iter()
        .skip((page * per_page) as usize)
        .take(per_page as usize)
        .collect();
    json!({"list": list, "page": page, "perPage": per_page, "total": total})
}

impl Project {
    pub(super) fn with_lookup<R>(&self, f: impl FnOnce(&Lookup) -> R) -> R {
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
    pub(super) fn changed(&mut self) {
        *self.lookup.get_mut() = None;
    }

    pub(super) fn position(&self, id: &str) -> Result<usize, Failed> {
        self.with_lookup(|l| l.by_id.get(id).copied())
            .ok_or_else(|| (404, format!("device {id} not found")))
    }

    pub(super) fn device(&self, id: &str) -> Result<&Device, Failed> {
        Ok(&self.devices[self.position(id)?])
    }

    pub(super) fn device_mut(&mut self, id: &str) -> Result<&mut Device, Failed> {
        let i = self.position(id)?;
        Ok(&mut self.devices[i])
    }

    pub(super) fn check_unique(
        &self,
        except: Option<&str>,
        name: &str,
        hw: &[String],
    ) -> Result<(), Failed> {
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

    pub(super) fn check_tags(&self, tag_ids: &[String]) -> Result<(), Failed> {
        match tag_ids
            .iter()
            .find(|t| !self.tags.iter().any(|x| &x.id == *t))
        {
            Some(t) => Err(bad(format!("tag {t} does not exist"))),
            None => Ok(()),
        }
    }

    pub(super) fn create_device(&mut self, body: &Map<String, Value>) -> Result<&Device, Failed> {
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
    pub(super) fn update_device(
        &mut self,
        id: &str,
        body: &Map<String, Value>,
    ) -> Result<&Device, Failed> {
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

    pub(super) fn list_devices(&self, pairs: &[(String, String)]) -> Result<Value, Failed> {
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
        let matched: Vec<&Device> = found
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
            .collect();
        // Only the page asked for is rendered: a full list costs pages × page, not pages × all.
        let total = matched.len();
        let list: Vec<Value> = matched
            .into_iter()
            .skip((page * per_page) as usize)
            .take(per_page as usize)
            .map(|d| d.json(state_path.as_deref()))
            .collect();
        Ok(json!({"list": list, "page": page, "perPage": per_page, "total": total}))
    }

    pub(super) fn create_tag(&mut self, body: &Map<String, Value>) -> Result<&Tag, Failed> {
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

    pub(super) fn tag_mut(&mut self, id: &str) -> Result<&mut Tag, Failed> {
        self.tags
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| (404, format!("tag {id} not found")))
    }
}
