//! Golioth as a spoke of the reconciliation: its devices and their desired documents read in
//! the device list's pages (`statePath` fills each device's `data`), and the writes that carry
//! the mirror's changes back (one PATCH for metadata, one PUT of the desired document, a
//! DELETE per removed desired field).
//!
//! Golioth's view of a device: `name`, its tags by name, `enabled`, and the LightDB State
//! document at `golioth.desired_path`. Golioth reads are complete (every device, every page),
//! so a linked device missing from them was removed there.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Value, json};

use super::{Pull, RemoteDoc};
use crate::cloud::CloudError;
use crate::cloud::golioth::{DeviceFilter, DeviceId, DevicePatch, Golioth, TagId};
use crate::model::Target;
use crate::reconcile::{self, Fields};

pub struct GoliothSpoke {
    pub client: Golioth,
    pub desired_path: String,
    /// Tag names → ids, as of the last read (new names are created on a push).
    tags: Mutex<HashMap<String, TagId>>,
}

impl GoliothSpoke {
    pub fn new(client: Golioth, desired_path: String) -> GoliothSpoke {
        GoliothSpoke {
            client,
            desired_path,
            tags: Mutex::default(),
        }
    }

    /// Every device of the project with its desired document, and the tags.
    pub async fn pull(&self) -> Result<Pull, CloudError> {
        let tags = self.client.list_tags().await?;
        let names: HashMap<String, String> = tags
            .iter()
            .map(|t| (t.id.as_str().to_owned(), t.name.clone()))
            .collect();
        *self.tags.lock().unwrap_or_else(|p| p.into_inner()) =
            tags.into_iter().map(|t| (t.name, t.id)).collect();
        let filter = DeviceFilter {
            state_path: Some(self.desired_path.clone()),
            ..DeviceFilter::default()
        };
        let devices = self.client.list_devices(&filter).await?;
        let docs = devices.into_iter().map(|d| doc_of(d, &names)).collect();
        Ok(Pull {
            target: Some(Target::Golioth),
            docs,
            complete: true,
            ..Pull::default()
        })
    }

    /// Just these devices (by Golioth id), each with its desired document: what a webhook
    /// asks for. Not complete (a device it lacks is only not asked for); one that Golioth no
    /// longer has is left out, for the next full read to confirm.
    pub async fn pull_devices(&self, ids: &[String]) -> Result<Pull, CloudError> {
        let mut docs = Vec::new();
        for id in ids {
            let id = DeviceId(id.clone());
            let Some(mut device) = self.client.device(&id).await? else {
                continue;
            };
            device.state = self.client.get_state(&id, &self.desired_path).await?;
            let mut names = self.tag_names();
            if device
                .tag_ids
                .iter()
                .any(|t| !names.contains_key(t.as_str()))
            {
                let tags = self.client.list_tags().await?;
                *self.tags.lock().unwrap_or_else(|p| p.into_inner()) =
                    tags.into_iter().map(|t| (t.name, t.id)).collect();
                names = self.tag_names();
            }
            docs.push(doc_of(device, &names));
        }
        Ok(Pull {
            target: Some(Target::Golioth),
            docs,
            complete: false,
            ..Pull::default()
        })
    }

    /// Tag ids → names, as of the last read.
    fn tag_names(&self) -> HashMap<String, String> {
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, id)| (id.as_str().to_owned(), name.clone()))
            .collect()
    }

    /// Writes the pushed fields of one device: `after` is Golioth's whole document once
    /// they are applied.
    pub async fn push(
        &self,
        id: &str,
        after: &Fields,
        pushed: &[(String, Option<Value>)],
    ) -> Result<(), CloudError> {
        let id = DeviceId(id.to_owned());
        let mut patch = DevicePatch::default();
        let mut desired = false;
        for (field, value) in pushed {
            match field.as_str() {
                "/name" => patch.name = value.as_ref().and_then(Value::as_str).map(str::to_owned),
                "/enabled" => patch.enabled = value.as_ref().and_then(Value::as_bool),
                "/tags" => {
                    let names: Vec<String> = value
                        .as_ref()
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    patch.tag_ids = Some(self.tag_ids(&names).await?);
                }
                _ => desired = true,
            }
        }
        if !patch.is_empty() {
            self.client.patch_device(&id, &patch).await?;
        }
        if desired {
            let doc = reconcile::subtree(after, "/desired");
            let empty = doc.as_object().is_none_or(serde_json::Map::is_empty);
            if empty {
                self.client.delete_state(&id, &self.desired_path).await?;
            } else {
                self.client.put_state(&id, &self.desired_path, &doc).await?;
                // A PUT merges into what is there: a removed field needs its own DELETE.
                for (field, value) in pushed {
                    if value.is_none()
                        && let Some(sub) = field.strip_prefix("/desired/")
                    {
                        let path = format!("{}/{}", self.desired_path, unescape_path(sub));
                        self.client.delete_state(&id, &path).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn tag_ids(&self, names: &[String]) -> Result<Vec<TagId>, CloudError> {
        let known: Option<Vec<TagId>> = {
            let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
            names.iter().map(|n| tags.get(n).cloned()).collect()
        };
        if let Some(ids) = known {
            return Ok(ids);
        }
        let ids = self.client.resolve_tags(names).await?;
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        for (name, id) in names.iter().zip(&ids) {
            tags.insert(name.clone(), id.clone());
        }
        Ok(ids)
    }
}

/// A JSON Pointer below `/desired/` as a LightDB path (`~1` → `/` cannot be expressed there
/// and stays as it is; `~0` → `~`).
/// Golioth's device as the merge sees it (`names`: tag ids → names).
fn doc_of(d: crate::cloud::golioth::RemoteDevice, names: &HashMap<String, String>) -> RemoteDoc {
    let tags: Vec<&str> = d
        .tag_ids
        .iter()
        .map(|id| names.get(id.as_str()).map_or(id.as_str(), String::as_str))
        .collect();
    let fields = reconcile::flatten(&json!({
        "name": d.name,
        "tags": tags,
        "enabled": d.enabled,
        "desired": d.state,
    }));
    RemoteDoc {
        id: d.id.0,
        hardware_ids: d.hardware_ids,
        golioth_id: None,
        fields,
        remote_at: d.updated_at,
        version: None,
        extra: None,
        deleted: false,
    }
}

fn unescape_path(pointer: &str) -> String {
    pointer
        .split('/')
        .map(|seg| seg.replace("~0", "~"))
        .collect::<Vec<_>>()
        .join("/")
}
