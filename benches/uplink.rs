//! Uplink benchmark: the real `nn-gateway` binary (release) against the fake clouds of
//! `tests/fakes`, each request answered after `UPLINK_LATENCY_MS` (default 20 ms).
//!
//! Run: `cargo bench --bench uplink` (release profile). Optional: `UPLINK_RUNS` (3),
//! `UPLINK_ONLY` (`register` or `drain`), `UPLINK_DEVICES` (10,000), `UPLINK_POINTS`
//! (1,000,000), `UPLINK_LIVE` (50,000), `UPLINK_LATENCY_MS` (20), and any `NNGW_…` variable,
//! which the daemon inherits (e.g. `NNGW_NETNEURAL__CONCURRENCY`).
//!
//! - **register**: `UPLINK_DEVICES` new devices, each with a reported state owed to Golioth and
//!   NetNeural (pre-filled by SQL). The clock runs from the daemon's start until the outbox is
//!   empty; then both fakes are checked to hold each device once, with its state.
//! - **drain**: `UPLINK_POINTS` telemetry points of 100 devices owed to NetNeural (pre-filled
//!   by SQL). While it drains, `UPLINK_LIVE` QoS 1 messages are published through a real
//!   Mosquitto, and the rate at which the gateway stores them is measured. The clock stops
//!   when NetNeural holds every point; then each is checked to be there once.
//!
//! The daemon's peak resident memory (`VmHWM` in `/proc/PID/status`) is reported for both, as
//! are the requests each fake answered. Medians (with min–max) over the runs are printed.

#[path = "../tests/fakes/mod.rs"]
mod fakes;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use fakes::rig::{Backlog, Daemon};
use fakes::{FakeGolioth, FakeNetNeural, Fault, Match};
use support::{Mosquitto, Numbered};

fn count(db: &Path, sql: &str) -> u64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row(sql, [], |r| r.get::<_, i64>(0)))
        .map_or(u64::MAX, |n| n as u64)
}

struct Figures {
    seconds: f64,
    golioth_requests: usize,
    netneural_requests: usize,
    peak_rss_kib: u64,
    /// Drain only: live messages stored per second while the backlog drained.
    live_rate: Option<f64>,
    /// Requests by kind, for the record.
    breakdown: String,
}

