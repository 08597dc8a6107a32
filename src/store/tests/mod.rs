//! Store tests on real SQLite files in temporary directories: the write path, opening and
//! migrations, desired state, streams; retention in [`retention`].

mod retention;
mod sync;

use serde_json::json;

use super::*;
use crate::config::Synchronous;
use crate::model::{
    DeviceKey, Format, Inbound, MqttDelivery, Origin, Point, Reading, RejectCause, Rejection,
    Target, UnixMillis,
};

fn opts(targets: Vec<Target>) -> OpenOptions {
    OpenOptions {
        synchronous: Synchronous::Normal,
        targets,
        rejected_keep: 3,
    }
}

fn state(device: &str, patch: serde_json::Value, mqtt: Option<MqttDelivery>) -> WriteOp {
    WriteOp::Ingest(Inbound {
        device: DeviceKey::parse(device).unwrap(),
        origin: Origin::Mqtt,
        format: Format::Json,
        received_at: UnixMillis::now(),
        reading: Reading::State(patch.as_object().unwrap().clone()),
        mqtt,
    })
}

fn telemetry(device: &str, n: i64, mqtt: Option<MqttDelivery>) -> WriteOp {
    WriteOp::Ingest(Inbound {
        device: DeviceKey::parse(device).unwrap(),
        origin: Origin::Mqtt,
        format: Format::Json,
        received_at: UnixMillis::now(),
        reading: Reading::Telemetry(vec![Point {
            device_ts: None,
            data: json!({"n": n}).as_object().unwrap().clone(),
        }]),
        mqtt,
    })
}

fn reject(reason: &str) -> WriteOp {
    WriteOp::Reject(Rejection {
        origin: Origin::Mqtt,
        device: Some("d".into()),
        locator: "devices/d/state".into(),
        cause: RejectCause::Invalid,
        reason: reason.into(),
        size: 3,
        excerpt: b"bad".to_vec(),
        received_at: UnixMillis::now(),
        mqtt: None,
    })
}

/// The `n` of a device's telemetry points, in stored order.
fn telemetry_ns(db: &Db, device: &str) -> Vec<i64> {
    let key = DeviceKey::parse(device).unwrap();
    db.telemetry_payloads(&key)
        .unwrap()
        .iter()
        .map(|p| p["n"].as_i64().unwrap())
        .collect()
}

fn outbox(db: &Db) -> Vec<(String, String, i64)> {
    db.status()
        .unwrap()
        .outbox
        .into_iter()
        .map(|c| (c.target, c.state, c.rows))
        .collect()
}

#[test]
fn a_group_commit_answers_every_write_and_reports_new_devices() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    let results = db.apply_batch(&[
        state("a", json!({"x":1}), None),
        state("a", json!({"y":2}), None),
        reject("nope"),
    ]);
    let outcomes: Vec<Outcome> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Stored { new_device: true },
            Outcome::Stored { new_device: false },
            Outcome::Rejected
        ]
    );
    let devices = db.devices().unwrap();
    assert_eq!(devices[0].reported, Some(json!({"x":1,"y":2})));
    assert_eq!(devices[0].reported_version, Some(2));
}

#[test]
fn reported_state_coalesces_to_one_pending_row_per_cloud_while_telemetry_goes_to_netneural_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(
        &dir.path().join("g.db"),
        &opts(vec![Target::Golioth, Target::NetNeural]),
    )
    .unwrap();
    for i in 0..5 {
        db.apply_batch(&[state("a", json!({"i": i}), None), telemetry("a", i, None)]);
    }
    assert_eq!(
        outbox(&db),
        [
            ("golioth".into(), "pending".into(), 1),
            ("netneural".into(), "pending".into(), 1)
        ]
    );
    assert_eq!(
        db.queue(10).unwrap().telemetry_backlog,
        [("netneural".to_owned(), 5)],
        "telemetry is owed through NetNeural's cursor, not through rows"
    );
    let payload: String = db
        .conn()
        .query_row(
            "SELECT payload FROM outbox WHERE target = 'golioth'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&payload).unwrap(),
        json!({"i": 4}),
        "the newest document wins"
    );
}

