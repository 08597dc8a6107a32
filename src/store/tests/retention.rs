//! Retention on real SQLite files: by age once delivered, by the size ceiling (delivered
//! first, then undelivered, counted), and never reported or desired state or conflicts.

use super::*;

fn until_done(
    db: &mut Db,
    policy: &crate::store::retention::Policy,
) -> crate::store::retention::Report {
    let mut total = crate::store::retention::Report::default();
    loop {
        let r = db.enforce_retention(policy).unwrap();
        total.aged_out += r.aged_out;
        total.dropped_delivered += r.dropped_delivered;
        total.dropped_undelivered += r.dropped_undelivered;
        if !r.more {
            return total;
        }
    }
}

fn mark_delivered(db: &mut Db) {
    let newest: i64 = db
        .conn()
        .query_row("SELECT max(id) FROM telemetry", [], |r| r.get(0))
        .unwrap();
    db.settle_telemetry(Target::NetNeural, newest, &[]).unwrap();
}

#[test]
fn old_telemetry_goes_once_delivered_and_waits_while_owed() {
    use crate::store::retention::Policy;
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![Target::NetNeural])).unwrap();
    db.apply_batch(&[telemetry("a", 0, None), telemetry("a", 1, None)]);
    mark_delivered(&mut db);
    db.apply_batch(&[telemetry("a", 2, None)]);
    db.conn()
        .execute(
            "UPDATE telemetry SET received_at = received_at - 100000",
            [],
        )
        .unwrap();
    let policy = Policy {
        max_bytes: u64::MAX,
        max_age: Some(std::time::Duration::from_secs(10)),
        chunk: 1,
    };
    let report = until_done(&mut db, &policy);
    assert_eq!(report.aged_out, 2);
    assert_eq!(
        telemetry_ns(&db, "a"),
        [2],
        "the point still owed to NetNeural stays"
    );
    assert_eq!(
        db.queue(10).unwrap().telemetry_backlog,
        [("netneural".to_owned(), 1)]
    );
}

#[test]
fn at_the_size_ceiling_delivered_telemetry_goes_first_then_undelivered_is_counted() {
    use crate::store::retention::{LOW_WATER, Policy, used_bytes};
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("g.db"), &opts(vec![Target::NetNeural])).unwrap();
    let padded = |n: i64| {
        let mut op = telemetry("a", n, None);
        if let WriteOp::Ingest(i) = &mut op
            && let Reading::Telemetry(points) = &mut i.reading
        {
            points[0].data.insert("pad".into(), json!("x".repeat(2000)));
        }
        op
    };
    let first: Vec<WriteOp> = (0..200).map(padded).collect();
    db.apply_batch(&first);
    mark_delivered(&mut db);
    let second: Vec<WriteOp> = (200..400).map(padded).collect();
    db.apply_batch(&second);
    db.apply_batch(&[state("a", json!({"keep": "me"}), None)]);
    let full = used_bytes(db.conn()).unwrap();

    // A ceiling the delivered half alone can satisfy.
    let policy = Policy {
        max_bytes: full * 3 / 4,
        max_age: None,
        chunk: 5,
    };
    let report = until_done(&mut db, &policy);
    assert!(
        report.dropped_delivered > 0 && report.dropped_undelivered == 0,
        "{report:?}"
    );
    assert!(used_bytes(db.conn()).unwrap() as f64 <= policy.max_bytes as f64 * LOW_WATER);
    assert_eq!(
        telemetry_ns(&db, "a").first(),
        Some(&(report.dropped_delivered as i64)),
        "oldest first"
    );

    // A ceiling that needs undelivered points too: every delivered one goes before any of them.
    let delivered_left = telemetry_ns(&db, "a").iter().filter(|n| **n < 200).count() as u64;
    let policy = Policy {
        max_bytes: full / 4,
        max_age: None,
        chunk: 5,
    };
    let report = until_done(&mut db, &policy);
    assert_eq!(report.dropped_delivered, delivered_left, "{report:?}");
    assert!(report.dropped_undelivered > 0, "{report:?}");
    let status = db.status().unwrap();
    assert_eq!(
        status.telemetry_dropped_undelivered,
        report.dropped_undelivered as i64
    );
    assert_eq!(
        db.devices().unwrap()[0].reported,
        Some(json!({"keep": "me"})),
        "state is never dropped"
    );
    let left = telemetry_ns(&db, "a");
    assert!(
        left.windows(2).all(|w| w[0] < w[1]) && *left.last().unwrap() == 399,
        "newest kept: {left:?}"
    );
}

#[test]
fn a_database_over_its_ceiling_that_holds_only_state_keeps_all_of_it() {
    use crate::store::retention::{Policy, used_bytes};
    let dir = tempfile::tempdir().unwrap();
    let targets = vec![Target::Golioth, Target::NetNeural];
    let mut db = Db::open(&dir.path().join("g.db"), &opts(targets)).unwrap();
    let pad = "x".repeat(2000);
    let states: Vec<WriteOp> = (0..200)
        .map(|d| state(&format!("s-{d}"), json!({ "pad": pad, "d": d }), None))
        .collect();
    db.apply_batch(&states);
    for d in 0..200 {
        let key = DeviceKey::parse(&format!("s-{d}")).unwrap();
        db.set_desired(&key, &json!({ "pad": pad }), Origin::Local)
            .unwrap();
    }
    // No API writes conflicts yet; one per device, as reconciliation would record them.
    db.conn()
        .execute(
            "INSERT INTO conflict(device_id, target, field, local_value, remote_value, detected_at)
             SELECT id, 'golioth', 'desired.pad', '1', '2', 0 FROM device",
            [],
        )
        .unwrap();
    let before = db.status().unwrap();
    let outbox_before = outbox(&db);
    let full = used_bytes(db.conn()).unwrap();

    let policy = Policy {
        max_bytes: full / 4,
        max_age: Some(std::time::Duration::from_secs(1)),
        chunk: 5,
    };
    let report = db.enforce_retention(&policy).unwrap();
    assert_eq!(
        report,
        crate::store::retention::Report::default(),
        "nothing to delete, and no pass left to run"
    );
    let after = db.status().unwrap();
    assert_eq!(after.reported_states, 200);
    assert_eq!(after.reported_states, before.reported_states);
    assert_eq!(after.devices, before.devices);
    assert_eq!(after.conflicts_pending, 200);
    assert_eq!(outbox(&db), outbox_before, "reported state still owed");
    for view in db.devices().unwrap() {
        assert_eq!(view.reported.unwrap()["pad"], json!(pad), "{}", view.key);
        assert_eq!(view.desired.unwrap()["pad"], json!(pad), "{}", view.key);
    }
    assert!(used_bytes(db.conn()).unwrap() >= full, "nothing was freed");
}
