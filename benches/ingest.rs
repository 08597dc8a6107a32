//! Ingest benchmark: JSON telemetry messages per second committed end to end through a real
//! Mosquitto into the SQLite mirror.
//!
//! Run: `cargo bench --bench ingest` (release profile). Optional: `INGEST_MESSAGES`,
//! `INGEST_RUNS`, `INGEST_SYNC` (`full`, the default config, or `normal`).
//!
//! Every run is made twice, side by side: with both clouds off, and with both enabled (their
//! URLs on a loopback port nobody listens on, so the lanes go offline and only probe): the
//! uplink must not make ingest pay for it. The medians of both and their ratio are printed.
//!
//! Each run starts a fresh broker and database and sends `INGEST_MESSAGES` QoS 1 messages from
//! 10 devices; the clock stops when the last one is committed (the gateway acknowledges only
//! after commit). It then checks every device's points are all there, in order. Two modes:
//! - `backlog` (default): the messages wait at the broker for the gateway's persistent session,
//!   then the gateway starts and drains them, as after a power cut or an outage. The
//!   publishers are done before the clock starts, so the gateway and the broker have the cores.
//! - `live` (`INGEST_MODE=live`): the devices publish while the gateway runs; on 2 cores the
//!   publishers, the broker and the gateway share them.
//!
//! The clock is watched through one read-only connection asking `max(id)` of the telemetry
//! table (an index seek; in a fresh table without deletes it equals the count). The poll used
//! to open a connection and run `status()` every 2 ms: full counts of the table, plus one more
//! per cloud cursor with clouds on, so the bench took CPU from the gateway in proportion to the
//! rows stored, and more with clouds on than off.
//!
//! Wall-clock rates on a shared 2-core machine swing with whatever else runs, so each run also
//! reports the CPU time the store thread (the one thread every write passes through) spent per
//! message: far less sensitive to load, and the figure to compare when changing the write path.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use nn_gateway::config::Synchronous;
use nn_gateway::store::Db;
use support::{Numbered, Site, assert_each_once_in_order};

const DEVICES: u64 = 10;

/// Telemetry points stored so far (see the module doc for why `max(id)`).
fn stored(conn: &rusqlite::Connection) -> u64 {
    conn.query_row("SELECT coalesce(max(id), 0) FROM telemetry", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_or(0, |n| n as u64)
}

/// CPU time (user + system) of this process's thread named `store`, in clock ticks.
fn store_thread_ticks() -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim() != "store" {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the parenthesised name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        return Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?);
    }
    None
}

/// The bench's configuration: `sync`, and both clouds enabled (on a dead port) or not.
fn tweak(
    cfg: &mut nn_gateway::config::Config,
    dir: &std::path::Path,
    sync: Synchronous,
    clouds: bool,
) {
    cfg.storage.synchronous = sync;
    if clouds {
        let key = dir.join("cloud.key");
        std::fs::write(&key, "bench-key\n").unwrap();
        let nowhere = format!("http://127.0.0.1:{}", support::free_port());
        cfg.golioth.enabled = true;
        cfg.golioth.project_id = "bench".into();
        cfg.golioth.api_url = nowhere.parse().unwrap();
        cfg.golioth.api_key_file = Some(key.clone());
        cfg.netneural.enabled = true;
        cfg.netneural.url = Some(nowhere.parse().unwrap());
        cfg.netneural.organization_id = "org".into();
        cfg.netneural.integration_id = "int".into();
        cfg.netneural.api_key_file = Some(key);
    }
}

