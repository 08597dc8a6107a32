//! Crash durability: SIGKILL the real binary three times while 20,000 QoS 1 messages flow
//! through a real Mosquitto; afterwards every message is stored exactly once, in order per
//! device.
//!
//! Real: the `nn-gateway` binary (a separate process, killed with SIGKILL), Mosquitto, the
//! SQLite file (synchronous = full, the default). Nothing faked.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nn_gateway::store::Db;
use support::{
    Device, Mosquitto, Numbered, assert_each_once_in_order, stored_points, wait_for_points,
    wait_subscribed,
};

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
    let baseline = stored_points(&db); // The probe's own messages are state, not telemetry.

    // The devices: every message published, each acknowledged by the broker.
    let stream = Numbered {
        prefix: "meter-",
        devices: DEVICES,
        total: MESSAGES,
        extra: "",
    };
    let acked = stream.publish(broker.port, "durability-devices");

    // Kill the gateway with SIGKILL at spread-out points of the stream, restarting it each time.
    for k in 1..=KILLS {
        let target = baseline + (MESSAGES * k as u64) / (KILLS as u64 + 1);
        wait_for_points(&db, target, Duration::from_secs(120)).await;
        gateway.kill().unwrap(); // SIGKILL
        gateway.wait().unwrap();
        gateway = spawn_gateway(&config, &log);
    }
    tokio::time::timeout(Duration::from_secs(120), acked)
        .await
        .unwrap()
        .unwrap();

    wait_for_points(&db, MESSAGES, Duration::from_secs(120)).await;
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
