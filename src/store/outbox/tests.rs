//! The outbox aggregate's SQL on real SQLite files: settling and taking rows in one
//! transaction, and telemetry ids that never go back below a cursor.

use super::*;
use crate::config::Synchronous;
use crate::store::OpenOptions;

/// A database that owes NetNeural (reported state and telemetry).
fn owed_to_netneural() -> OpenOptions {
    OpenOptions {
        synchronous: Synchronous::Normal,
        targets: vec![Target::NetNeural],
        rejected_keep: 3,
    }
}

/// A database with devices `d0..d{n-1}`, each with a reported-state row owed to NetNeural.
fn owed(dir: &std::path::Path, n: usize) -> Db {
    let opts = owed_to_netneural();
    let db = Db::open(&dir.join("gateway.db"), &opts).unwrap();
    for d in 0..n {
        db.conn
            .execute(
                "INSERT INTO device(key, origin, first_seen) VALUES (?1, 'mqtt', 0)",
                [format!("d{d}")],
            )
            .unwrap();
        db.conn
            .execute(
                "INSERT INTO outbox(target, operation, device_id, payload, idempotency_key,
                                    next_attempt_at, created_at, updated_at)
                 VALUES ('netneural', 'reported_state', ?1, ?2, ?3, 0, 0, 0)",
                params![
                    db.conn.last_insert_rowid(),
                    format!(r#"{{"n":{d}}}"#),
                    format!("st:{d}")
                ],
            )
            .unwrap();
    }
    db
}

fn row_of(db: &Db, device: &str) -> Option<(String, i64, Option<String>)> {
    db.conn
        .query_row(
            "SELECT o.state, o.attempts, o.last_error FROM outbox o JOIN device d
             ON d.id = o.device_id WHERE d.key = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .unwrap()
}

#[test]
fn answers_settle_and_the_next_rows_are_taken_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = owed(dir.path(), 3);
    let now = UnixMillis::now();
    let first = db.take_due(Target::NetNeural, now, 2).unwrap();
    let keys: Vec<&str> = first.iter().map(|r| r.device.key.as_str()).collect();
    assert_eq!(keys, ["d0", "d1"]);

    let settled = [
        Settled {
            row: first[0].clone(),
            remote_id: RemoteIdChange::Set("u-0".into()),
            how: Settlement::Done,
        },
        Settled {
            row: first[1].clone(),
            remote_id: RemoteIdChange::Keep,
            how: Settlement::Retry {
                at: UnixMillis(now.0 + 60_000),
                error: "HTTP 500".into(),
                counted: true,
            },
        },
    ];
    let next = db
        .settle_and_take(Target::NetNeural, &settled, now, 10)
        .unwrap();
    // The retried row is not due yet; the third device's row is.
    let keys: Vec<&str> = next.iter().map(|r| r.device.key.as_str()).collect();
    assert_eq!(keys, ["d2"]);
    assert_eq!(row_of(&db, "d0"), None, "delivered: gone");
    let id: Option<String> = db
        .conn
        .query_row(
            "SELECT netneural_id FROM device WHERE key = 'd0'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        id.as_deref(),
        Some("u-0"),
        "stored with the row's settlement"
    );
    assert_eq!(
        row_of(&db, "d1"),
        Some(("pending".into(), 1, Some("HTTP 500".into())))
    );

    let dead = [Settled {
        row: next[0].clone(),
        remote_id: RemoteIdChange::Keep,
        how: Settlement::Dead("HTTP 400".into()),
    }];
    assert!(
        db.settle_and_take(Target::NetNeural, &dead, now, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        row_of(&db, "d2"),
        Some(("dead".into(), 1, Some("HTTP 400".into())))
    );
}

/// Retention that empties `telemetry` lets SQLite reuse ids (no AUTOINCREMENT): new points
/// then sit at or below the cursor and are never sent (and reuse idempotency keys).
#[test]
fn points_after_retention_empties_the_table_are_still_owed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = owed_to_netneural();
    let mut db = Db::open(&dir.path().join("gateway.db"), &opts).unwrap();
    db.conn
        .execute(
            "INSERT INTO device(key, origin, first_seen) VALUES ('d0', 'mqtt', 0)",
            [],
        )
        .unwrap();
    let dev = db.conn.last_insert_rowid();
    let insert = |db: &Db, at: i64| {
        db.conn
            .execute(
                "INSERT INTO telemetry(device_id, device_ts, received_at, payload, content_type)
                 VALUES (?1, NULL, ?2, '{\"t\":1}', 'application/json')",
                params![dev, at],
            )
            .unwrap();
        db.conn.last_insert_rowid()
    };
    for _ in 0..5 {
        insert(&db, 1);
    }
    // All five delivered.
    db.settle_telemetry(Target::NetNeural, 5, &[]).unwrap();
    // They age out, all but the newest: it keeps SQLite from handing its id out again.
    let policy = crate::store::retention::Policy {
        max_bytes: u64::MAX,
        max_age: Some(std::time::Duration::from_secs(1)),
        chunk: 1000,
    };
    let report = db.enforce_retention(&policy).unwrap();
    assert_eq!(report.aged_out, 4);
    // A new point arrives.
    let id = insert(&db, UnixMillis::now().0);
    let cursor = db.telemetry_cursor(Target::NetNeural).unwrap().unwrap();
    let owed = db.telemetry_after(cursor, 100).unwrap();
    assert_eq!(
        owed.len(),
        1,
        "new point id {id} is at or below the cursor {cursor}: it will never be sent"
    );
}