#[test]
fn a_redelivery_is_recognised_but_a_new_identical_reading_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    let first = MqttDelivery {
        pkid: 7,
        dup: false,
        digest: 42,
    };
    let redelivery = MqttDelivery { dup: true, ..first };
    let other_message_same_pkid = MqttDelivery {
        pkid: 7,
        dup: true,
        digest: 43,
    };
    let new_identical = MqttDelivery {
        pkid: 8,
        dup: false,
        digest: 42,
    };
    let results: Vec<Outcome> = db
        .apply_batch(&[
            telemetry("a", 1, Some(first)),
            telemetry("a", 1, Some(redelivery)),
            telemetry("a", 2, Some(other_message_same_pkid)),
            telemetry("a", 1, Some(new_identical)),
        ])
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results[1], Outcome::Duplicate);
    assert_eq!(db.status().unwrap().redeliveries_total, 1);
    assert!(
        matches!(results[2], Outcome::Stored { .. }),
        "DUP with a different digest is a message we never stored"
    );
    assert!(
        matches!(results[3], Outcome::Stored { .. }),
        "no DUP flag: a new reading, even if identical"
    );
    let key = DeviceKey::parse("a").unwrap();
    assert_eq!(
        db.telemetry_payloads(&key).unwrap(),
        [json!({"n":1}), json!({"n":2}), json!({"n":1})]
    );
}

#[test]
fn one_poisonous_write_does_not_fail_the_rest_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    // A trigger stands in for any failure specific to one row.
    db.conn()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON device WHEN NEW.key = 'poison'
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
    let results = db.apply_batch(&[
        state("a", json!({"x":1}), None),
        state("poison", json!({}), None),
        telemetry("b", 1, None),
    ]);
    let outcomes: Vec<Outcome> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        outcomes[1],
        Outcome::Rejected,
        "kept as rejected, not retried forever"
    );
    assert!(matches!(outcomes[2], Outcome::Stored { .. }));
    assert_eq!(db.status().unwrap().devices, 2);
    assert!(db.rejected(1).unwrap()[0].reason.contains("poisoned"));
}

#[test]
fn a_full_disk_fails_the_whole_group_and_nothing_behind_it_is_stored_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    db.apply_batch(&[telemetry("a", 0, None)]);
    // A page limit stands in for a full disk: SQLite answers SQLITE_FULL either way.
    let pages: i64 = db
        .conn()
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    db.conn()
        .pragma_update(None, "max_page_count", pages)
        .unwrap();
    let big = |n: i64| {
        let mut op = telemetry("a", n, None);
        if let WriteOp::Ingest(i) = &mut op
            && let Reading::Telemetry(points) = &mut i.reading
        {
            points[0]
                .data
                .insert("pad".into(), json!("x".repeat(20_000)));
        }
        op
    };
    let results = db.apply_batch(&[telemetry("a", 1, None), big(2), telemetry("a", 3, None)]);
    assert!(
        results[0].as_ref().unwrap_err().is_disk_full(),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().is_transient()),
        "a full disk and what it holds back can succeed later: {results:?}"
    );
    assert!(
        matches!(results[2], Err(StoreError::Held(_))),
        "{results:?}"
    );
    let key = DeviceKey::parse("a").unwrap();
    assert_eq!(
        db.telemetry_payloads(&key).unwrap(),
        [json!({"n":0})],
        "nothing partial"
    );

    // Room again: the same writes, retried in order, go through in order.
    db.conn()
        .pragma_update(None, "max_page_count", 1_000_000)
        .unwrap();
    for r in db.apply_batch(&[telemetry("a", 1, None), big(2), telemetry("a", 3, None)]) {
        r.unwrap();
    }
    let ns: Vec<i64> = db
        .telemetry_payloads(&key)
        .unwrap()
        .iter()
        .map(|p| p["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [0, 1, 2, 3]);
}

#[test]
fn an_in_flight_state_row_superseded_by_a_newer_pending_one_is_dropped_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![Target::Golioth])).unwrap();
    db.apply_batch(&[state("a", json!({"v":1}), None)]);
    // The sender took the row, then the device sent a newer state before the crash.
    db.conn()
        .execute("UPDATE outbox SET state = 'in_flight'", [])
        .unwrap();
    db.apply_batch(&[state("a", json!({"v":2}), None)]);
    assert_eq!(db.requeue_in_flight(None).unwrap(), 0);
    assert_eq!(outbox(&db), [("golioth".into(), "pending".into(), 1)]);
    let payload: String = db
        .conn()
        .query_row("SELECT payload FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(payload, r#"{"v":2}"#);
}

