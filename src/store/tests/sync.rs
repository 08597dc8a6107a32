//! The reconciliation aggregate: a run's commit read back, conflicts held and resolved once.

use serde_json::json;

use super::opts;
use crate::model::{DeviceKey, Origin, Target};
use crate::store::Db;
use crate::store::sync::{
    DeviceCommit, Fields, LogEntry, Meta, NewConflict, RemoteCopy, Resolution, ResolveError,
    SyncCommit,
};

fn fields(pairs: &[(&str, serde_json::Value)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn conflict(field: &str, status: &'static str) -> NewConflict {
    NewConflict {
        target: Target::NetNeural,
        field: field.into(),
        local: Some(json!("red")),
        remote: Some(json!("blue")),
        base: Some(json!("off")),
        local_at: None,
        remote_at: None,
        status,
        strategy: "manual",
        resolved_value: None,
    }
}

fn open(dir: &tempfile::TempDir) -> Db {
    Db::open(
        &dir.path().join("g.db"),
        &opts(vec![Target::Golioth, Target::NetNeural]),
    )
    .unwrap()
}

#[test]
fn a_commit_is_read_back_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir);
    let key = DeviceKey::parse("lamp-1").unwrap();
    let id = db
        .sync_import(&key, Origin::Golioth, Target::Golioth, "g-1")
        .unwrap();
    let base = fields(&[("/name", json!("Lamp")), ("/desired/led", json!("on"))]);
    let copy = RemoteCopy {
        fields: base.clone(),
        remote_at: None,
        version: Some("2026-12-03T10:00:00.000001+00:00".into()),
        extra: Some(json!({"note": "kept"})),
    };
    let done = db
        .sync_commit(&SyncCommit {
            devices: vec![DeviceCommit {
                id,
                meta: Some(Meta {
                    name: Some("Lamp".into()),
                    tags: vec!["roof".into()],
                    enabled: Some(true),
                }),
                desired: Some(json!({"led": "on"})),
                desired_by: Some(Origin::Golioth),
                links: vec![(Target::NetNeural, "n-1".into())],
                bases: vec![(Target::Golioth, base.clone())],
                copies: vec![(Target::NetNeural, copy.clone())],
                conflicts: vec![conflict("/desired/mode", "pending")],
                ..DeviceCommit::default()
            }],
            cursors: vec![(Target::NetNeural, "devices", "2026-12-03T10:00:00Z".into())],
            log: vec![LogEntry {
                target: "golioth".into(),
                direction: "both",
                operation: "run".into(),
                outcome: "completed",
                ..LogEntry::default()
            }],
            summary: Some(json!({"started_ms": 1})),
        })
        .unwrap();
    assert_eq!(done.desired_changed, 1);
    assert_eq!(done.conflicts_stored, 1);
    let d = db.sync_devices().unwrap().pop().unwrap();
    assert_eq!(d.origin, "golioth");
    assert_eq!(
        (d.golioth_id.as_deref(), d.netneural_id.as_deref()),
        (Some("g-1"), Some("n-1"))
    );
    assert_eq!(d.name.as_deref(), Some("Lamp"));
    assert_eq!(d.tags, vec!["roof".to_owned()]);
    assert_eq!(d.desired, Some(json!({"led": "on"})));
    assert_eq!(d.golioth.base, base);
    assert_eq!(d.netneural.copy, Some(copy));
    assert!(d.netneural.held.contains("/desired/mode"));
    assert_eq!(
        db.sync_cursor(Target::NetNeural, "devices")
            .unwrap()
            .as_deref(),
        Some("2026-12-03T10:00:00Z")
    );
    let log = db.sync_log(None, None, None, 10).unwrap();
    assert_eq!(log[0].run_id, Some(log[0].id));
    // The same field is not held twice.
    let again = db
        .sync_commit(&SyncCommit {
            devices: vec![DeviceCommit {
                id,
                conflicts: vec![conflict("/desired/mode", "pending")],
                ..DeviceCommit::default()
            }],
            ..SyncCommit::default()
        })
        .unwrap();
    assert_eq!(again.conflicts_stored, 0);
}

#[test]
fn a_conflict_is_resolved_exactly_once_and_moves_the_base_to_the_remote_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir);
    let key = DeviceKey::parse("lamp-2").unwrap();
    let id = db
        .sync_import(&key, Origin::NetNeural, Target::NetNeural, "n-2")
        .unwrap();
    db.set_desired(&key, &json!({"led": "red", "keep": 1}), Origin::Local)
        .unwrap();
    db.sync_commit(&SyncCommit {
        devices: vec![DeviceCommit {
            id,
            conflicts: vec![conflict("/desired/led", "pending")],
            ..DeviceCommit::default()
        }],
        ..SyncCommit::default()
    })
    .unwrap();
    let cid = db.conflicts(false, 10).unwrap()[0].id;

    // Two operators at once, on two connections: one wins, the other is told.
    let path = dir.path().join("g.db");
    let racers: Vec<_> = [json!("green"), json!("amber")]
        .into_iter()
        .map(|v| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut db = Db::open(&path, &opts(Vec::new())).unwrap();
                db.resolve_conflict(cid, &Resolution::Value(v), "test")
                    .unwrap()
            })
        })
        .collect();
    let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert!(results.iter().any(|r| matches!(
        r,
        Err(ResolveError::NotPending { status, .. }) if status == "resolved"
    )));
    let value = won[0].value.clone().unwrap();
    let d = db.sync_devices().unwrap().pop().unwrap();
    assert_eq!(d.desired, Some(json!({"led": value, "keep": 1})));
    assert_eq!(
        d.netneural.base.get("/desired/led"),
        Some(&json!("blue")),
        "the base is what the cloud held, so the next run pushes the choice"
    );
    assert!(d.netneural.held.is_empty());
    assert_eq!(
        db.resolve_conflict(999, &Resolution::Local, "t").unwrap(),
        Err(ResolveError::Unknown(999))
    );
}