fn read_only(db: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

/// Returns once `messages` rows are stored, polled fast so the clock stops at the last commit.
async fn wait_stored(watch: &rusqlite::Connection, messages: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while stored(watch) < messages {
        assert!(
            Instant::now() < deadline,
            "stuck at {} stored",
            stored(watch)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Backlog mode, as a gateway back from a power cut meets it: the broker holds every message
/// for the gateway's persistent session, then the gateway starts and drains them. Returns
/// messages per second from the start, and the store thread's CPU microseconds per message.
async fn backlog_run(messages: u64, sync: Synchronous, clouds: bool) -> (f64, f64) {
    let broker = support::Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = support::config(dir.path(), broker.port, "gw-bench");
    tweak(&mut cfg, dir.path(), sync, clouds);
    // A first run makes the session and its subscription at the broker.
    let gw = support::Gateway::start(cfg.clone()).await;
    let probe = support::Device::connect(broker.port, "probe").await;
    support::wait_subscribed(&probe, &gw.db).await;
    gw.stop().await;
    let stream = Numbered {
        prefix: "bench-",
        devices: DEVICES,
        total: messages,
        extra: r#","temp":21.5,"humidity":40.2,"battery":3.61"#,
    };
    stream.publish(broker.port, "bench-devices").await.unwrap();
    let started = Instant::now();
    let gw = support::Gateway::start(cfg).await;
    let watch = read_only(&gw.db);
    wait_stored(&watch, messages).await;
    let elapsed = started.elapsed();
    // The store thread was started by this gateway: all its CPU time is this drain's.
    let ticks = store_thread_ticks().expect("store thread CPU time");
    drop(watch);
    let conn = Db::open_readonly(&gw.db).unwrap();
    assert_each_once_in_order(&conn, "bench-", DEVICES, messages);
    gw.stop().await;
    let store_us = ticks as f64 * 10_000.0 / messages as f64;
    (messages as f64 / elapsed.as_secs_f64(), store_us)
}

/// Live mode: devices publish while the gateway runs. Returns messages per second, and the
/// store thread's CPU microseconds per message.
async fn live_run(messages: u64, sync: Synchronous, clouds: bool) -> (f64, f64) {
    let site = Site::start_with("gw-bench", |cfg, dir| tweak(cfg, dir, sync, clouds)).await;
    let _probe = site.device("probe").await;

    let stream = Numbered {
        prefix: "bench-",
        devices: DEVICES,
        total: messages,
        extra: r#","temp":21.5,"humidity":40.2,"battery":3.61"#,
    };
    let watch = read_only(&site.gw.db);
    let ticks_before = store_thread_ticks().expect("store thread CPU time");
    let started = Instant::now();
    let devices = stream.publish(site.broker.port, "bench-devices");
    wait_stored(&watch, messages).await;
    let elapsed = started.elapsed();
    let ticks = store_thread_ticks().expect("store thread CPU time") - ticks_before;
    drop(watch);
    devices.await.unwrap();
    let conn = Db::open_readonly(&site.gw.db).unwrap();

    assert_each_once_in_order(&conn, "bench-", DEVICES, messages);
    site.gw.stop().await;
    // Linux counts thread CPU time in USER_HZ ticks, 100 per second.
    let store_us = ticks as f64 * 10_000.0 / messages as f64;
    (messages as f64 / elapsed.as_secs_f64(), store_us)
}

fn median(rates: &mut [f64]) -> (f64, f64, f64) {
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() / 2], rates[0], rates[rates.len() - 1])
}

fn main() {
    let messages: u64 = support::env_or("INGEST_MESSAGES", 100_000);
    let runs: usize = support::env_or("INGEST_RUNS", 5);
    let sync = match std::env::var("INGEST_SYNC").as_deref() {
        Ok("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    let live = std::env::var("INGEST_MODE").as_deref() == Ok("live");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut off_cpu, mut on_cpu) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for clouds in [false, true] {
            let (rate, store_us) = if live {
                rt.block_on(live_run(messages, sync, clouds))
            } else {
                rt.block_on(backlog_run(messages, sync, clouds))
            };
            let label = if clouds { "clouds on " } else { "clouds off" };
            println!(
                "run {} {label}: {messages} messages, {rate:.0} msg/s, store thread {store_us:.2} us/msg",
                run + 1
            );
            if clouds {
                on.push(rate);
                on_cpu.push(store_us);
            } else {
                off.push(rate);
                off_cpu.push(store_us);
            }
        }
    }
    let (off_median, off_min, off_max) = median(&mut off);
    let (on_median, on_min, on_max) = median(&mut on);
    let (off_cpu, ..) = median(&mut off_cpu);
    let (on_cpu, ..) = median(&mut on_cpu);
    println!(
        "ingest {} (JSON telemetry, MQTT QoS 1 -> SQLite, synchronous={sync:?}, {runs} runs each): \
         clouds off median {off_median:.0} msg/s ({off_min:.0}-{off_max:.0}), \
         clouds on median {on_median:.0} msg/s ({on_min:.0}-{on_max:.0}), on/off {:.2}; \
         store thread CPU median {off_cpu:.2} us/msg off, {on_cpu:.2} on",
        if live { "live" } else { "backlog" },
        on_median / off_median
    );
}