#[test]
fn rejected_messages_are_counted_and_the_table_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    for i in 0..5 {
        db.apply_batch(&[reject(&format!("reason {i}"))]);
    }
    let status = db.status().unwrap();
    assert_eq!((status.rejected_total, status.rejected_kept), (5, 3));
    let kept: Vec<String> = db
        .rejected(10)
        .unwrap()
        .into_iter()
        .map(|r| r.reason)
        .collect();
    assert_eq!(kept, ["reason 4", "reason 3", "reason 2"]);
}

#[test]
fn a_database_from_a_newer_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE future(x); PRAGMA user_version = 99;")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Db::open(&path, &opts(vec![])).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 99") && msg.contains("g.db"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was modified"
    );
    assert!(
        !dir.path().join("g.db-wal").exists(),
        "WAL mode was switched on"
    );
}

#[test]
fn reopening_applies_no_migration_twice_and_in_flight_rows_return_to_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    let mut db = Db::open(&path, &opts(vec![Target::NetNeural])).unwrap();
    db.apply_batch(&[state("a", json!({"x": 1}), None)]);
    db.conn()
        .execute("UPDATE outbox SET state = 'in_flight'", [])
        .unwrap();
    drop(db);
    let mut db = Db::open(&path, &opts(vec![Target::NetNeural])).unwrap();
    assert_eq!(db.requeue_in_flight(None).unwrap(), 1);
    assert_eq!(outbox(&db), [("netneural".into(), "pending".into(), 1)]);
}

#[test]
fn desired_changes_are_ordered_and_publication_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    let a = DeviceKey::parse("a").unwrap();
    let b = DeviceKey::parse("b").unwrap();
    let first = db
        .set_desired(&a, &json!({"on":true}), Origin::Local)
        .unwrap();
    db.set_desired(&b, &json!({"on":false}), Origin::Local)
        .unwrap();
    let again = db
        .set_desired(&a, &json!({"on":false}), Origin::Local)
        .unwrap();
    assert_eq!((first.version, again.version), (1, 2));
    let since: Vec<String> = db
        .desired_since(first.seq, 10)
        .unwrap()
        .into_iter()
        .map(|d| d.device.to_string())
        .collect();
    assert_eq!(since, ["b", "a"]);
    db.mark_desired_published(&a, again.seq).unwrap();
    let unpublished: Vec<String> = db
        .desired_unpublished(10)
        .unwrap()
        .into_iter()
        .map(|d| d.device.to_string())
        .collect();
    assert_eq!(unpublished, ["b"]);
    // An older acknowledgement arriving late does not undo a newer one.
    db.mark_desired_published(&a, first.seq).unwrap();
    assert_eq!(db.desired_unpublished(10).unwrap().len(), 1);
}

#[test]
fn a_second_daemon_on_the_same_database_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let first = Store::open(&path, &opts(vec![])).unwrap();
    let err = Store::open(&path, &opts(vec![])).err().unwrap().to_string();
    assert!(
        err.contains(&format!("another nn-gateway (pid {})", std::process::id())),
        "{err}"
    );
    rt.block_on(first.close());
    Store::open(&path, &opts(vec![])).expect("the lock is released by close");
}

