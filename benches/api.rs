//! HTTP API benchmark: the real `nn-gateway` binary (release) on a database of
//! `API_DEVICES` devices (10,000; each with a reported document, and `API_POINTS` telemetry
//! points spread over them, 200,000), no cloud.
//!
//! Run: `cargo bench --bench api`. Optional: `API_DEVICES`, `API_POINTS`, `API_REQUESTS`
//! (200 per route), `API_CONSOLE_S` (20).
//!
//! - **latency**: sequential requests over one keep-alive connection, per route: a page of
//!   50 devices at a random offset, a search, one device, the status document. Medians, p90
//!   and max in milliseconds (client-side, request sent to body read).
//! - **memory**: the daemon's resident set (`VmRSS`) idle after start, then with the console
//!   open: its files fetched once, then what its overview and devices screens poll every 2 s
//!   (status, a devices page, conflicts) for `API_CONSOLE_S`; `VmRSS` at the end and the peak
//!   (`VmHWM`).

#[path = "../tests/fakes/mod.rs"]
mod fakes;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use fakes::rig::{Backlog, Daemon, environment};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn get(&self, path: &str) -> (u16, usize) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("the API answers");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("a body");
        (status, body.len())
    }

    /// `n` requests of `path(i)`, one after another; milliseconds each.
    async fn time(&self, n: usize, path: impl Fn(usize) -> String) -> Vec<f64> {
        let mut ms = Vec::with_capacity(n);
        for i in 0..n {
            let p = path(i);
            let started = Instant::now();
            let (status, _) = self.get(&p).await;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "GET {p}");
        }
        ms.sort_by(f64::total_cmp);
        ms
    }
}

#[tokio::main]
async fn main() {
    nn_gateway::cloud::install_crypto_provider();
    let devices: u64 = support::env_or("API_DEVICES", 10_000);
    let points: u64 = support::env_or("API_POINTS", 200_000);
    let requests: usize = support::env_or("API_REQUESTS", 200);
    let console_s: u64 = support::env_or("API_CONSOLE_S", 20);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let made = Instant::now();
    Backlog {
        prefix: "dev-",
        devices,
        state: true,
        points,
    }
    .write(&db);
    println!(
        "database: {devices} devices, {points} points, made in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    let port = support::free_port();
    let mut env = environment(dir.path(), &db, support::free_port(), None, None);
    env.retain(|(k, _)| k != "NNGW_API__BIND");
    env.push(("NNGW_API__BIND".into(), format!("127.0.0.1:{port}")));
    env.push(("NNGW_MQTT__ENABLED".into(), "false".into()));
    let daemon = Daemon::start(&env, &dir.path().join("daemon.log"));

    let token_file = dir.path().join(nn_gateway::api::TOKEN_FILE_NAME);
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        if let Ok(t) = std::fs::read_to_string(&token_file)
            && !t.trim().is_empty()
        {
            break t.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no API token within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = Client {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{port}"),
        token,
    };
    while client
        .http
        .get(format!("{}/readyz", client.base))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the API not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = daemon.status_kib("VmRSS").unwrap_or(0);

    let offsets: Vec<u64> = (0..requests)
        .map(|_| fastrand::u64(0..devices.saturating_sub(50).max(1)))
        .collect();
    let routes: Vec<(&str, Vec<f64>)> = vec![
        (
            "GET /api/v1/devices?limit=50&offset=<random>",
            client
                .time(requests, |i| {
                    format!("/api/v1/devices?limit=50&offset={}", offsets[i])
                })
                .await,
        ),
        (
            "GET /api/v1/devices?q=<key part>&limit=50",
            client
                .time(requests, |i| {
                    format!("/api/v1/devices?q=dev-{}&limit=50", offsets[i] % 1000)
                })
                .await,
        ),
        (
            "GET /api/v1/devices/<key>",
            client
                .time(requests, |i| format!("/api/v1/devices/dev-{}", offsets[i]))
                .await,
        ),
        (
            "GET /api/v1/status",
            client
                .time(requests / 4, |_| "/api/v1/status".to_owned())
                .await,
        ),
    ];
    println!("latency, ms (median / p90 / max), {requests} requests per route:");
    for (route, ms) in &routes {
        println!(
            "  {route:<46} {:>7.2} / {:>7.2} / {:>7.2}",
            percentile(ms, 0.5),
            percentile(ms, 0.9),
            ms[ms.len() - 1]
        );
    }

    // The console open: its files, then its polling.
    for asset in ["/", "/console/app.js", "/console/app.css"] {
        let (status, bytes) = client.get(asset).await;
        println!("console {asset}: {status}, {bytes} bytes");
    }
    let until = Instant::now() + Duration::from_secs(console_s);
    while Instant::now() < until {
        for p in [
            "/api/v1/status",
            "/api/v1/devices?limit=50",
            "/api/v1/conflicts",
        ] {
            client.get(p).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let open = daemon.status_kib("VmRSS").unwrap_or(0);
    let open_anon = daemon.status_kib("RssAnon").unwrap_or(0);
    let peak = daemon.status_kib("VmHWM").unwrap_or(0);
    println!(
        "memory: idle {:.1} MiB; console open {console_s} s: {:.1} MiB ({:.1} MiB private), peak {:.1} MiB",
        idle as f64 / 1024.0,
        open as f64 / 1024.0,
        open_anon as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
