//! The operator's view, through the real `nn-gateway` binary: `check-config`, `status`,
//! `devices`, `desired set` reaching a real MQTT subscriber and a real CoAP observer, and a
//! daemon left without a broker.
//!
//! Real: the binary, Mosquitto, libcoap's `coap-client-notls`, the SQLite file. Faked: nothing.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Device, Site, free_port, wait_for};

fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    support::output_text(out)
}

#[test]
fn check_config_names_the_file_and_key_of_a_mistake_and_exits_with_ex_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[mqtt]\nport = 1883\n[coap]\nbnid = \"0.0.0.0:5683\"\n",
    )
    .unwrap();
    let out = gateway(&["check-config", "-c", file.to_str().unwrap()], &[]);
    // EX_CONFIG, which the unit names in RestartPreventExitStatus=.
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains(file.to_str().unwrap()) && msg.contains("bnid") && msg.contains("coap"),
        "{msg}"
    );

    let out = gateway(&["check-config"], &[("NNGW_MQTT__PORT", "many")]);
    assert_eq!(out.status.code(), Some(78));
    // `run` exits the same way, before binding anything.
    let run = gateway(&["run"], &[("NNGW_MQTT__PORT", "many")]);
    assert_eq!(run.status.code(), Some(78), "{}", text(&run));
    assert!(
        text(&out).contains("mqtt.port") && text(&out).contains("many"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("golioth.key");
    std::fs::write(&key, "sup3r-s3cret-golioth-key\n").unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[golioth]\nenabled = true\nproject_id = \"site-1\"\napi_key_file = {:?}\n",
            key.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = gateway(
        &["check-config", "-c", file.to_str().unwrap()],
        &[("NNGW_MQTT__PORT", "18830")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(!shown.contains("sup3r-s3cret"), "the key leaked:\n{shown}");
    // The file it comes from, never the value, and no key the loader would refuse.
    assert!(shown.contains("api_key_file = "), "{shown}");
    assert!(!shown.contains("api_key = "), "{shown}");
    assert!(
        shown.contains("port = 18830"),
        "environment applied:\n{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_devices_show_what_arrived_while_the_daemon_runs() {
    let site = Site::start("gw-operator").await;
    let dev = site.device("dev-operator").await;
    dev.publish("devices/pump-3/state", br#"{"rpm":1200}"#.to_vec())
        .await;
    dev.publish(
        "devices/pump-3/telemetry",
        br#"[{"flow":1.5},{"flow":1.7}]"#.to_vec(),
    )
    .await;
    dev.publish("devices/pump-3/state", b"garbage".to_vec())
        .await;
    wait_for(&site.gw.db, Duration::from_secs(10), |db| {
        db.status()
            .ok()
            .filter(|s| s.telemetry_points == 2 && s.rejected_total == 1)
    })
    .await;

    let db = site.gw.db.to_str().unwrap().to_owned();
    let env = [("NNGW_STORAGE__PATH", db.as_str())];
    let out = gateway(&["status", "--json"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["devices"], 2, "pump-3 and the probe: {status}");
    assert_eq!(status["telemetry_points"], 2);
    assert_eq!(status["rejected_total"], 1);
    assert!(status["db_bytes"].as_u64().unwrap() > 0);

    let out = gateway(&["devices", "--json"], &env);
    let devices: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pump = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["key"] == "pump-3")
        .unwrap();
    assert_eq!(pump["reported"], json!({"rpm":1200}));
    assert_eq!(pump["telemetry_points"], 2);
    assert!(pump["last_seen"].as_str().unwrap().ends_with('Z'));

    assert_eq!(status["daemon_running"], true, "{status}");
    assert_eq!(status["daemon"]["stopped"], false, "{status}");
    assert_eq!(status["daemon"]["mqtt"], "connected", "{status}");
    let human = text(&gateway(&["status"], &env));
    assert!(human.contains("daemon         running (pid"), "{human}");
    assert!(human.contains("telemetry      2 points"), "{human}");
    let rejected = text(&gateway(&["rejected"], &env));
    assert!(
        rejected.contains("invalid") || rejected.contains("neither"),
        "{rejected}"
    );
    site.gw.stop().await;
    let human = text(&gateway(&["status"], &env));
    assert!(
        human.contains("daemon         not running; stopped cleanly"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_set_reaches_an_mqtt_subscriber_and_a_coap_observer() {
    let site = Site::start("gw-downlink").await;
    let mut subscriber = Device::connect(site.broker.port, "lamp-9-mqtt").await;
    subscriber
        .client
        .subscribe("devices/lamp-9/desired", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();

    // A real CoAP observer for 4 seconds.
    let uri = format!("coap://127.0.0.1:{}/d/lamp-9/desired", site.gw.coap_port);
    let observer = std::thread::spawn(move || {
        Command::new("coap-client-notls")
            .args(["-m", "get", "-s", "4", &uri])
            .stderr(Stdio::null())
            .output()
            .unwrap()
    });

    // Several edits through the binary while it observes: whatever its first GET returned, at
    // least one later edit can only have reached it as a notification.
    let db = site.gw.db.to_str().unwrap().to_owned();
    for level in 1..=6 {
        let out = gateway(
            &[
                "desired",
                "set",
                "lamp-9",
                &format!(r#"{{"level":{level}}}"#),
                "--create",
            ],
            &[("NNGW_STORAGE__PATH", &db)],
        );
        assert!(out.status.success(), "{}", text(&out));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let printed = String::from_utf8_lossy(&observer.join().unwrap().stdout).into_owned();
    // libcoap prints each payload as it comes, without separators.
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&printed)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .collect();
    assert!(
        docs.len() >= 2,
        "the observer saw no notification: {printed:?}"
    );
    assert_eq!(docs.last().unwrap(), &json!({"level": 6}), "{printed:?}");

    let mut last = Value::Null;
    while last != json!({"level": 6}) {
        let msg = tokio::time::timeout(Duration::from_secs(10), subscriber.events.recv())
            .await
            .unwrap()
            .unwrap();
        last = serde_json::from_slice(&msg.payload).unwrap();
    }
    site.gw.stop().await;
}

#[test]
fn without_a_broker_the_daemon_keeps_running_and_logs_the_outage_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let port = free_port().to_string();
    // Dozens of reconnect attempts at these settings.
    let (clean_exit, log) = support::run_daemon_binary_for(
        &[
            ("NNGW_STORAGE__PATH", db.to_str().unwrap()),
            ("NNGW_MQTT__PORT", &port),
            ("NNGW_MQTT__RECONNECT_MIN", "10ms"),
            ("NNGW_MQTT__RECONNECT_MAX", "50ms"),
            ("NNGW_COAP__BIND", "127.0.0.1:0"),
            ("NNGW_API__BIND", "127.0.0.1:0"),
        ],
        Duration::from_millis(1500),
    );
    assert!(clean_exit, "{log}");
    assert_eq!(log.matches("cannot reach broker").count(), 1, "{log}");
    assert!(log.contains("gateway ready"), "{log}");
}

#[test]
fn a_second_run_on_the_same_database_is_refused_with_the_first_ones_pid_not_an_address_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let port = support::free_port().to_string();
    let env = [
        ("NNGW_STORAGE__PATH", db.to_str().unwrap()),
        ("NNGW_MQTT__PORT", "1"),
        // A fixed CoAP port, so that the second daemon would collide on it if it got that far.
        ("NNGW_COAP__BIND", &format!("127.0.0.1:{port}")),
        ("NNGW_API__BIND", "127.0.0.1:0"),
    ];
    let mut first = support::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .arg("run")
            .envs(env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !nn_gateway::store::daemon_running(&db) {
        assert!(
            std::time::Instant::now() < deadline,
            "first daemon never took its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
        .arg("run")
        .envs(env)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("another nn-gateway (pid {})", first.0.id())),
        "{err}"
    );
    assert!(!err.contains("Address already in use"), "{err}");
    first.kill();
}

#[test]
fn desired_set_refuses_an_unknown_device_without_create_and_never_makes_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let db_env = [("NNGW_STORAGE__PATH", db.to_str().unwrap())];
    // No database yet (the daemon never ran here): refused, and none is created.
    let out = gateway(&["desired", "set", "lamp-1", r#"{"on":true}"#], &db_env);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no database here"), "{}", text(&out));
    assert!(!db.exists(), "an operator command created a database");

    // A database that knows one device.
    nn_gateway::store::Db::open(
        &db,
        &nn_gateway::store::OpenOptions {
            synchronous: nn_gateway::config::Synchronous::Normal,
            targets: Vec::new(),
            rejected_keep: 10,
        },
    )
    .unwrap()
    .set_desired(
        &nn_gateway::model::DeviceKey::parse("lamp-1").unwrap(),
        &json!({}),
        nn_gateway::model::Origin::Local,
    )
    .unwrap();
    let typo = gateway(&["desired", "set", "lamp-l", r#"{"on":true}"#], &db_env);
    assert!(!typo.status.success());
    assert!(
        text(&typo).contains("no device lamp-l") && text(&typo).contains("--create"),
        "{}",
        text(&typo)
    );
    let known = gateway(&["desired", "set", "lamp-1", r#"{"on":true}"#], &db_env);
    assert!(known.status.success(), "{}", text(&known));
    let created = gateway(
        &["desired", "set", "lamp-2", r#"{"on":true}"#, "--create"],
        &db_env,
    );
    assert!(created.status.success(), "{}", text(&created));
    let devices = gateway(&["devices", "--json"], &db_env);
    let keys: Vec<String> = serde_json::from_slice::<Vec<Value>>(&devices.stdout)
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys, ["lamp-1", "lamp-2"], "no phantom lamp-l");
    let bad = gateway(&["desired", "set", "a/b", "{}"], &db_env);
    assert!(!text(&bad).contains("device device"), "{}", text(&bad));
}

#[test]
fn telemetry_shows_a_devices_points_newest_first_since_a_time_and_limited() {
    use nn_gateway::model::{
        DeviceKey, Format, Inbound, Origin, Point, Reading, UnixMillis, WriteOp,
    };
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("gateway.db");
    let mut db = nn_gateway::store::Db::open(
        &db_path,
        &nn_gateway::store::OpenOptions {
            synchronous: nn_gateway::config::Synchronous::Normal,
            targets: Vec::new(),
            rejected_keep: 10,
        },
    )
    .unwrap();
    let now = UnixMillis::now().0;
    let ops: Vec<WriteOp> = (0..5)
        .map(|i| {
            WriteOp::Ingest(Inbound {
                device: DeviceKey::parse("meter-1").unwrap(),
                origin: Origin::Mqtt,
                format: Format::Json,
                // Two hours ago for the first two, now for the rest.
                received_at: UnixMillis(if i < 2 { now - 7_200_000 } else { now }),
                reading: Reading::Telemetry(vec![Point {
                    device_ts: None,
                    data: json!({ "kwh": i }).as_object().unwrap().clone(),
                }]),
                mqtt: None,
            })
        })
        .collect();
    for r in db.apply_batch(&ops) {
        r.unwrap();
    }
    drop(db);
    let env = [("NNGW_STORAGE__PATH", db_path.to_str().unwrap())];
    let kwh = |args: &[&str]| -> Vec<i64> {
        let out = gateway(args, &env);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap()
            .iter()
            .map(|p| p["payload"]["kwh"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(kwh(&["telemetry", "meter-1", "--json"]), [4, 3, 2, 1, 0]);
    assert_eq!(
        kwh(&["telemetry", "meter-1", "--json", "--limit", "2"]),
        [4, 3]
    );
    assert_eq!(
        kwh(&["telemetry", "meter-1", "--json", "--since", "1h"]),
        [4, 3, 2]
    );
    let shown = text(&gateway(&["telemetry", "meter-1"], &env));
    assert!(shown.contains("{\"kwh\":4}"), "{shown}");
    let unknown = gateway(&["telemetry", "meter-2"], &env);
    assert!(!unknown.status.success() && text(&unknown).contains("no device meter-2"));
}

#[test]
fn sync_now_reaches_a_daemon_without_clouds_and_leaves_it_running() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let env = [
        ("NNGW_STORAGE__PATH", db.to_str().unwrap()),
        ("NNGW_MQTT__PORT", "1"),
        ("NNGW_COAP__BIND", "127.0.0.1:0"),
        ("NNGW_API__BIND", "127.0.0.1:0"),
    ];
    let mut daemon = support::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .arg("run")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Its first heartbeat comes after READY, when SIGUSR1 is long caught.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = gateway(&["status", "--json"], &env);
        let beat: Option<Value> = serde_json::from_slice(&status.stdout).ok();
        if beat.is_some_and(|s| s["daemon"]["pid"].is_number()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no heartbeat");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = gateway(&["sync", "now", "--wait", "1s"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("asked the daemon (pid {})", daemon.0.id())),
        "{}",
        text(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "SIGUSR1 ended the daemon"
    );
    daemon.kill();
    // Without a daemon, it says so instead of signalling anything.
    let out = gateway(&["sync", "now"], &env);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no daemon is running"),
        "{}",
        text(&out)
    );
}
