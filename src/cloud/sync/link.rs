//! Pure steps of a run between the reads and the writes: linking what each cloud sent to the
//! mirror's devices, the spokes each device is merged with, and the commit a device's
//! settlement comes to.
//!
//! **Linking**, per cloud document, first match wins: the device already linked to that
//! cloud id; for NetNeural, the device linked to the Golioth id in `external_device_id`; the
//! device whose local key the identity template gives for one of the document's hardware ids.
//! A document matching none is imported (a mirror entry with origin golioth / netneural) when
//! its hardware id is one this site's template could have made; others belong to other sites
//! and are left alone. A device linked to a cloud that a complete read (Golioth) did not
//! return, or that NetNeural marks deleted, is marked removed there and kept, with its data.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::RemoteDoc;
use crate::cloud::uplink::Identity;
use crate::model::{DeviceKey, Origin, Target, UnixMillis};
use crate::reconcile::{self, Direction, Fields, Settled, Settlement};
use crate::store::sync::{DeviceCommit, Meta, NewConflict, RemoteCopy, SyncDevice};

/// What a cloud's read says about one mirror device.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The cloud's document this run, if it sent one.
    pub doc: Option<RemoteDoc>,
    /// The cloud's id, when it differs from the stored link.
    pub relink: Option<String>,
    /// Gone there (absent from a complete read, or deleted).
    pub removed: bool,
}

/// A device seen in a cloud that the mirror does not have.
#[derive(Clone, Debug)]
pub struct Import {
    pub key: DeviceKey,
    pub target: Target,
    pub remote_id: String,
}

/// The result of linking one cloud's read.
#[derive(Clone, Debug, Default)]
pub struct Linked {
    /// By index into the run's device list.
    pub seen: HashMap<usize, Seen>,
    pub imports: Vec<Import>,
}

/// Links one cloud's documents to `devices`.
pub fn link(
    target: Target,
    devices: &[SyncDevice],
    docs: &[RemoteDoc],
    complete: bool,
    identity: &Identity,
) -> Linked {
    let by_remote: HashMap<&str, usize> = devices
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.remote_id(target).map(|id| (id, i)))
        .collect();
    let by_golioth: HashMap<&str, usize> = devices
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.golioth_id.as_deref().map(|id| (id, i)))
        .collect();
    let by_key: HashMap<&str, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.key.as_str(), i))
        .collect();
    let mut out = Linked::default();
    let mut imported: HashMap<String, ()> = HashMap::new();
    // Documents already linked first, so a duplicate in the cloud never steals a link.
    let mut order: Vec<&RemoteDoc> = docs.iter().collect();
    order.sort_by_key(|d| !by_remote.contains_key(d.id.as_str()));
    for doc in order {
        let keys: Vec<DeviceKey> = doc
            .hardware_ids
            .iter()
            .filter_map(|hw| identity.key_of(hw))
            .collect();
        let found = by_remote
            .get(doc.id.as_str())
            .copied()
            .or_else(|| {
                (target == Target::NetNeural)
                    .then_some(doc.golioth_id.as_deref())
                    .flatten()
                    .and_then(|g| by_golioth.get(g).copied())
            })
            .or_else(|| keys.iter().find_map(|k| by_key.get(k.as_str()).copied()));
        match found {
            Some(i) => {
                if out.seen.contains_key(&i) {
                    continue;
                }
                let relink =
                    (devices[i].remote_id(target) != Some(doc.id.as_str())).then(|| doc.id.clone());
                out.seen.insert(
                    i,
                    Seen {
                        removed: doc.deleted,
                        doc: Some(doc.clone()),
                        relink,
                    },
                );
            }
            None if !doc.deleted => {
                if let Some(key) = keys.into_iter().next()
                    && imported.insert(key.as_str().to_owned(), ()).is_none()
                {
                    out.imports.push(Import {
                        key,
                        target,
                        remote_id: doc.id.clone(),
                    });
                }
            }
            None => {}
        }
    }
    if complete {
        for (i, d) in devices.iter().enumerate() {
            if d.remote_id(target).is_some() && !out.seen.contains_key(&i) {
                out.seen.insert(
                    i,
                    Seen {
                        removed: true,
                        ..Seen::default()
                    },
                );
            }
        }
    }
    out
}

pub fn origin_of(target: Target) -> Origin {
    match target {
        Target::Golioth => Origin::Golioth,
        Target::NetNeural => Origin::NetNeural,
    }
}

