//! A revoked key, fixed in its file and re-read on a real SIGHUP by the real binary.
//!
//! Real: the `nn-gateway` binary, Mosquitto, the SQLite file, the signal. Faked: NetNeural
//! (`tests/fakes`, a real HTTP server in this process).

mod fakes;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fakes::{FakeNetNeural, Match};
use nn_gateway::health::LaneState;
use nn_gateway::model::Target;
use support::{Device, KillOnDrop, Mosquitto, Numbered, wait_for, wait_subscribed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_a_fixed_key_file_and_the_paused_lane_resumes() {
    let nn = FakeNetNeural::start().await;
    nn.set_key("the-new-key");
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let key = dir.path().join("netneural.key");
    std::fs::write(&key, "the-revoked-key\n").unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let port = broker.port.to_string();
    let daemon = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .arg("run")
            .envs([
                ("NNGW_STORAGE__PATH", db.to_str().unwrap()),
                ("NNGW_STORAGE__SYNCHRONOUS", "normal"),
                ("NNGW_MQTT__PORT", port.as_str()),
                ("NNGW_MQTT__CLIENT_ID", "gw-sighup"),
                ("NNGW_COAP__BIND", "127.0.0.1:0"),
                ("NNGW_LOG__FORMAT", "text"),
                ("NNGW_NETNEURAL__ENABLED", "true"),
                ("NNGW_NETNEURAL__URL", &nn.url()),
                (
                    "NNGW_NETNEURAL__ORGANIZATION_ID",
                    "00000000-0000-4000-8000-000000000001",
                ),
                (
                    "NNGW_NETNEURAL__INTEGRATION_ID",
                    "00000000-0000-4000-8000-000000000002",
                ),
                ("NNGW_NETNEURAL__API_KEY_FILE", key.to_str().unwrap()),
                ("NNGW_NETNEURAL__RETRY_MIN", "100ms"),
                ("NNGW_NETNEURAL__RETRY_MAX", "1s"),
            ])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let dev = Device::connect(broker.port, "sighup-dev").await;
    wait_subscribed(&dev, &db).await;
    Numbered {
        prefix: "h-",
        devices: 2,
        total: 100,
        extra: "",
    }
    .publish(broker.port, "sighup-devices")
    .await
    .unwrap();

    wait_for(&db, Duration::from_secs(20), |db| {
        let beat = db.status().ok()?.daemon?;
        (beat.clouds.get(&Target::NetNeural)?.state == LaneState::AuthFailed).then_some(())
    })
    .await;
    let mark = nn.faults().mark();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        nn.faults().count_since(mark, &Match::any()) <= 1,
        "a lane whose key was refused waits for a new one"
    );

    std::fs::write(&key, "the-new-key\n").unwrap();
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while nn.count("device_telemetry_history") < 100 {
        assert!(
            Instant::now() < deadline,
            "telemetry not delivered after SIGHUP; log:\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains("API key re-read"), "{text}");
    assert!(
        !text.contains("the-revoked-key") && !text.contains("the-new-key"),
        "a key reached the log:\n{text}"
    );
    drop(daemon);
}
