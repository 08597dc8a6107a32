//! Clean restarts under load: the gateway is stopped with its shutdown token (what SIGTERM
//! fires) while four publishers stream QoS 1 telemetry through a real Mosquitto, then started
//! again on the same database and client id. A clean stop acknowledges everything it stored,
//! so the broker has nothing stored to resend, and every message is stored exactly once.
//!
//! Real: Mosquitto (limits raised, as deployments must), the gateway's daemon in process, the
//! SQLite file, rumqttc clients as the publishers. Faked: nothing; the clouds are off.

mod support;

use std::path::Path;
use std::time::Duration;

use nn_gateway::store::Db;
use support::{
    Device, Gateway, Mosquitto, Numbered, assert_each_once_in_order, config, stored_points,
    wait_for_points, wait_subscribed,
};
use tokio::task::JoinHandle;

/// Publishers, each its own client with its own devices, like the field report's four.
const PUBLISHERS: [&str; 4] = ["pa-", "pb-", "pc-", "pd-"];
/// Messages per publisher, spread over `DEVICES` devices.
const PER_PUBLISHER: u64 = 10_000;
const DEVICES: u64 = 2;
const TOTAL: u64 = PER_PUBLISHER * PUBLISHERS.len() as u64;
const WAIT: Duration = Duration::from_secs(120);

/// Starts every publisher at once; each task ends when the broker acknowledged its messages.
fn publish_all(port: u16) -> Vec<JoinHandle<()>> {
    PUBLISHERS
        .iter()
        .map(|prefix| {
            Numbered {
                prefix,
                devices: DEVICES,
                total: PER_PUBLISHER,
                extra: "",
            }
            .publish(port, &format!("{prefix}publisher"))
        })
        .collect()
}

fn redeliveries(db: &Path) -> i64 {
    Db::open_readonly(db)
        .unwrap()
        .status()
        .unwrap()
        .redeliveries_total
}

/// Waits for every publisher, then for every message to be stored, then a little longer so
/// that late duplicates, if any, are counted too.
async fn finish(publishers: Vec<JoinHandle<()>>, db: &Path, baseline: u64) {
    for p in publishers {
        tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
    }
    wait_for_points(db, baseline + TOTAL, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

fn assert_every_message_once_in_order(db: &Path, baseline: u64) {
    let conn = Db::open_readonly(db).unwrap();
    assert_eq!(
        conn.status().unwrap().telemetry_points as u64,
        baseline + TOTAL,
        "rows stored for {TOTAL} messages"
    );
    for prefix in PUBLISHERS {
        assert_each_once_in_order(&conn, prefix, DEVICES, PER_PUBLISHER);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_under_load_leaves_the_broker_nothing_stored_to_resend() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), broker.port, "gw-clean-stop");
    let gw = Gateway::start(cfg.clone()).await;
    let probe = Device::connect(broker.port, "probe").await;
    wait_subscribed(&probe, &gw.db).await;
    let db = gw.db.clone();
    let baseline = stored_points(&db);

    let publishers = publish_all(broker.port);
    // Stop while the broker is streaming to us as fast as it can.
    wait_for_points(&db, baseline + TOTAL / 5, WAIT).await;
    gw.stop().await;
    let before_restart = stored_points(&db);
    assert!(
        before_restart < baseline + TOTAL,
        "the stream ended before the stop; the test proves nothing"
    );

    let gw = Gateway::start(cfg).await;
    finish(publishers, &db, baseline).await;
    gw.stop().await;

    let resent = redeliveries(&db);
    println!("stored before the stop: {before_restart}; redeliveries after it: {resent}");
    assert_eq!(
        resent, 0,
        "the broker resent {resent} messages that were stored before the clean stop"
    );
    assert_every_message_once_in_order(&db, baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clean_restarts_under_load_store_every_message_once_in_order() {
    const STOPS: u64 = 3;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), broker.port, "gw-restarts");
    let mut gw = Gateway::start(cfg.clone()).await;
    let probe = Device::connect(broker.port, "probe").await;
    wait_subscribed(&probe, &gw.db).await;
    let db = gw.db.clone();
    let baseline = stored_points(&db);

    let publishers = publish_all(broker.port);
    for k in 1..=STOPS {
        wait_for_points(&db, baseline + TOTAL * k / (STOPS + 1), WAIT).await;
        gw.stop().await;
        gw = Gateway::start(cfg.clone()).await;
    }
    finish(publishers, &db, baseline).await;
    gw.stop().await;

    println!("redeliveries recognised: {}", redeliveries(&db));
    assert_every_message_once_in_order(&db, baseline);
    assert_eq!(
        redeliveries(&db),
        0,
        "clean stops left stored messages unacknowledged"
    );
}
