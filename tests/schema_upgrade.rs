//! Schema upgrades: each released schema, kept as a small fixture (`tests/fixtures/schema<N>.sql`,
//! a SQL dump made once by `make_schema_fixtures.py` and never regenerated), is opened by the
//! current code, migrated, and found whole: devices, documents and their versions, the outbox
//! and its dead rows, telemetry and its cursor and dead letters, rejections and counters, and
//! (from schema 3) the reconciliation's bases, copies, cursors and conflicts. Then it takes
//! writes as a fresh database does.

use std::path::{Path, PathBuf};

use nn_gateway::config::Synchronous;
use nn_gateway::model::{DeviceKey, Origin, Target};
use nn_gateway::store::{Db, OpenOptions, SCHEMA_VERSION};
use serde_json::json;

fn restore(fixture: &str, dir: &Path) -> PathBuf {
    let sql = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture),
    )
    .unwrap();
    let path = dir.join("gateway.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&sql).unwrap();
    let broken: i64 = conn
        .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(broken, 0, "{fixture} breaks its own references");
    path
}

fn open(path: &Path) -> Db {
    Db::open(
        path,
        &OpenOptions {
            synchronous: Synchronous::Normal,
            targets: vec![Target::Golioth, Target::NetNeural],
            rejected_keep: 1000,
        },
    )
    .unwrap()
}

/// What schemas 1 and 2 held, as every later version must still show it.
fn assert_core_intact(db: &Db) {
    let s = db.status().unwrap();
    assert_eq!(s.schema_version, SCHEMA_VERSION);
    assert_eq!(
        db.install_id(),
        "00c0ffee00c0ffee",
        "idempotency keys derive from it"
    );
    assert_eq!(
        (s.devices, s.telemetry_points, s.reported_states),
        (2, 3, 2)
    );
    assert_eq!((s.rejected_total, s.rejected_kept), (1, 1));
    assert_eq!(s.redeliveries_total, 4);
    assert_eq!(s.telemetry_dead, 1);
    assert_eq!(
        s.desired_unpublished, 1,
        "valve-7's edit is still owed to the broker"
    );

    let devices = db.devices().unwrap();
    let sensor = devices.iter().find(|d| d.key == "sensor-1").unwrap();
    assert_eq!(sensor.reported, Some(json!({"fw": "1.0", "temp": 21.5})));
    assert_eq!(sensor.reported_version, Some(3));
    assert_eq!(sensor.desired, Some(json!({"led": "on"})));
    assert_eq!(sensor.desired_version, Some(2));
    let key = DeviceKey::parse("sensor-1").unwrap();
    assert_eq!(
        db.telemetry_payloads(&key).unwrap(),
        vec![json!({"temp": 20.0}), json!({"temp": 20.5})]
    );
    let queue = db.queue(100).unwrap();
    assert_eq!(
        queue.telemetry_backlog,
        vec![("netneural".to_owned(), 2)],
        "the cursor at point 1 of 3"
    );
    let dead = queue.rows.iter().find(|r| r.state == "dead").unwrap();
    assert!(dead.last_error.as_deref().unwrap().contains("HTTP 400"));
    assert!(queue.rows.iter().any(|r| r.state == "pending"));
    // Narrowed to a state or a cloud (the API's `queue?state=&cloud=`).
    let dead = db.queue_of(None, Some("dead"), 100).unwrap();
    assert!(!dead.rows.is_empty() && dead.rows.iter().all(|r| r.state == "dead"));
    let per_cloud: Vec<_> = ["golioth", "netneural"]
        .map(|t| db.queue_of(Some(t), None, 100).unwrap())
        .into_iter()
        .collect();
    assert!(per_cloud[0].rows.iter().all(|r| r.target == "golioth"));
    assert!(per_cloud[0].telemetry_backlog.is_empty());
    assert_eq!(
        per_cloud[0].rows.len() + per_cloud[1].rows.len(),
        queue.rows.len()
    );
    assert_eq!(db.rejected(10).unwrap().len(), 1);
}

#[test]
fn a_schema_2_database_is_migrated_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = restore("schema2.sql", dir.path());
    let mut db = open(&path);
    assert_core_intact(&db);
    // Reconciliation starts from nothing: links kept, no bases, nothing held.
    let devices = db.sync_devices().unwrap();
    let sensor = devices
        .iter()
        .find(|d| d.key.as_str() == "sensor-1")
        .unwrap();
    assert_eq!(sensor.golioth_id.as_deref(), Some("g-1"));
    assert!(sensor.golioth.base.is_empty() && sensor.netneural.copy.is_none());
    assert_eq!(db.sync_cursor(Target::NetNeural, "devices").unwrap(), None);
    // And it takes writes.
    let key = DeviceKey::parse("valve-7").unwrap();
    let d = db
        .set_desired(&key, &json!({"open": false}), Origin::Local)
        .unwrap();
    assert_eq!((d.version, d.seq), (2, 3));
    drop(db);
    // Opened again: nothing applied twice.
    assert_core_intact(&open(&path));
}

#[test]
fn a_schema_3_database_keeps_its_reconciliation_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = restore("schema3.sql", dir.path());
    let db = open(&path);
    assert_core_intact(&db);
    let devices = db.sync_devices().unwrap();
    let sensor = devices
        .iter()
        .find(|d| d.key.as_str() == "sensor-1")
        .unwrap();
    assert_eq!(sensor.enabled, Some(true));
    assert_eq!(sensor.golioth.base.get("/desired/led"), Some(&json!("on")));
    let copy = sensor.netneural.copy.as_ref().unwrap();
    assert_eq!(
        copy.extra,
        Some(json!({"desired": {"led": "on"}, "note": "theirs"}))
    );
    assert!(sensor.netneural.held.contains("/desired/mode"));
    let valve = devices
        .iter()
        .find(|d| d.key.as_str() == "valve-7")
        .unwrap();
    assert!(valve.golioth_removed_at.is_some());
    assert_eq!(
        db.sync_cursor(Target::NetNeural, "devices")
            .unwrap()
            .as_deref(),
        Some("2026-12-02T18:26:48Z")
    );
    let conflicts = db.conflicts(false, 10).unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].remote, Some(json!("boost")));
    assert_eq!(db.sync_log(None, None, None, 10).unwrap().len(), 2);
}
