//! Crash durability: SIGKILL the real binary three times while 20,000 QoS 1 messages flow
//! through a real Mosquitto; afterwards every message is stored exactly once, in order per
//! device.
//!
//! Real: the `nn-gateway` binary (a separate process, killed with SIGKILL), Mosquitto, the
//! SQLite file (synchronous = full, the default). Nothing faked.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nn_gateway::store::Db;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::{Device, Mosquitto, assert_each_once_in_order, wait_subscribed};

const MESSAGES: u64 = 20_000;
const DEVICES: u64 = 4;
const KILLS: usize = 3;

fn spawn_gateway(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", "nn_gateway=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn stored(db: &std::path::Path) -> usize {
    Db::open_readonly(db)
        .and_then(|d| d.status())
        .map_or(0, |s| s.telemetry_points as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_mid_stream_loses_nothing_and_duplicates_nothing() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let config = dir.path().join("gateway.toml");
    let log = dir.path().join("gateway.log");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = {:?}\n[mqtt]\nport = {}\nclient_id = \"gw-durability\"\n\
             reconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[coap]\nbind = \"127.0.0.1:0\"\n",
            db.display().to_string(),
            broker.port
        ),
    )
    .unwrap();
    let mut gateway = spawn_gateway(&config, &log);
    let probe = Device::connect(broker.port, "probe").await;
    wait_subscribed(&probe, &db).await;
    let baseline = stored(&db); // The probe's own messages are state, not telemetry.

    // The devices: publish every message and wait for the broker's PUBACK of each.
    let mut opts = MqttOptions::new("durability-devices", "127.0.0.1", broker.port);
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let acked = tokio::spawn(async move {
        let mut acks = 0;
        while acks < MESSAGES {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acks += 1,
                Ok(_) => {}
                Err(e) => panic!("test publisher lost the broker: {e}"),
            }
        }
    });
    tokio::spawn(async move {
        for i in 0..MESSAGES {
            let topic = format!("devices/meter-{}/telemetry", i % DEVICES);
            client
                .publish(topic, QoS::AtLeastOnce, false, format!(r#"{{"n":{i}}}"#))
                .await
                .unwrap();
        }
        client
    });

    // Kill the gateway with SIGKILL at spread-out points of the stream, restarting it each time.
    for k in 1..=KILLS {
        let target = baseline + (MESSAGES as usize * k) / (KILLS + 1);
        let deadline = Instant::now() + Duration::from_secs(120);
        while stored(&db) < target {
            assert!(
                Instant::now() < deadline,
                "stuck below {target} stored; log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gateway.kill().unwrap(); // SIGKILL
        gateway.wait().unwrap();
        gateway = spawn_gateway(&config, &log);
    }
    tokio::time::timeout(Duration::from_secs(120), acked)
        .await
        .unwrap()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    while stored(&db) < MESSAGES as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {MESSAGES} stored",
            stored(&db)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give late duplicates, if any, the time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill().unwrap();
    gateway.wait().unwrap();

    let conn = Db::open_readonly(&db).unwrap();
    assert_each_once_in_order(&conn, "meter-", DEVICES, MESSAGES);
    // Whether a kill caught messages between commit and PUBACK is up to timing (usually
    // yes); the broker can resend at most a window of them per kill.
    let redeliveries = conn.status().unwrap().redeliveries_total;
    let bound = (KILLS * nn_gateway::mqtt::WINDOW) as i64;
    println!("redeliveries recognised: {redeliveries}");
    assert!(
        redeliveries <= bound,
        "{redeliveries} redeliveries, more than {bound}"
    );
}
