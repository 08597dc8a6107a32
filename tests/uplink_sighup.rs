//! A revoked key, fixed in its file and re-read on a real SIGHUP by the real binary.
//!
//! Real: the `nn-gateway` binary, Mosquitto, the SQLite file, the signal. Faked: NetNeural
//! (`tests/fakes`, a real HTTP server in this process).

mod fakes;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use fakes::{FakeNetNeural, Match, rig};
use nn_gateway::health::LaneState;
use nn_gateway::model::Target;
use support::{Device, Mosquitto, Numbered, wait_for, wait_subscribed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_a_fixed_key_file_and_the_paused_lane_resumes() {
    let nn = FakeNetNeural::start().await;
    nn.set_key("the-new-key");
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    // The rig writes the key file with the fake's default key, which the fake no longer takes.
    let env = rig::environment(dir.path(), &db, broker.port, None, Some(&nn));
    let key = dir.path().join("netneural.key");
    let daemon = rig::Daemon::start(&env, &dir.path().join("daemon.log"));
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
    let pid = daemon.pid().to_string();
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
            daemon.logged()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = daemon.logged();
    assert!(text.contains("API key re-read"), "{text}");
    assert!(
        !text.contains(fakes::netneural::DEFAULT_KEY) && !text.contains("the-new-key"),
        "a key reached the log:\n{text}"
    );
    drop(daemon);
}
