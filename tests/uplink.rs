//! The uplink end to end: devices publish to a real Mosquitto, the gateway runs in process on a
//! real SQLite file, and its lanes deliver to the fake Golioth and fake NetNeural (real HTTP
//! servers on port 0 that follow the vendors' shapes, see `tests/fakes`) while those are told
//! to fail: outages (dropped connections), 503s, a poisoned point, a revoked key. The crash
//! test runs the real `nn-gateway` binary on a pre-filled database instead, and kills it.

mod fakes;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fakes::rig::{Backlog, Daemon, clouds, with_keys};
use fakes::{FakeGolioth, FakeNetNeural, Fault, Match};
use nn_gateway::config::Config;
use nn_gateway::daemon::{self, Sockets};
use nn_gateway::notify::Notifier;
use serde_json::Value;
use support::{Mosquitto, Numbered, config, wait_for_points};
use tokio_util::sync::CancellationToken;

struct Running {
    shutdown: CancellationToken,
    reload: tokio::sync::watch::Sender<Config>,
    task: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
    db: std::path::PathBuf,
}

async fn start(cfg: Config) -> Running {
    let cfg = with_keys(cfg);
    let sockets = Sockets::bind(&cfg).await.unwrap();
    let shutdown = CancellationToken::new();
    let (reload, reloads) = tokio::sync::watch::channel(cfg.clone());
    let db = cfg.storage.path.clone();
    let task = tokio::spawn(daemon::run_reloadable(
        cfg,
        sockets,
        shutdown.clone(),
        Notifier::disabled(),
        reloads,
    ));
    Running {
        shutdown,
        reload,
        task,
        db,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("daemon did not stop")
            .unwrap()
            .unwrap();
    }
}