/// The device's syncable document in the mirror.
pub fn local_fields(d: &SyncDevice) -> Fields {
    reconcile::flatten(&json!({
        "name": d.name,
        "tags": d.tags,
        "enabled": d.enabled,
        "desired": d.desired,
    }))
}

/// NetNeural's `sync_direction` as the merge's direction (the words are NetNeural's, seen
/// from the backend: `import` = data flows into NetNeural only).
pub fn direction(word: Option<&str>) -> Direction {
    match word {
        Some("import") => Direction {
            pull: false,
            push: true,
        },
        Some("export") => Direction {
            pull: true,
            push: false,
        },
        Some("none") => Direction {
            pull: false,
            push: false,
        },
        _ => Direction::BOTH,
    }
}

pub fn copy_of(doc: &RemoteDoc) -> RemoteCopy {
    RemoteCopy {
        fields: doc.fields.clone(),
        remote_at: doc.remote_at,
        version: doc.version.clone(),
        extra: doc.extra.clone(),
    }
}

fn meta_of(fields: &Fields) -> Meta {
    Meta {
        name: fields
            .get("/name")
            .and_then(Value::as_str)
            .map(str::to_owned),
        tags: fields
            .get("/tags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        enabled: fields.get("/enabled").and_then(Value::as_bool),
    }
}

fn is_meta(field: &str) -> bool {
    matches!(field, "/name" | "/tags" | "/enabled")
}

/// One spoke's part in a device's commit.
#[derive(Clone, Debug)]
pub struct SpokeOutcome {
    pub target: Target,
    pub base_before: Fields,
    /// The copy stored before the run, and the one to store now (pulled, or written).
    pub copy_before: Option<RemoteCopy>,
    pub copy_now: Option<RemoteCopy>,
    pub remote_at: Option<UnixMillis>,
}

/// What a device's settlement comes to in the store.
pub fn device_commit(
    device: &SyncDevice,
    local_before: &Fields,
    settlement: &Settlement,
    spokes: &[SpokeOutcome],
    policy: &reconcile::Policy,
) -> DeviceCommit {
    let mut commit = DeviceCommit {
        id: device.id,
        ..DeviceCommit::default()
    };
    let local = &settlement.local;
    let meta_changed = local_before
        .keys()
        .chain(local.keys())
        .any(|f| is_meta(f) && local_before.get(f) != local.get(f));
    if meta_changed {
        commit.meta = Some(meta_of(local));
    }
    let desired_before = reconcile::subtree(local_before, "/desired");
    let desired_now = reconcile::subtree(local, "/desired");
    if desired_before != desired_now {
        // Credited to the cloud whose document it now matches.
        let by = spokes
            .iter()
            .find(|s| {
                s.copy_now
                    .as_ref()
                    .is_some_and(|c| reconcile::subtree(&c.fields, "/desired") == desired_now)
            })
            .map_or(Origin::Local, |s| origin_of(s.target));
        commit.desired = Some(desired_now);
        commit.desired_by = Some(by);
    }
    for s in spokes {
        if let Some((_, base)) = settlement.bases.iter().find(|(t, _)| *t == s.target)
            && *base != s.base_before
        {
            commit.bases.push((s.target, base.clone()));
        }
        if let Some(copy) = &s.copy_now
            && s.copy_before.as_ref() != Some(copy)
        {
            commit.copies.push((s.target, copy.clone()));
        }
    }
    for (target, c) in &settlement.conflicts {
        let remote_at = spokes
            .iter()
            .find(|s| s.target == *target)
            .and_then(|s| s.remote_at);
        let (status, resolved_value) = match c.settled {
            Settled::Held => ("pending", None),
            Settled::Local => ("auto_resolved", c.local.clone()),
            Settled::Remote => ("auto_resolved", c.remote.clone()),
        };
        let strategy = match (c.settled, policy.rule_for(&c.field)) {
            (Settled::Held, _) => "manual",
            (_, reconcile::FieldRule::Strategy(s)) => s.as_str(),
            (_, reconcile::FieldRule::MergeSet) => policy.strategy.as_str(),
        };
        commit.conflicts.push(NewConflict {
            target: *target,
            field: c.field.clone(),
            local: c.local.clone(),
            remote: c.remote.clone(),
            base: c.base.clone(),
            local_at: device.local_at,
            remote_at,
            status,
            strategy,
            resolved_value,
        });
    }
    commit
}

/// Whether a commit changes nothing.
pub fn is_empty(c: &DeviceCommit) -> bool {
    c.meta.is_none()
        && c.desired.is_none()
        && c.links.is_empty()
        && c.removed.is_empty()
        && c.netneural_direction.is_none()
        && c.bases.is_empty()
        && c.copies.is_empty()
        && c.conflicts.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdTemplate;
    use crate::store::sync::SpokeState;

    fn device(id: i64, key: &str, golioth: Option<&str>, netneural: Option<&str>) -> SyncDevice {
        SyncDevice {
            id,
            key: DeviceKey::parse(key).unwrap(),
            origin: "mqtt".into(),
            golioth_id: golioth.map(str::to_owned),
            netneural_id: netneural.map(str::to_owned),
            golioth_removed_at: None,
            netneural_removed_at: None,
            netneural_direction: None,
            name: None,
            tags: Vec::new(),
            enabled: None,
            desired: None,
            local_at: None,
            golioth: SpokeState::default(),
            netneural: SpokeState::default(),
        }
    }

    fn doc(id: &str, hw: &str) -> RemoteDoc {
        RemoteDoc {
            id: id.into(),
            hardware_ids: vec![hw.into()],
            ..RemoteDoc::default()
        }
    }

    fn fleet() -> Identity {
        Identity {
            template: IdTemplate::parse("{site}-{device}").unwrap(),
            site: "berlin".into(),
        }
    }

    #[test]
    fn a_hardware_id_gives_back_the_local_key_only_for_this_site() {
        let id = fleet();
        assert_eq!(id.key_of("berlin-s-1").unwrap().as_str(), "s-1");
        assert_eq!(id.key_of("paris-s-1"), None);
        assert_eq!(id.key_of("berlin-"), None, "an empty key is no key");
        let single = Identity {
            template: IdTemplate::default(),
            site: String::new(),
        };
        assert_eq!(single.key_of("s-1").unwrap().as_str(), "s-1");
    }

    #[test]
    fn documents_link_by_cloud_id_then_golioth_id_then_hardware_id_and_the_rest_are_imported() {
        let devices = vec![
            device(1, "a", Some("g-a"), Some("n-a")),
            device(2, "b", Some("g-b"), None),
            device(3, "c", None, None),
        ];
        let mut by_external = doc("n-b", "elsewhere-b");
        by_external.golioth_id = Some("g-b".into());
        let docs = vec![
            doc("n-a", "berlin-zzz"),
            by_external,
            doc("n-c", "berlin-c"),
            doc("n-new", "berlin-new"),
            doc("n-other", "paris-x"),
        ];
        let l = link(Target::NetNeural, &devices, &docs, false, &fleet());
        assert_eq!(l.seen[&0].relink, None, "linked by its id");
        assert_eq!(
            l.seen[&1].relink.as_deref(),
            Some("n-b"),
            "by the Golioth id"
        );
        assert_eq!(l.seen[&2].relink.as_deref(), Some("n-c"), "by hardware id");
        assert_eq!(l.imports.len(), 1, "{:?}", l.imports);
        assert_eq!(l.imports[0].key.as_str(), "new");
        assert!(l.seen.values().all(|s| !s.removed));
    }

    #[test]
    fn a_complete_read_marks_linked_devices_it_lacks_as_removed_and_a_deleted_row_too() {
        let devices = vec![
            device(1, "a", Some("g-a"), Some("n-a")),
            device(2, "b", Some("g-b"), None),
        ];
        let l = link(
            Target::Golioth,
            &devices,
            &[doc("g-a", "berlin-a")],
            true,
            &fleet(),
        );
        assert!(!l.seen[&0].removed);
        assert!(l.seen[&1].removed && l.seen[&1].doc.is_none());
        let mut gone = doc("n-a", "berlin-a");
        gone.deleted = true;
        let l = link(Target::NetNeural, &devices, &[gone], false, &fleet());
        assert!(l.seen[&0].removed);
        assert!(
            !l.seen.contains_key(&1),
            "an incremental read says nothing of the rest"
        );
    }

    #[test]
    fn netneural_directions_read_from_the_backend() {
        assert_eq!(
            direction(Some("import")),
            Direction {
                pull: false,
                push: true
            }
        );
        assert_eq!(
            direction(Some("export")),
            Direction {
                pull: true,
                push: false
            }
        );
        assert_eq!(
            direction(Some("none")),
            Direction {
                pull: false,
                push: false
            }
        );
        assert_eq!(direction(None), Direction::BOTH);
    }
}