/// Runs bounded passes until one finishes, adding up what they deleted.
#[test]
fn after_a_failed_write_the_rest_of_its_stream_is_held_back_but_other_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Store::open(&dir.path().join("g.db"), &opts(vec![])).unwrap();
    rt.block_on(async {
        store.write(telemetry("a", 0, None)).await.unwrap();
        store
            .call(|db| {
                let pages: i64 = db.conn().query_row("PRAGMA page_count", [], |r| r.get(0))?;
                db.conn().pragma_update(None, "max_page_count", pages)?;
                Ok(())
            })
            .await
            .unwrap();
        let mut big = telemetry("a", 1, None);
        if let WriteOp::Ingest(i) = &mut big
            && let Reading::Telemetry(points) = &mut i.reading
        {
            points[0]
                .data
                .insert("pad".into(), json!("x".repeat(50_000)));
        }
        let failed = store
            .enqueue_from(big, Some(1))
            .await
            .unwrap()
            .committed()
            .await;
        assert!(failed.unwrap_err().is_disk_full());
        // Small enough to fit, but behind the failed one in stream 1: held, not stored first.
        let held = store
            .enqueue_from(telemetry("a", 2, None), Some(1))
            .await
            .unwrap()
            .committed()
            .await;
        assert!(matches!(held, Err(StoreError::Held(_))), "{held:?}");
        // The sender's next stream (its next connection) is stored.
        let next = store
            .enqueue_from(telemetry("a", 2, None), Some(2))
            .await
            .unwrap()
            .committed()
            .await;
        assert!(next.is_ok(), "{next:?}");
        let ns = store.call(|db| Ok(telemetry_ns(db, "a"))).await.unwrap();
        assert_eq!(ns, [0, 2]);
        store.close().await;
    });
}

#[test]
fn two_opens_of_a_fresh_database_at_once_both_succeed() {
    // The daemon starting on a new database while `desired set` opens it too: both migrate
    // (only one applies each migration) and both switch to WAL. Switching needs an exclusive
    // lock that SQLite's busy handler does not wait for, so a bare PRAGMA fails at once with
    // "database is locked" about once in 30 pairs.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..300 {
        let path = dir.path().join(format!("race-{i}.db"));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let opens: Vec<_> = (0..2)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Db::open(&path, &opts(vec![])).map(|_| ())
                })
            })
            .collect();
        for open in opens {
            if let Err(e) = open.join().unwrap() {
                panic!("pair {i}: {e}");
            }
        }
        let db = Db::open_readonly(&path).unwrap();
        assert_eq!(db.status().unwrap().schema_version, SCHEMA_VERSION);
    }
}

#[test]
fn store_errors_say_whether_waiting_can_help() {
    use rusqlite::ErrorCode as C;
    let sqlite = |code: C| {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error {
                code,
                extended_code: 0,
            },
            None,
        ))
    };
    for code in [
        C::DiskFull,
        C::DatabaseBusy,
        C::DatabaseLocked,
        C::SystemIoFailure,
    ] {
        assert!(sqlite(code).is_transient(), "{code:?} should be transient");
    }
    assert!(StoreError::Held("disk full".into()).is_transient());
    let permanent = [
        sqlite(C::DatabaseCorrupt),
        sqlite(C::NotADatabase),
        sqlite(C::ConstraintViolation),
        sqlite(C::ReadOnly),
        StoreError::Corrupt("bad key".into()),
        StoreError::NewerSchema {
            path: "g.db".into(),
            found: 9,
            known: 2,
        },
        StoreError::Migration {
            version: 2,
            source: rusqlite::Error::InvalidQuery,
        },
        StoreError::Closed,
    ];
    for e in permanent {
        assert!(!e.is_transient(), "{e} should not be transient");
    }
}