async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// NetNeural's telemetry per device (by name), as the `n` of each point in stored order.
fn netneural_points(nn: &FakeNetNeural) -> BTreeMap<String, Vec<i64>> {
    let names: BTreeMap<String, String> = nn
        .rows("devices")
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                d["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut rows = nn.rows("device_telemetry_history");
    rows.sort_by_key(|r| {
        r["idempotency_key"]
            .as_str()
            .map(|k| k.rsplit(':').next().unwrap().parse::<i64>().unwrap())
    });
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in rows {
        let device = names[r["device_id"].as_str().unwrap()].clone();
        out.entry(device)
            .or_default()
            .push(r["telemetry"]["n"].as_i64().unwrap());
    }
    out
}

fn assert_each_once_in_order(
    got: &BTreeMap<String, Vec<i64>>,
    prefix: &str,
    devices: u64,
    total: u64,
) {
    for d in 0..devices {
        let want: Vec<i64> = (0..total)
            .filter(|i| i % devices == d)
            .map(|i| i as i64)
            .collect();
        let name = format!("{prefix}{d}");
        assert_eq!(got.get(&name), Some(&want), "telemetry of {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_netneural_outage_while_devices_publish_costs_few_requests_and_loses_or_doubles_nothing()
{
    let nn = FakeNetNeural::start().await;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-nn-outage");
    clouds(&mut cfg, dir.path(), None, Some(&nn));
    let gw = start(cfg).await;

    let dev = support::Device::connect(broker.port, "outage-dev").await;
    support::wait_subscribed(&dev, &gw.db).await;
    // The cloud is down from the start: every connection is dropped unanswered.
    nn.faults().always(Match::any(), Fault::Drop);
    let stream = Numbered {
        prefix: "out-",
        devices: 4,
        total: 2000,
        extra: "",
    };
    stream.publish(broker.port, "devices-1").await.unwrap();
    wait_for_points(&gw.db, 2000, Duration::from_secs(30)).await;
    let mark = nn.faults().mark();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = nn.faults().count_since(mark, &Match::any());
    // Probes follow the backoff (100 ms doubling to a 2 s cap here, full jitter): about 7 in
    // 3 s on average. One request per row or point would be thousands.
    assert!(
        during <= 14,
        "an outage should cost a few probes, not a request per row: {during} requests in 3 s"
    );

    nn.faults().clear();
    until("every point in NetNeural", Duration::from_secs(30), || {
        nn.count("device_telemetry_history") >= 2000
    })
    .await;
    // Give a duplicate the time to show up, then check content and order.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(nn.count("device_telemetry_history"), 2000);
    assert_each_once_in_order(&netneural_points(&nn), "out-", 4, 2000);
    assert_eq!(
        nn.count("devices"),
        5,
        "each device registered once (4 and the rig's probe)"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_and_503s_store_nothing_twice_and_a_poisoned_point_goes_dead_alone() {
    let nn = FakeNetNeural::start().await;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-nn-poison");
    clouds(&mut cfg, dir.path(), None, Some(&nn));
    // Writes committed whose answers never arrive, then a few 503s, then a point NetNeural
    // refuses for what it carries.
    nn.faults().next(
        Match::post("device_telemetry_history"),
        Fault::LoseResponse,
        2,
    );
    nn.faults().next(
        Match::post("device_telemetry_history"),
        Fault::status(503),
        2,
    );
    nn.faults().poison("\"poison\"");
    let gw = start(cfg).await;
    let dev = support::Device::connect(broker.port, "poisoner").await;
    support::wait_subscribed(&dev, &gw.db).await;

    let stream = Numbered {
        prefix: "p-",
        devices: 2,
        total: 600,
        extra: "",
    };
    stream.publish(broker.port, "devices-2").await.unwrap();
    dev.publish(
        "devices/p-0/telemetry",
        br#"{"n":-1,"note":"poison"}"#.to_vec(),
    )
    .await;
    until("the rest delivered", Duration::from_secs(30), || {
        nn.count("device_telemetry_history") >= 600
    })
    .await;
    let dead = support::wait_for(&gw.db, Duration::from_secs(20), |db| {
        let q = db.queue(10).ok()?;
        q.rows.iter().any(|r| r.state == "dead").then_some(q)
    })
    .await;
    let dead_rows: Vec<_> = dead.rows.iter().filter(|r| r.state == "dead").collect();
    assert_eq!(dead_rows.len(), 1, "{dead_rows:?}");
    assert!(
        dead_rows[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("400"),
        "{dead_rows:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(nn.count("device_telemetry_history"), 600);
    assert_each_once_in_order(&netneural_points(&nn), "p-", 2, 600);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_state_reaches_both_clouds_once_per_device_through_a_golioth_outage() {
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-state");
    cfg.gateway.site_id = "berlin".into();
    cfg.gateway.cloud_id = nn_gateway::config::IdTemplate::parse("{site}-{device}").unwrap();
    clouds(&mut cfg, dir.path(), Some(&golioth), Some(&nn));
    golioth.faults().always(Match::any(), Fault::Drop);
    let gw = start(cfg).await;
    let dev = support::Device::connect(broker.port, "state-dev").await;
    support::wait_subscribed(&dev, &gw.db).await;
    for i in 0..5 {
        for d in ["s-1", "s-2"] {
            dev.publish(
                &format!("devices/{d}/state"),
                format!(r#"{{"fw":"1.{i}","temp":{i}}}"#).into_bytes(),
            )
            .await;
        }
    }
    until(
        "reported state in NetNeural",
        Duration::from_secs(20),
        || {
            nn.rows("devices")
                .iter()
                .filter(|d| d["metadata"]["reported"]["fw"] == "1.4")
                .count()
                == 2
        },
    )
    .await;
    assert_eq!(golioth.device_count(), 0, "Golioth is down");
    golioth.faults().clear();
    until("reported state in Golioth", Duration::from_secs(20), || {
        ["berlin-s-1", "berlin-s-2"].iter().all(|hw| {
            golioth
                .device_by_hardware_id(hw)
                .and_then(|d| golioth.state(d["id"].as_str().unwrap(), "state"))
                .is_some_and(|s| s["fw"] == "1.4")
        })
    })
    .await;
    for hw in ["berlin-s-1", "berlin-s-2"] {
        let has = |d: &Value, field: &str| {
            d[field]
                .as_array()
                .is_some_and(|ids| ids.contains(&Value::from(hw)))
        };
        let in_golioth = golioth
            .devices()
            .iter()
            .filter(|d| has(d, "hardwareIds"))
            .count();
        let in_netneural = nn
            .rows("devices")
            .iter()
            .filter(|d| has(d, "hardware_ids"))
            .count();
        assert_eq!(
            (in_golioth, in_netneural),
            (1, 1),
            "devices with hardware id {hw}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_pauses_the_lane_and_a_fixed_key_file_with_sighup_resumes_it() {
    let nn = FakeNetNeural::start().await;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-auth");
    clouds(&mut cfg, dir.path(), None, Some(&nn));
    nn.set_key("rotated-key");
    let gw = start(cfg.clone()).await;
    let dev = support::Device::connect(broker.port, "auth-dev").await;
    support::wait_subscribed(&dev, &gw.db).await;
    Numbered {
        prefix: "k-",
        devices: 1,
        total: 50,
        extra: "",
    }
    .publish(broker.port, "devices-3")
    .await
    .unwrap();
    let state = support::wait_for(&gw.db, Duration::from_secs(20), |db| {
        let beat = db.status().ok()?.daemon?;
        let c = beat
            .clouds
            .get(&nn_gateway::model::Target::NetNeural)?
            .clone();
        (c.state == nn_gateway::health::LaneState::AuthFailed).then_some(c)
    })
    .await;
    assert!(state.last_error.unwrap().contains("401"));
    let mark = nn.faults().mark();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        nn.faults().count_since(mark, &Match::any()) <= 1,
        "a paused lane does not keep trying"
    );
    assert_eq!(nn.count("device_telemetry_history"), 0);

    // The operator fixes the key file and sends SIGHUP (which re-reads it).
    std::fs::write(
        cfg.netneural.api_key_file.as_ref().unwrap(),
        "rotated-key\n",
    )
    .unwrap();
    gw.reload.send(with_keys(cfg)).unwrap();
    until(
        "telemetry after the new key",
        Duration::from_secs(20),
        || nn.count("device_telemetry_history") == 50,
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_a_drain_leaves_no_duplicates_in_either_cloud() {
    const DEVICES: u64 = 300;
    const POINTS: u64 = 30_000;
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    // Every request takes a while, so the kill finds requests in the air in both lanes.
    for faults in [golioth.faults(), nn.faults()] {
        faults.always(Match::any(), Fault::Delay(Duration::from_millis(20)));
    }
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    Backlog {
        prefix: "kill-",
        devices: DEVICES,
        state: true,
        points: POINTS,
    }
    .write(&db);
    let mut env = fakes::rig::environment(dir.path(), &db, broker.port, Some(&golioth), Some(&nn));
    env.push(("NNGW_NETNEURAL__TELEMETRY_BATCH".into(), "200".into()));

    let first = Daemon::start(&env, &dir.path().join("first.log"));
    until(
        "part of the backlog in NetNeural",
        Duration::from_secs(60),
        || nn.count("device_telemetry_history") >= 2000,
    )
    .await;
    let (points_at_kill, golioth_at_kill) =
        (nn.count("device_telemetry_history"), golioth.device_count());
    first.kill9();
    eprintln!(
        "killed at {points_at_kill} of {POINTS} points, {golioth_at_kill} of {DEVICES} Golioth devices"
    );
    assert!(
        (points_at_kill as u64) < POINTS,
        "the drain was over before the kill: {points_at_kill} points"
    );

    let second = Daemon::start(&env, &dir.path().join("second.log"));
    let golioth_done = || {
        golioth.device_count() as u64 >= DEVICES
            && (0..DEVICES).all(|d| {
                golioth
                    .device_by_hardware_id(&format!("kill-{d}"))
                    .and_then(|g| golioth.state(g["id"].as_str().unwrap(), "state"))
                    .is_some_and(|s| s["fw"] == "1.0")
            })
    };
    let netneural_done = || {
        nn.count("device_telemetry_history") as u64 >= POINTS
            && nn
                .rows("devices")
                .iter()
                .filter(|d| d["metadata"]["reported"]["fw"] == "1.0")
                .count() as u64
                >= DEVICES
    };
    until(
        "everything in both clouds",
        Duration::from_secs(120),
        || netneural_done() && golioth_done(),
    )
    .await;
    // Give a duplicate the time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut numbers: Vec<i64> = nn
        .rows("device_telemetry_history")
        .iter()
        .map(|r| r["telemetry"]["n"].as_i64().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (0..POINTS as i64).collect::<Vec<_>>(),
        "every point exactly once in NetNeural (killed at {points_at_kill} points, {golioth_at_kill} Golioth devices)"
    );
    for d in 0..DEVICES {
        let hw = Value::from(format!("kill-{d}"));
        let has =
            |row: &Value, field: &str| row[field].as_array().is_some_and(|ids| ids.contains(&hw));
        let in_golioth = golioth
            .devices()
            .iter()
            .filter(|g| has(g, "hardwareIds"))
            .count();
        let in_netneural = nn
            .rows("devices")
            .iter()
            .filter(|n| has(n, "hardware_ids"))
            .count();
        assert_eq!(
            (in_golioth, in_netneural),
            (1, 1),
            "devices with hardware id {hw}"
        );
    }
    assert_eq!(golioth.device_count() as u64, DEVICES);
    assert_eq!(nn.count("devices") as u64, DEVICES);
    assert!(second.stop(), "{}", second_log(&dir));
}

fn second_log(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default()
}