/// Requests since `mark` by kind (those that occurred).
fn breakdown(faults: &fakes::Faults, mark: fakes::Mark) -> String {
    let kinds = [
        ("GET", "/devices"),
        ("POST", "/devices"),
        ("PATCH", "/devices"),
        ("PUT", "/data/"),
        ("GET", "device_service_assignments"),
        ("POST", "device_telemetry_history"),
        ("POST", "integration_sync_log"),
    ];
    kinds
        .iter()
        .map(|(m, p)| (m, p, faults.count_since(mark, &Match::new(m, p))))
        .filter(|k| k.2 > 0)
        .map(|(m, p, n)| format!("{m} {p}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn register(devices: u64, latency: Duration) -> Figures {
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    for faults in [golioth.faults(), nn.faults()] {
        faults.always(Match::any(), Fault::Delay(latency));
    }
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    Backlog {
        prefix: "reg-",
        devices,
        state: true,
        points: 0,
    }
    .write(&db);
    let env = fakes::rig::environment(dir.path(), &db, broker.port, Some(&golioth), Some(&nn));
    let (g0, n0) = (golioth.faults().mark(), nn.faults().mark());
    let started = Instant::now();
    let daemon = Daemon::start(&env, &dir.path().join("daemon.log"));
    let deadline = started + Duration::from_secs(600);
    while count(&db, "SELECT count(*) FROM outbox") > 0 {
        assert!(Instant::now() < deadline, "{}", daemon.logged());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kib = daemon.status_kib("VmHWM").unwrap_or(0);
    let golioth_requests = golioth.faults().count_since(g0, &Match::any());
    let netneural_requests = nn.faults().count_since(n0, &Match::any());
    let breakdown = format!(
        "Golioth {}; NetNeural {}",
        breakdown(golioth.faults(), g0),
        breakdown(nn.faults(), n0)
    );
    assert!(daemon.stop(), "unclean stop");

    // Each device once in each cloud, with its state.
    assert_eq!(golioth.device_count() as u64, devices);
    let with_state = golioth
        .devices()
        .iter()
        .filter(|d| {
            golioth
                .state(d["id"].as_str().unwrap(), "state")
                .is_some_and(|s| s["fw"] == "1.0")
        })
        .count();
    assert_eq!(
        with_state as u64, devices,
        "Golioth devices with their state"
    );
    let rows = nn.rows("devices");
    assert_eq!(rows.len() as u64, devices);
    let mut hardware: Vec<String> = rows
        .iter()
        .filter(|d| d["metadata"]["reported"]["fw"] == "1.0")
        .map(|d| d["hardware_ids"][0].as_str().unwrap().to_owned())
        .collect();
    hardware.sort();
    hardware.dedup();
    assert_eq!(
        hardware.len() as u64,
        devices,
        "NetNeural devices with their state"
    );
    Figures {
        seconds,
        golioth_requests,
        netneural_requests,
        peak_rss_kib,
        live_rate: None,
        breakdown,
    }
}

async fn drain(points: u64, live: u64, latency: Duration) -> Figures {
    const DEVICES: u64 = 100;
    let nn = FakeNetNeural::start().await;
    nn.faults().always(Match::any(), Fault::Delay(latency));
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    Backlog {
        prefix: "drain-",
        devices: DEVICES,
        state: false,
        points,
    }
    .write(&db);
    let env = fakes::rig::environment(dir.path(), &db, broker.port, None, Some(&nn));
    let n0 = nn.faults().mark();
    let started = Instant::now();
    let daemon = Daemon::start(&env, &dir.path().join("daemon.log"));

    // Ingest while it drains: once the gateway is subscribed, publish `live` messages and
    // time until it has stored them (it acknowledges only what is committed).
    let dev = support::Device::connect(broker.port, "live-probe").await;
    support::wait_subscribed(&dev, &db).await;
    let stream = Numbered {
        prefix: "live-",
        devices: 10,
        total: live,
        extra: r#","temp":21.5"#,
    };
    let live_started = Instant::now();
    let publisher = stream.publish(broker.port, "live-devices");
    let live_sql = format!("SELECT count(*) FROM telemetry WHERE id > {points}");
    let deadline = started + Duration::from_secs(600);
    let mut peak_seen = 0;
    while count(&db, &live_sql) < live {
        assert!(Instant::now() < deadline, "{}", daemon.logged());
        peak_seen = peak_seen.max(daemon.status_kib("VmRSS").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let live_seconds = live_started.elapsed().as_secs_f64();
    publisher.await.unwrap();
    let drained_at_live = nn.count("device_telemetry_history") as u64;
    assert!(
        drained_at_live < points,
        "the live messages came in after the drain ({drained_at_live} points delivered)"
    );

    let total = count(&db, "SELECT count(*) FROM telemetry");
    while (nn.count("device_telemetry_history") as u64) < total {
        assert!(Instant::now() < deadline, "{}", daemon.logged());
        peak_seen = peak_seen.max(daemon.status_kib("VmRSS").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kib = daemon.status_kib("VmHWM").unwrap_or(0).max(peak_seen);
    let netneural_requests = nn.faults().count_since(n0, &Match::any());
    let breakdown = format!("NetNeural {}", breakdown(nn.faults(), n0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(daemon.stop(), "unclean stop");
    assert_eq!(
        nn.count("device_telemetry_history") as u64,
        total,
        "a point twice"
    );
    assert_eq!(
        nn.distinct("device_telemetry_history", "idempotency_key") as u64,
        total
    );
    Figures {
        seconds,
        golioth_requests: 0,
        netneural_requests,
        peak_rss_kib,
        live_rate: Some(live as f64 / live_seconds),
        breakdown,
    }
}

fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "median {:.1} ({:.1}-{:.1})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn report(what: &str, runs: &[Figures]) {
    let f = |g: fn(&Figures) -> f64| spread(runs.iter().map(g).collect());
    println!(
        "{what}, {} runs: seconds {}; Golioth requests {}; NetNeural requests {}; peak RSS MiB {}{}",
        runs.len(),
        f(|r| r.seconds),
        f(|r| r.golioth_requests as f64),
        f(|r| r.netneural_requests as f64),
        f(|r| r.peak_rss_kib as f64 / 1024.0),
        if runs[0].live_rate.is_some() {
            format!("; live ingest msg/s {}", f(|r| r.live_rate.unwrap_or(0.0)))
        } else {
            String::new()
        }
    );
}

fn main() {
    let runs: usize = support::env_or("UPLINK_RUNS", 3);
    let only = std::env::var("UPLINK_ONLY").unwrap_or_default();
    let devices: u64 = support::env_or("UPLINK_DEVICES", 10_000);
    let points: u64 = support::env_or("UPLINK_POINTS", 1_000_000);
    let live: u64 = support::env_or("UPLINK_LIVE", 50_000);
    let latency = Duration::from_millis(support::env_or("UPLINK_LATENCY_MS", 20));
    nn_gateway::cloud::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if only != "drain" {
        let mut all = Vec::new();
        for run in 1..=runs {
            let r = rt.block_on(register(devices, latency));
            println!(
                "register run {run}: {devices} devices in {:.1} s, {} Golioth + {} NetNeural requests, peak RSS {:.1} MiB",
                r.seconds,
                r.golioth_requests,
                r.netneural_requests,
                r.peak_rss_kib as f64 / 1024.0
            );
            println!("  {}", r.breakdown);
            all.push(r);
        }
        report(
            &format!("register {devices} devices ({latency:?} per request)"),
            &all,
        );
    }
    if only != "register" {
        let mut all = Vec::new();
        for run in 1..=runs {
            let r = rt.block_on(drain(points, live, latency));
            println!(
                "drain run {run}: {points} points in {:.1} s, {} NetNeural requests, peak RSS {:.1} MiB, {live} live messages at {:.0} msg/s",
                r.seconds,
                r.netneural_requests,
                r.peak_rss_kib as f64 / 1024.0,
                r.live_rate.unwrap_or(0.0)
            );
            println!("  {}", r.breakdown);
            all.push(r);
        }
        report(
            &format!("drain {points} points ({latency:?} per request)"),
            &all,
        );
    }
}
