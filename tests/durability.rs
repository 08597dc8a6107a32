//! Crash durability: SIGKILL the real binary while QoS 1 messages flow through a real
//! Mosquitto (three times during 20,000 messages from one publisher; once during 40,000 from
//! four, when Mosquitto falls far behind reading our PUBACKs); afterwards every message is
//! stored exactly once, in order per device.
//!
//! Real: the `nn-gateway` binary (a separate process, killed with SIGKILL), Mosquitto, the
//! SQLite file (synchronous = full, the default). Nothing faked.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nn_gateway::store::Db;
use support::{
    Device, Mosquitto, Numbered, assert_each_once_in_order, stored_points, wait_for_points,
    wait_subscribed,
};

const MESSAGES: u64 = 20_000;
const DEVICES: u64 = 4;
const KILLS: usize = 3;

/// The gateway binary as a child process, killed (SIGKILL) on drop so that a failing test
/// does not leave it running.
struct GatewayProcess {
    child: support::KillOnDrop,
}

impl GatewayProcess {
    fn spawn(config: &Path, log: &Path) -> GatewayProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "nn_gateway=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        GatewayProcess {
            child: support::KillOnDrop(child),
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(&mut self) {
        self.child.kill();
    }
}

/// A configuration for the binary: the database in `dir`, the broker on `port`.
fn write_config(dir: &Path, port: u16, client_id: &str) -> (PathBuf, PathBuf) {
    let db = dir.join("gateway.db");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = {:?}\n[mqtt]\nport = {port}\nclient_id = \"{client_id}\"\n\
             reconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[coap]\nbind = \"127.0.0.1:0\"\n[api]\nbind = \"127.0.0.1:0\"\n",
            db.display().to_string(),
        ),
    )
    .unwrap();
    (db, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_mid_stream_loses_nothing_and_duplicates_nothing() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (db, config) = write_config(dir.path(), broker.port, "gw-durability");
    let log = dir.path().join("gateway.log");
    let mut gateway = GatewayProcess::spawn(&config, &log);
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
        gateway.kill();
        gateway = GatewayProcess::spawn(&config, &log);
    }
    tokio::time::timeout(Duration::from_secs(120), acked)
        .await
        .unwrap()
        .unwrap();

    wait_for_points(&db, MESSAGES, Duration::from_secs(120)).await;
    // Give late duplicates, if any, the time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill();

    let conn = Db::open_readonly(&db).unwrap();
    assert_each_once_in_order(&conn, "meter-", DEVICES, MESSAGES);
    // How many stored messages a kill leaves for the broker to resend is up to timing: those
    // committed but not yet acknowledged (at most the window) and those whose PUBACK the broker
    // had not read yet (the kernel discards them with the RST of a killed process).
    let redeliveries = conn.status().unwrap().redeliveries_total;
    println!("redeliveries recognised: {redeliveries}");
}

/// Under four publishers Mosquitto reads our PUBACKs far slower than it sends (measured:
/// 5,408 read of 21,726 sent), so a SIGKILL leaves well over 8,192 stored messages for it to
/// resend: more than the recognition span once was, when every one of them was stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_four_publishers_flood_the_broker_duplicates_nothing() {
    const PUBLISHERS: [&str; 4] = ["ka-", "kb-", "kc-", "kd-"];
    const EACH: u64 = 10_000;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (db, config) = write_config(dir.path(), broker.port, "gw-flood-kill");
    let log = dir.path().join("gateway.log");
    let mut gateway = GatewayProcess::spawn(&config, &log);
    let probe = Device::connect(broker.port, "probe").await;
    wait_subscribed(&probe, &db).await;
    let baseline = stored_points(&db);
    let total = EACH * PUBLISHERS.len() as u64;

    let publishers: Vec<_> = PUBLISHERS
        .iter()
        .map(|prefix| {
            Numbered {
                prefix,
                devices: 2,
                total: EACH,
                extra: "",
            }
            .publish(broker.port, &format!("{prefix}publisher"))
        })
        .collect();
    wait_for_points(&db, baseline + total / 2, Duration::from_secs(120)).await;
    gateway.kill();
    let at_kill = stored_points(&db);
    gateway = GatewayProcess::spawn(&config, &log);
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(120), p)
            .await
            .unwrap()
            .unwrap();
    }
    wait_for_points(&db, baseline + total, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.kill();

    let conn = Db::open_readonly(&db).unwrap();
    let status = conn.status().unwrap();
    println!(
        "stored at the kill: {at_kill}; redeliveries recognised: {}",
        status.redeliveries_total
    );
    assert_eq!(
        status.telemetry_points as u64,
        baseline + total,
        "rows stored for {total} messages"
    );
    for prefix in PUBLISHERS {
        assert_each_once_in_order(&conn, prefix, 2, EACH);
    }
}
