//! Promises of the MQTT edge that only show over time or across a reconnect: rejected messages
//! are acknowledged (the broker resends unacknowledged ones only after a reconnect), and each
//! desired-state change is published once, however many downlink polls pass.
//!
//! Real: Mosquitto (per test, on a free port), the gateway's daemon (in process), rumqttc
//! clients standing in for devices, the SQLite file. Faked: nothing; the clouds are off.

mod support;

use std::time::Duration;

use nn_gateway::store::{Db, Status};
use rumqttc::{Publish, QoS};
use serde_json::{Value, json};
use support::{Device, Gateway, Mosquitto, Site, config, wait_for, wait_subscribed};

const WAIT: Duration = Duration::from_secs(10);

fn status(db: &std::path::Path) -> Status {
    Db::open_readonly(db).unwrap().status().unwrap()
}

fn has_reported(db: &Db, key: &str) -> bool {
    db.devices()
        .is_ok_and(|d| d.iter().any(|d| d.key == key && d.reported.is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_acknowledged_so_a_reconnect_does_not_bring_them_back() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-reject-reconnect");
    cfg.mqtt.max_message_size = 1024;
    let gw = Gateway::start(cfg.clone()).await;
    let dev = Device::connect(broker.port, "dev-reject-reconnect").await;
    wait_subscribed(&dev, &gw.db).await;

    // One of each kind of rejection, then a good message behind them.
    dev.publish("devices/bad-1/state", b"{not json".to_vec())
        .await;
    dev.publish("devices/bad-1/telemetry", br#"[{"v":1},"oops"]"#.to_vec())
        .await;
    dev.publish("devices/bad key/state", br#"{"a":1}"#.to_vec())
        .await;
    dev.publish("devices/big-1/state", vec![b' '; 4096]).await;
    dev.publish("devices/before-1/state", br#"{"ok":1}"#.to_vec())
        .await;
    wait_for(&gw.db, WAIT, |db| {
        has_reported(db, "before-1").then_some(())
    })
    .await;
    let first = status(&gw.db);
    assert_eq!(first.rejected_total, 4);

    // Same client id and database: the broker resumes the session and resends, before anything
    // newer, every message the last connection left unacknowledged.
    gw.stop().await;
    let gw = Gateway::start(cfg).await;
    dev.publish("devices/after-1/state", br#"{"ok":2}"#.to_vec())
        .await;
    wait_for(&gw.db, WAIT, |db| has_reported(db, "after-1").then_some(())).await;

    let second = status(&gw.db);
    assert_eq!(
        second.rejected_total, first.rejected_total,
        "rejected messages came back after the reconnect and were rejected again"
    );
    assert_eq!(
        second.redeliveries_total, 0,
        "the broker redelivered messages after the reconnect: the rejected ones were never acknowledged"
    );
    gw.stop().await;
}

/// Every publish `dev` receives until none has come for `quiet` (or for at most ten times
/// that, so a gateway that never stops publishing fails the test rather than hanging it), as
/// (topic, document, retain).
async fn received(dev: &mut Device, quiet: Duration) -> Vec<(String, Value, bool)> {
    let end = tokio::time::Instant::now() + quiet * 10;
    let mut seen = Vec::new();
    while let Ok(Ok(Some(Publish {
        topic,
        payload,
        retain,
        ..
    }))) = tokio::time::timeout_at(end, tokio::time::timeout(quiet, dev.events.recv())).await
    {
        let doc = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        seen.push((topic, doc, retain));
    }
    seen
}

/// Subscribes `dev` to every desired topic and returns once the subscription is in place:
/// proven by a message of its own on a topic it then leaves out of what it counts.
async fn subscribe_desired(dev: &mut Device) {
    dev.client
        .subscribe("devices/+/desired", QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        dev.client
            .publish("devices/sync-probe/desired", QoS::AtLeastOnce, false, "{}")
            .await
            .unwrap();
        if let Ok(Some(p)) =
            tokio::time::timeout(Duration::from_millis(200), dev.events.recv()).await
            && p.topic == "devices/sync-probe/desired"
        {
            // Drop any further copies of the probe.
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(200), dev.events.recv()).await
            {
            }
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "subscription never took effect"
        );
    }
}

async fn all_published(db: &std::path::Path) {
    wait_for(db, WAIT, |db| {
        db.status().ok().filter(|s| s.desired_unpublished == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_desired_change_is_published_once_however_many_polls_pass() {
    const POLL: Duration = Duration::from_millis(50);
    // Twenty downlink polls: any republishing would show many times over.
    const QUIET: Duration = Duration::from_millis(1000);
    let site = Site::start_with("gw-desired-once", |cfg, _| cfg.gateway.downlink_poll = POLL).await;
    let mut early = Device::connect(site.broker.port, "desired-early").await;
    subscribe_desired(&mut early).await;

    let set = |device: &str, doc: &str| {
        nn_gateway::cli::set_desired(&site.gw.db, device, doc, true).unwrap();
    };
    set("valve-1", r#"{"open":true}"#);
    all_published(&site.gw.db).await;
    let mut seen = received(&mut early, QUIET).await;
    set("valve-1", r#"{"open":false}"#);
    set("valve-2", r#"{"limit":40}"#);
    all_published(&site.gw.db).await;
    seen.extend(received(&mut early, QUIET).await);

    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let docs: Vec<(&str, &Value)> = seen.iter().map(|(t, d, _)| (t.as_str(), d)).collect();
    assert_eq!(
        docs,
        [
            ("devices/valve-1/desired", &json!({"open":true})),
            ("devices/valve-1/desired", &json!({"open":false})),
            ("devices/valve-2/desired", &json!({"limit":40})),
        ],
        "a live subscriber gets each change exactly once"
    );

    // A subscriber arriving now gets each device's retained document once, and then nothing.
    let mut late = Device::connect(site.broker.port, "desired-late").await;
    late.client
        .subscribe("devices/+/desired", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut seen = received(&mut late, QUIET).await;
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            (
                "devices/valve-1/desired".to_owned(),
                json!({"open":false}),
                true
            ),
            (
                "devices/valve-2/desired".to_owned(),
                json!({"limit":40}),
                true
            ),
        ],
        "a new subscriber gets the retained document once per device"
    );
    assert_eq!(
        received(&mut early, Duration::from_millis(100)).await,
        [],
        "nothing more reached the first subscriber meanwhile"
    );
    site.gw.stop().await;
}
