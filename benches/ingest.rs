//! Ingest benchmark: JSON telemetry messages per second committed end to end through a real
//! Mosquitto into the SQLite mirror.
//!
//! Run: `cargo bench --bench ingest` (release profile). Optional: `INGEST_MESSAGES`,
//! `INGEST_RUNS`, `INGEST_SYNC` (`full`, the default config, or `normal`).
//!
//! Each run starts a fresh broker and database, starts the gateway in process, publishes
//! `INGEST_MESSAGES` QoS 1 messages from 10 devices, and stops the clock when the last one is
//! committed (the gateway acknowledges only after commit). It then checks every device's points
//! are all there, in order. The median over runs is printed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use nn_gateway::config::Synchronous;
use nn_gateway::store::Db;
use support::{Numbered, Site, assert_each_once_in_order, stored_points};

const DEVICES: u64 = 10;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn one_run(messages: u64, sync: Synchronous) -> f64 {
    let site = Site::start_with("gw-bench", |cfg, _| cfg.storage.synchronous = sync).await;
    let _probe = site.device("probe").await;

    let stream = Numbered {
        prefix: "bench-",
        devices: DEVICES,
        total: messages,
        extra: r#","temp":21.5,"humidity":40.2,"battery":3.61"#,
    };
    let started = Instant::now();
    let devices = stream.publish(site.broker.port, "bench-devices");
    // Polled fast: the clock stops at the last commit.
    let deadline = Instant::now() + Duration::from_secs(300);
    while stored_points(&site.gw.db) < messages {
        assert!(
            Instant::now() < deadline,
            "stuck at {} stored",
            stored_points(&site.gw.db)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    devices.await.unwrap();
    let conn = Db::open_readonly(&site.gw.db).unwrap();

    assert_each_once_in_order(&conn, "bench-", DEVICES, messages);
    site.gw.stop().await;
    messages as f64 / elapsed.as_secs_f64()
}

fn main() {
    let messages: u64 = env_or("INGEST_MESSAGES", 100_000);
    let runs: usize = env_or("INGEST_RUNS", 5);
    let sync = match std::env::var("INGEST_SYNC").as_deref() {
        Ok("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rates: Vec<f64> = (0..runs)
        .map(|run| {
            let rate = rt.block_on(one_run(messages, sync));
            println!("run {}: {messages} messages, {rate:.0} msg/s", run + 1);
            rate
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "ingest (JSON telemetry, MQTT QoS 1 -> SQLite, synchronous={sync:?}): median {:.0} msg/s, min {:.0}, max {:.0} over {runs} runs",
        rates[runs / 2],
        rates[0],
        rates[runs - 1]
    );
}
