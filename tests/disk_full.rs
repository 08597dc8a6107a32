//! A full disk, end to end: the database sits on a 2 MiB tmpfs that fills up mid-stream;
//! once it is enlarged, every message the devices published is stored exactly once, in order
//! per device. Nothing the gateway acknowledged was lost while it could not write.
//!
//! Real: the `nn-gateway` binary, Mosquitto, SQLite on a real (tmpfs) filesystem that returns
//! ENOSPC. Needs root to mount the tmpfs; where mounting is refused it says SKIPPED loudly and
//! passes, or fails where `CI` is set (see `support::skip`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nn_gateway::store::Db;
use support::{
    Device, Mosquitto, Numbered, assert_each_once_in_order, stored_points, wait_for_points,
    wait_subscribed,
};

const MESSAGES: u64 = 4000;
const DEVICES: u64 = 4;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The gateway process, killed however the test ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_and_keeps_order_once_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(dir.path(), "2m") else {
        support::skip(
            "disk_full",
            "cannot mount a tmpfs here (needs root, or CAP_SYS_ADMIN in a container)",
        );
        return;
    };
    let broker = Mosquitto::start();
    let db = dir.path().join("gateway.db");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut gateway = support::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .arg("run")
            .envs([
                ("NNGW_STORAGE__PATH", db.to_str().unwrap()),
                ("NNGW_STORAGE__SYNCHRONOUS", "normal"),
                ("NNGW_MQTT__PORT", &broker.port.to_string()),
                ("NNGW_MQTT__CLIENT_ID", "gw-disk-full"),
                ("NNGW_MQTT__RECONNECT_MIN", "50ms"),
                ("NNGW_MQTT__RECONNECT_MAX", "300ms"),
                ("NNGW_COAP__BIND", "127.0.0.1:0"),
                ("NNGW_API__BIND", "127.0.0.1:0"),
                ("NNGW_LOG__FORMAT", "text"),
            ])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let probe = Device::connect(broker.port, "probe").await;
    wait_subscribed(&probe, &db).await;

    // Publish more than 2 MiB can hold; the broker acknowledges each.
    let padding = format!(r#","pad":"{}""#, "x".repeat(600));
    let stream = Numbered {
        prefix: "full-",
        devices: DEVICES,
        total: MESSAGES,
        extra: &padding,
    };
    let acked = stream.publish(broker.port, "disk-full-devices");
    tokio::time::timeout(Duration::from_secs(60), acked)
        .await
        .unwrap()
        .unwrap();

    // The disk fills: the count stops short of everything.
    let mut last = stored_points(&db);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = stored_points(&db);
        if now == last {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "the store never stopped growing");
    }
    println!("stored before the disk filled: {last} of {MESSAGES}");
    assert!(
        last < MESSAGES,
        "2 MiB held all {MESSAGES} messages; the test needs a fuller disk"
    );
    assert!(
        gateway.0.try_wait().unwrap().is_none(),
        "the daemon must survive a full disk"
    );

    // Space returns: the broker resends what was not acknowledged, in order.
    fs.resize("64m");
    wait_for_points(&db, MESSAGES, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conn = Db::open_readonly(&db).unwrap();
    assert_each_once_in_order(&conn, "full-", DEVICES, MESSAGES);
    drop(conn);
    drop(gateway);
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        text.contains("cannot commit") || text.contains("not stored"),
        "the full disk was not reported:\n{text}"
    );
}
