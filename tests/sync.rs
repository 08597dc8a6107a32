//! Reconciliation end to end: devices on a real Mosquitto, the gateway in process on a real
//! SQLite file, the fake Golioth and fake NetNeural (real HTTP servers) edited the way their
//! operators would, and the real `nn-gateway` binary for the operator's commands.
//!
//! Sync runs are started by hand: the interval is an hour, and `cli::sync_now` signals the
//! daemon (SIGUSR1, to this process: the daemon's lock file holds its pid) and waits for the
//! run's summary, so edits land between runs exactly where a test puts them.

mod fakes;
mod support;
mod world;

use std::time::Duration;

use fakes::rig::INTEGRATION;
use serde_json::{Value, json};
use world::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_value_set_in_golioth_reaches_the_device_over_mqtt_and_coap_and_netneural() {
    let w = world("gw-sync-down", |_| {}).await;
    let (gid, nid) = registered(&w, "lamp-1").await;
    let mut dev = subscribed(&w, "lamp-1").await;

    w.golioth
        .set_state(&gid, "desired", json!({"led": "on", "cfg": {"every": 30}}));
    sync(&w.site.gw.db).await;

    let want = json!({"led": "on", "cfg": {"every": 30}});
    assert_eq!(next_desired(&mut dev).await, want, "over MQTT");
    assert_eq!(coap_desired(&w, "lamp-1").await, want, "over CoAP");
    assert_eq!(nn_desired(&w.nn, &nid), want, "in NetNeural");
    assert_eq!(local_desired(&w.site.gw.db, "lamp-1"), Some(want.clone()));

    // Published once: more runs with nothing new publish nothing and write nowhere.
    let (g0, n0) = (w.golioth.faults().counts(), w.nn.faults().counts());
    sync(&w.site.gw.db).await;
    sync(&w.site.gw.db).await;
    let (g1, n1) = (w.golioth.faults().counts(), w.nn.faults().counts());
    assert_eq!(
        (g1.writes, n1.writes),
        (g0.writes, n0.writes),
        "quiet runs only read"
    );
    assert!(
        g1.reads > g0.reads && n1.reads > n0.reads,
        "quiet runs still read"
    );
    let again = tokio::time::timeout(Duration::from_millis(700), dev.events.recv()).await;
    assert!(again.is_err(), "published again: {again:?}");
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_edit_is_pushed_to_both_clouds_and_an_edit_in_netneural_reaches_golioth() {
    let w = world("gw-sync-up", |_| {}).await;
    let (gid, nid) = registered(&w, "lamp-2").await;

    let (ok, out) = cli(
        &w.site.gw.db,
        &["desired", "set", "lamp-2", r#"{"led":"off"}"#],
    );
    assert!(ok, "{out}");
    sync(&w.site.gw.db).await;
    assert_eq!(
        w.golioth.state(&gid, "desired"),
        Some(json!({"led": "off"}))
    );
    assert_eq!(nn_desired(&w.nn, &nid), json!({"led": "off"}));

    // Edited in NetNeural (its other metadata kept), the mirror is the hub: Golioth gets it.
    let mut metadata = w.nn.row("devices", &nid).unwrap()["metadata"].clone();
    metadata["desired"] = json!({"led": "blink"});
    metadata["note"] = json!("set by NetNeural's UI");
    w.nn.edit_device(&nid, json!({"metadata": metadata, "name": "Lamp two"}));
    sync(&w.site.gw.db).await;
    assert_eq!(
        w.golioth.state(&gid, "desired"),
        Some(json!({"led": "blink"}))
    );
    assert_eq!(w.golioth.device(&gid).unwrap()["name"], "Lamp two");
    assert_eq!(
        local_desired(&w.site.gw.db, "lamp-2"),
        Some(json!({"led": "blink"}))
    );
    let row = w.nn.row("devices", &nid).unwrap();
    assert_eq!(row["metadata"]["note"], "set by NetNeural's UI");
    assert!(
        row["metadata"]["reported"].is_object(),
        "the uplink's key kept: {row}"
    );
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_made_in_both_clouds_is_listed_and_its_cli_resolution_lands_everywhere() {
    let w = world("gw-sync-conflict", |_| {}).await;
    let mut dev = subscribed(&w, "lamp-3").await;
    let (gid, nid) = conflict(&w, "lamp-3").await;

    let pending = pending_conflicts(&w.site.gw.db);
    assert_eq!(pending.len(), 1, "one conflict: {pending:#?}");
    let c = &pending[0];
    assert_eq!(c["field"], "/desired/led");
    assert_eq!(c["base"], "off");
    let sides = [c["local"].clone(), c["remote"].clone()];
    assert!(
        sides.contains(&json!("red")) && sides.contains(&json!("blue")),
        "{c}"
    );
    // Held: neither cloud was overwritten.
    assert_eq!(
        w.golioth.state(&gid, "desired"),
        Some(json!({"led": "red"}))
    );
    assert_eq!(nn_desired(&w.nn, &nid), json!({"led": "blue"}));
    // And NetNeural was told.
    let remote = eventually("the conflict in NetNeural's device_conflicts", || {
        w.nn.conflicts()
            .into_iter()
            .find(|r| r["field_name"] == "/desired/led")
    })
    .await;
    assert_eq!(remote["resolution_status"], "pending");
    assert_eq!(remote["device_id"], nid.as_str());

    let id = c["id"].as_i64().unwrap().to_string();
    let (ok, out) = cli(
        &w.site.gw.db,
        &["conflicts", "resolve", &id, "--value", r#""green""#],
    );
    assert!(ok, "{out}");
    assert!(out.contains("resolved"), "{out}");
    // The CLI asked the daemon for a run; wait for its effects, then one more run.
    eventually("the resolution in Golioth", || {
        (w.golioth.state(&gid, "desired") == Some(json!({"led": "green"}))).then_some(())
    })
    .await;
    sync(&w.site.gw.db).await;
    assert_eq!(nn_desired(&w.nn, &nid), json!({"led": "green"}));
    let row =
        w.nn.conflicts()
            .into_iter()
            .find(|r| r["field_name"] == "/desired/led")
            .unwrap();
    assert_eq!(row["resolution_status"], "resolved");
    assert_eq!(row["resolved_value"], "green");
    let mut seen = Vec::new();
    while seen.last() != Some(&json!({"led": "green"})) {
        seen.push(next_desired(&mut dev).await);
    }
    assert!(pending_conflicts(&w.site.gw.db).is_empty());
    let (ok, out) = cli(
        &w.site.gw.db,
        &["conflicts", "resolve", &id, "--use", "local"],
    );
    assert!(!ok && out.contains("already resolved"), "{out}");
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_resolved_in_netneural_is_honoured() {
    let w = world("gw-sync-nnres", |_| {}).await;
    let (gid, nid) = conflict(&w, "lamp-4").await;
    let remote = eventually("the conflict in NetNeural", || {
        w.nn.conflicts()
            .into_iter()
            .find(|r| r["field_name"] == "/desired/led")
    })
    .await;
    w.nn.resolve_conflict(remote["id"].as_str().unwrap(), json!("amber"), "ops@site");
    sync(&w.site.gw.db).await;
    assert_eq!(
        local_desired(&w.site.gw.db, "lamp-4"),
        Some(json!({"led": "amber"}))
    );
    assert_eq!(
        w.golioth.state(&gid, "desired"),
        Some(json!({"led": "amber"}))
    );
    assert_eq!(nn_desired(&w.nn, &nid), json!({"led": "amber"}));
    let (ok, out) = cli(&w.site.gw.db, &["conflicts", "--all", "--json"]);
    assert!(ok, "{out}");
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["status"], "resolved");
    assert_eq!(all[0]["resolved_by"], "netneural:ops@site");
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_wins_settles_a_conflict_and_records_it() {
    let w = world("gw-sync-rw", |cfg| {
        cfg.sync.conflict_strategy =
            nn_gateway::config::StrategySetting(nn_gateway::reconcile::Strategy::RemoteWins);
    })
    .await;
    let (gid, nid) = conflict(&w, "lamp-5").await;
    sync(&w.site.gw.db).await;
    let g = w.golioth.state(&gid, "desired");
    let n = nn_desired(&w.nn, &nid);
    assert_eq!(g, Some(n.clone()), "both clouds agree");
    assert_eq!(local_desired(&w.site.gw.db, "lamp-5"), Some(n));
    let (_, out) = cli(&w.site.gw.db, &["conflicts", "--all", "--json"]);
    let all: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["status"], "auto_resolved");
    assert_eq!(all[0]["strategy"], "remote_wins");
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_assignment_keeps_netneural_edits_out_of_the_mirror() {
    let w = world("gw-sync-dir", |_| {}).await;
    let (gid, nid) = registered(&w, "lamp-6").await;
    w.nn.seed_assignment(&nid, INTEGRATION, &gid, "import");
    let mut metadata = w.nn.row("devices", &nid).unwrap()["metadata"].clone();
    metadata["desired"] = json!({"led": "nn-only"});
    w.nn.edit_device(&nid, json!({ "metadata": metadata }));
    sync(&w.site.gw.db).await;
    assert_eq!(local_desired(&w.site.gw.db, "lamp-6"), None);
    assert_eq!(w.golioth.state(&gid, "desired"), None);
    // Data still flows into NetNeural: a Golioth edit overwrites NetNeural's.
    w.golioth
        .set_state(&gid, "desired", json!({"led": "from-golioth"}));
    sync(&w.site.gw.db).await;
    assert_eq!(nn_desired(&w.nn, &nid), json!({"led": "from-golioth"}));
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_new_in_a_cloud_are_imported_and_removed_ones_are_marked_and_kept() {
    let w = world("gw-sync-import", |_| {}).await;
    let gid = w.golioth.create_device("pump-9", &["pump-9"]);
    w.golioth.set_state(&gid, "desired", json!({"speed": 3}));
    w.golioth
        .create_device("other-site-pump", &["elsewhere:pump-1"]);
    sync(&w.site.gw.db).await;
    let (ok, out) = cli(&w.site.gw.db, &["devices", "--json"]);
    assert!(ok, "{out}");
    let devices: Vec<Value> = serde_json::from_str(&out).unwrap();
    let pump = devices
        .iter()
        .find(|d| d["key"] == "pump-9")
        .expect("imported");
    assert_eq!(pump["origin"], "golioth");
    assert_eq!(pump["desired"], json!({"speed": 3}));
    // Its desired state waits for it as a retained message.
    let mut dev = subscribed(&w, "pump-9").await;
    assert_eq!(next_desired(&mut dev).await, json!({"speed": 3}));

    w.golioth.delete_device(&gid);
    sync(&w.site.gw.db).await;
    let conn = rusqlite::Connection::open(&w.site.gw.db).unwrap();
    let removed: Option<i64> = conn
        .query_row(
            "SELECT golioth_removed_at FROM device WHERE key = 'pump-9'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(removed.is_some(), "marked removed in Golioth");
    assert_eq!(
        local_desired(&w.site.gw.db, "pump-9"),
        Some(json!({"speed": 3})),
        "its data kept"
    );
    let (_, log) = cli(&w.site.gw.db, &["sync-log", "--json"]);
    let log: Vec<Value> = serde_json::from_str(&log).unwrap();
    assert!(
        log.iter()
            .any(|r| r["operation"] == "removed" && r["device"] == "pump-9"),
        "{log:#?}"
    );
    w.site.gw.stop().await;
}
