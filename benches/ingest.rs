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

async fn one_run(messages: u64, sync: Synchronous, clouds: bool) -> f64 {
    let site = Site::start_with("gw-bench", |cfg, dir| {
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
    })
    .await;
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

fn median(rates: &mut [f64]) -> (f64, f64, f64) {
    rates.sort_by(f64::total_cmp);
    (rates[rates.len() / 2], rates[0], rates[rates.len() - 1])
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
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for clouds in [false, true] {
            let rate = rt.block_on(one_run(messages, sync, clouds));
            let label = if clouds { "clouds on " } else { "clouds off" };
            println!(
                "run {} {label}: {messages} messages, {rate:.0} msg/s",
                run + 1
            );
            if clouds {
                on.push(rate)
            } else {
                off.push(rate)
            }
        }
    }
    let (off_median, off_min, off_max) = median(&mut off);
    let (on_median, on_min, on_max) = median(&mut on);
    println!(
        "ingest (JSON telemetry, MQTT QoS 1 -> SQLite, synchronous={sync:?}, {runs} runs each): \
         clouds off median {off_median:.0} msg/s ({off_min:.0}-{off_max:.0}), \
         clouds on median {on_median:.0} msg/s ({on_min:.0}-{on_max:.0}), on/off {:.2}",
        on_median / off_median
    );
}
