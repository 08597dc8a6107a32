//! A site for the end-to-end tests of reconciliation and the operator surface: devices on a
//! real Mosquitto, the gateway in process on a real SQLite file, the fake Golioth and fake
//! NetNeural (real HTTP servers) edited the way their operators would, and the real
//! `nn-gateway` binary for the operator's commands. Included by test files that also have
//! `mod fakes; mod support;`.
//!
//! Sync runs are started by hand: the interval is an hour, and `cli::sync_now` signals the
//! daemon (SIGUSR1, to this process: the daemon's lock file holds its pid) and waits for the
//! run's summary, so edits land between runs exactly where a test puts them.

#![allow(dead_code)]

pub mod http;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fakes::rig::{clouds, with_keys};
use crate::fakes::{FakeGolioth, FakeNetNeural};
use crate::support::{Device, Site};

pub const WAIT: Duration = Duration::from_secs(20);

pub struct World {
    pub site: Site,
    pub golioth: FakeGolioth,
    pub nn: FakeNetNeural,
}

pub async fn world(client_id: &str, tweak: impl FnOnce(&mut nn_gateway::config::Config)) -> World {
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    let site = Site::start_with(client_id, |cfg, dir| {
        clouds(cfg, dir, Some(&golioth), Some(&nn));
        cfg.sync.interval = Duration::from_secs(3600);
        tweak(cfg);
        *cfg = with_keys(cfg.clone());
    })
    .await;
    World { site, golioth, nn }
}

/// Polls `check` until it returns `Some`, or panics naming `what`.
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One sync run, started now; returns its summary.
pub async fn sync(db: &Path) -> String {
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || nn_gateway::cli::sync_now(&db, WAIT).unwrap())
        .await
        .unwrap()
}

/// The operator's command, run as the real binary on the daemon's database.
pub fn cli(db: &Path, args: &[&str]) -> (bool, String) {
    let (code, text) = crate::support::nngw(args, &[("NNGW_STORAGE__PATH", db)]);
    (code == Some(0), text)
}

pub fn nn_device<'a>(rows: &'a [Value], hw: &str) -> Option<&'a Value> {
    rows.iter().find(|d| {
        d["hardware_ids"]
            .as_array()
            .is_some_and(|ids| ids.contains(&Value::from(hw)))
    })
}

/// A device that published its state, registered in both clouds; returns (Golioth id,
/// NetNeural id) once a sync run has linked them.
pub async fn registered(w: &World, key: &str) -> (String, String) {
    let dev = w.site.device(&format!("{key}-pub")).await;
    dev.publish(&format!("devices/{key}/state"), r#"{"on":false}"#)
        .await;
    let gid = eventually("registered in Golioth", || {
        w.golioth
            .device_by_hardware_id(key)
            .map(|d| d["id"].as_str().unwrap().to_owned())
    })
    .await;
    let nid = eventually("registered in NetNeural", || {
        nn_device(&w.nn.rows("devices"), key).map(|d| d["id"].as_str().unwrap().to_owned())
    })
    .await;
    // The lanes store the links once the registrations are settled.
    let db = w.site.gw.db.clone();
    eventually("linked in the mirror", || {
        let conn = rusqlite::Connection::open(&db).ok()?;
        conn.query_row(
            "SELECT 1 FROM device WHERE key = ?1 AND golioth_id IS NOT NULL AND netneural_id IS NOT NULL",
            [key],
            |_| Ok(()),
        )
        .ok()
    })
    .await;
    sync(&w.site.gw.db).await;
    (gid, nid)
}

pub fn local_desired(db: &Path, key: &str) -> Option<Value> {
    let conn = rusqlite::Connection::open(db).ok()?;
    conn.query_row(
        "SELECT d.doc FROM desired_state d JOIN device v ON v.id = d.device_id WHERE v.key = ?1",
        [key],
        |r| r.get::<_, String>(0),
    )
    .ok()
    .map(|s| serde_json::from_str(&s).unwrap())
}

pub fn nn_desired(nn: &FakeNetNeural, id: &str) -> Value {
    nn.row("devices", id).unwrap()["metadata"]["desired"].clone()
}

/// The next desired document the device receives on its topic.
pub async fn next_desired(dev: &mut Device) -> Value {
    let p = tokio::time::timeout(WAIT, dev.events.recv())
        .await
        .expect("a desired publish")
        .unwrap();
    serde_json::from_slice(&p.payload).unwrap()
}

pub async fn subscribed(w: &World, key: &str) -> Device {
    let dev = w.site.device(&format!("{key}-sub")).await;
    dev.client
        .subscribe(format!("devices/{key}/desired"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    dev
}

/// What the gateway's CoAP resource says the device's desired document is.
pub async fn coap_desired(w: &World, key: &str) -> Value {
    let uri = format!("coap://127.0.0.1:{}/d/{key}/desired", w.site.gw.coap_port);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("coap-client-notls")
            .args(["-m", "get", "-B", "5", &uri])
            .output()
            .expect("coap-client-notls (libcoap3-bin) installed")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// Makes a conflict on `/desired/led`: the same field edited in both clouds between two runs.
pub async fn conflict(w: &World, key: &str) -> (String, String) {
    let (gid, nid) = registered(w, key).await;
    let (ok, out) = cli(&w.site.gw.db, &["desired", "set", key, r#"{"led":"off"}"#]);
    assert!(ok, "{out}");
    sync(&w.site.gw.db).await;
    w.golioth.set_state(&gid, "desired", json!({"led": "red"}));
    let mut metadata = w.nn.row("devices", &nid).unwrap()["metadata"].clone();
    metadata["desired"] = json!({"led": "blue"});
    w.nn.edit_device(&nid, json!({ "metadata": metadata }));
    sync(&w.site.gw.db).await;
    (gid, nid)
}

pub fn pending_conflicts(db: &Path) -> Vec<Value> {
    let (ok, out) = cli(db, &["conflicts", "--json"]);
    assert!(ok, "{out}");
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}
