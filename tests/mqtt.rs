//! MQTT ingest and downlink end to end.
//!
//! Real: Mosquitto (started per test on a free port), the gateway's daemon (in process, CoAP on
//! port 0), rumqttc clients standing in for devices, the SQLite file. Faked: nothing; the
//! clouds are off, so outbox rows wait, which is the offline case.

mod support;

use std::time::Duration;

use nn_gateway::model::DeviceKey;
use nn_gateway::store::Db;
use serde_json::{Value, json};
use support::{
    Device, Gateway, Mosquitto, Site, cbor, config, reported, wait_for, wait_subscribed,
};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_patches_in_json_and_cbor_merge_into_one_document() {
    let site = Site::start("gw-state").await;
    let dev = site.device("dev-state").await;

    dev.publish(
        "devices/th-1/state",
        br#"{"temp":21.5,"fw":"1.0","nested":{"a":1,"b":2}}"#.to_vec(),
    )
    .await;
    dev.publish(
        "devices/th-1/state",
        cbor(&json!({"fw":"1.1","nested":{"b":null,"c":3}})),
    )
    .await;

    let want = json!({"temp":21.5,"fw":"1.1","nested":{"a":1,"c":3}});
    let got = wait_for(&site.gw.db, WAIT, |db| {
        reported(db, "th-1").filter(|doc| *doc == want)
    })
    .await;
    assert_eq!(got, want);
    site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_points_in_json_and_cbor_are_stored_in_order_and_owed_to_netneural() {
    // A cloud that takes telemetry (unreachable here), so the points are owed to it.
    let site = Site::start_with("gw-telemetry", |cfg, dir| {
        let key = dir.join("nn.key");
        std::fs::write(&key, "test-key\n").unwrap();
        cfg.netneural.enabled = true;
        cfg.netneural.url = Some("http://127.0.0.1:9".parse().unwrap());
        cfg.netneural.api_key_file = Some(key);
    })
    .await;
    let dev = site.device("dev-telemetry").await;

    dev.publish(
        "devices/m-1/telemetry",
        br#"{"kwh":1,"ts":1700000000000}"#.to_vec(),
    )
    .await;
    dev.publish(
        "devices/m-1/telemetry",
        cbor(&json!([{"kwh":2},{"kwh":3,"ts":"2023-11-14T22:13:20Z"}])),
    )
    .await;
    dev.publish("devices/m-1/telemetry", br#"[{"kwh":4}]"#.to_vec())
        .await;

    let key = DeviceKey::parse("m-1").unwrap();
    let points = wait_for(&site.gw.db, WAIT, |db| {
        db.telemetry_payloads(&key).ok().filter(|p| p.len() == 4)
    })
    .await;
    assert_eq!(
        points,
        vec![
            json!({"kwh":1}),
            json!({"kwh":2}),
            json!({"kwh":3}),
            json!({"kwh":4})
        ]
    );
    let status = Db::open_readonly(&site.gw.db).unwrap().status().unwrap();
    let pending: i64 = status
        .outbox
        .iter()
        .filter(|c| c.target == "netneural" && c.state == "pending")
        .map(|c| c.rows)
        .sum();
    // Telemetry is owed through NetNeural's cursor, not through rows: the one row is the
    // probe device's reported state.
    assert_eq!(pending, 1, "{:?}", status.outbox);
    assert_eq!(status.telemetry_backlog, [("netneural".to_owned(), 4)]);
    site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_rejected_visibly_and_do_not_block_the_ones_behind() {
    let site = Site::start_with("gw-reject", |cfg, _| cfg.mqtt.max_message_size = 1024).await;
    let dev = site.device("dev-reject").await;

    dev.publish("devices/bad-1/state", b"{not json".to_vec())
        .await;
    dev.publish("devices/bad-1/telemetry", br#"[{"v":1},"oops"]"#.to_vec())
        .await;
    dev.publish("devices/bad key/state", br#"{"a":1}"#.to_vec())
        .await;
    dev.publish("devices/big-1/state", vec![b' '; 4096]).await;
    dev.publish("devices/good-1/state", br#"{"ok":true}"#.to_vec())
        .await;

    wait_for(&site.gw.db, WAIT, |db| reported(db, "good-1")).await;
    let rejected = wait_for(&site.gw.db, WAIT, |db| {
        db.rejected(10).ok().filter(|r| r.len() == 4)
    })
    .await;
    let reasons: Vec<&str> = rejected.iter().rev().map(|r| r.reason.as_str()).collect();
    assert!(reasons[0].contains("invalid JSON"), "{reasons:?}");
    assert!(reasons[1].contains("point 1 is a string"), "{reasons:?}");
    assert!(reasons[2].contains("contains ' '"), "{reasons:?}");
    assert!(
        reasons[3].contains("limit (mqtt.max_message_size) is 1024"),
        "{reasons:?}"
    );
    assert_eq!(rejected.last().unwrap().device.as_deref(), Some("bad-1"));
    let status = Db::open_readonly(&site.gw.db).unwrap().status().unwrap();
    assert_eq!(status.rejected_total, 4);
    assert_eq!(
        status.devices, 2,
        "rejected messages create no device (good-1 and the probe)"
    );
    site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_edit_reaches_a_subscriber_as_a_retained_message() {
    let site = Site::start("gw-desired").await;

    // The operator's edit, made the way `nn-gateway desired set` makes it (another connection).
    let out =
        nn_gateway::cli::set_desired(&site.gw.db, "valve-7", r#"{"open":true,"limit":40}"#, true)
            .unwrap();
    assert!(out.contains("version 1"), "{out}");

    // Published retained: a subscriber that arrives later still gets it.
    let db = site.gw.db.clone();
    wait_for(&db, WAIT, |db| {
        db.status()
            .ok()
            .filter(|s| s.desired_unpublished == 0 && s.devices == 1)
    })
    .await;
    let mut dev = Device::connect(site.broker.port, "valve-7-client").await;
    dev.client
        .subscribe("devices/valve-7/desired", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let msg = tokio::time::timeout(WAIT, dev.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(msg.retain);
    assert_eq!(
        serde_json::from_slice::<Value>(&msg.payload).unwrap(),
        json!({"open":true,"limit":40})
    );

    // A second edit reaches the live subscriber.
    nn_gateway::cli::set_desired(&site.gw.db, "valve-7", r#"{"open":false}"#, true).unwrap();
    let msg = tokio::time::timeout(WAIT, dev.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&msg.payload).unwrap(),
        json!({"open":false})
    );
    site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), broker.port, "gw-shutdown");
    let gw = Gateway::start(cfg.clone()).await;
    let dev = Device::connect(broker.port, "dev-shutdown").await;
    wait_subscribed(&dev, &gw.db).await;

    const N: usize = 3000;
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            dev.publish("devices/cnt-1/telemetry", format!(r#"{{"n":{i}}}"#))
                .await;
        }
        dev
    });
    let key = DeviceKey::parse("cnt-1").unwrap();
    // Stop while messages are flowing.
    wait_for(&gw.db, WAIT, |db| {
        db.telemetry_payloads(&key).ok().filter(|p| p.len() >= 200)
    })
    .await;
    gw.stop().await;
    let _dev = publisher.await.unwrap();

    // Whatever was not acknowledged is still at the broker and arrives after the restart.
    let gw = Gateway::start(cfg).await;
    let points = wait_for(&gw.db, Duration::from_secs(30), |db| {
        db.telemetry_payloads(&key).ok().filter(|p| p.len() >= N)
    })
    .await;
    let numbers: Vec<u64> = points.iter().map(|p| p["n"].as_u64().unwrap()).collect();
    assert_eq!(
        numbers,
        (0..N as u64).collect::<Vec<_>>(),
        "every message once, in order"
    );
    // A clean stop acknowledged everything it stored, and the broker read those PUBACKs.
    let resent = Db::open_readonly(&gw.db)
        .unwrap()
        .status()
        .unwrap()
        .redeliveries_total;
    assert_eq!(resent, 0, "the broker resent {resent} stored messages");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_edits_made_while_the_broker_is_down_are_published_when_it_comes_up() {
    let port = support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(config(dir.path(), port, "gw-late-broker")).await;
    for d in 0..3 {
        nn_gateway::cli::set_desired(
            &gw.db,
            &format!("late-{d}"),
            &format!(r#"{{"d":{d}}}"#),
            true,
        )
        .unwrap();
    }
    // Several downlink passes find no broker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unpublished = Db::open_readonly(&gw.db)
        .unwrap()
        .status()
        .unwrap()
        .desired_unpublished;
    assert_eq!(unpublished, 3);

    let broker = Mosquitto::start_on(port);
    wait_for(&gw.db, Duration::from_secs(15), |db| {
        db.status().ok().filter(|s| s.desired_unpublished == 0)
    })
    .await;
    let mut dev = Device::connect(broker.port, "late-reader").await;
    dev.client
        .subscribe("devices/+/desired", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(WAIT, dev.events.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(msg.retain);
        seen.push(msg.topic);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "devices/late-0/desired",
            "devices/late-1/desired",
            "devices/late-2/desired"
        ]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_wants_a_password_gets_the_one_from_the_secret() {
    let broker = Mosquitto::start_with_password("gateway", "pa55-word");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-password");
    cfg.mqtt.username = Some("gateway".into());
    cfg.mqtt.password = Some(nn_gateway::config::Secret::new("pa55-word"));
    let gw = Gateway::start(cfg).await;

    let mut opts = rumqttc::MqttOptions::new("dev-password", "127.0.0.1", broker.port);
    opts.set_credentials("gateway", "pa55-word");
    let dev = Device::connect_with(opts).await;
    wait_subscribed(&dev, &gw.db).await;
    dev.publish("devices/locked-1/state", br#"{"ok":1}"#.to_vec())
        .await;
    wait_for(&gw.db, WAIT, |db| reported(db, "locked-1")).await;
    gw.stop().await;
}

#[test]
fn a_refused_password_is_reported_once_as_a_refusal_without_the_password() {
    let broker = Mosquitto::start_with_password("gateway", "right-one");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("mqtt-password");
    std::fs::write(&secret, "wr0ng-pa55\n").unwrap();
    let db = dir.path().join("g.db");
    let port = broker.port.to_string();
    let (_, log) = support::run_daemon_binary_for(
        &[
            ("NNGW_STORAGE__PATH", db.to_str().unwrap()),
            ("NNGW_MQTT__PORT", &port),
            ("NNGW_MQTT__USERNAME", "gateway"),
            ("NNGW_MQTT__PASSWORD_FILE", secret.to_str().unwrap()),
            ("NNGW_MQTT__RECONNECT_MIN", "10ms"),
            ("NNGW_MQTT__RECONNECT_MAX", "50ms"),
            ("NNGW_COAP__BIND", "127.0.0.1:0"),
            ("NNGW_API__BIND", "127.0.0.1:0"),
        ],
        Duration::from_millis(1500),
    );
    assert_eq!(
        log.matches("broker refused the connection").count(),
        1,
        "{log}"
    );
    assert!(log.contains("mqtt.username"), "{log}");
    assert!(!log.contains("wr0ng"), "the password leaked: {log}");
}
