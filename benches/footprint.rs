//! Footprint benchmark: what the gateway costs a small board. The real `nn-gateway` binary
//! (release), each figure from `/proc/PID/status` or the systemd notify socket.
//!
//! Run: `cargo bench --bench footprint`. Optional: `FOOTPRINT_RUNS` (5, start-to-READY runs),
//! `FOOTPRINT_DB_MIB` (1024), `FOOTPRINT_SETTLE_S` (10).
//!
//! - **size**: the release binary of this host, and of each cross target built under
//!   `target/<triple>/release/` (by `cross/build`).
//! - **idle**: `VmRSS` (and its private part, `RssAnon`: the rest is the binary's pages,
//!   shared and clean, which the kernel drops under pressure) after `FOOTPRINT_SETTLE_S` on an empty database, connected to a real
//!   Mosquitto, clouds off, API on.
//! - **loaded**: 10,000 devices, each with a reported document owed to both clouds (20,000
//!   outbox rows: the outbox keeps one pending state row per device and cloud, since each
//!   carries the whole document) and 1,000,000 telemetry points owed to NetNeural (the
//!   telemetry queue is the range above its delivery cursor), both clouds enabled but
//!   unreachable (a closed port), so everything stays queued: `VmRSS` after settling and the
//!   peak `VmHWM`.
//! - **READY**: a database of `FOOTPRINT_DB_MIB` MiB (1 KiB telemetry payloads), the time from
//!   spawning the daemon to its `READY=1` on `NOTIFY_SOCKET`, median over the runs (each run
//!   stopped with SIGTERM before the next).

#[path = "../tests/fakes/mod.rs"]
mod fakes;
#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fakes::rig::{Backlog, Daemon, environment};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn size() {
    let host = Path::new(env!("CARGO_BIN_EXE_nn-gateway"));
    let mut rows = vec![("host (this profile)".to_owned(), host.to_owned())];
    for triple in ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(triple)
            .join("release/nn-gateway");
        if p.exists() {
            rows.push((triple.to_owned(), p));
        } else {
            rows.push((format!("{triple} (not built: cross/build {triple})"), p));
        }
    }
    println!("binary size:");
    for (name, p) in rows {
        match std::fs::metadata(&p) {
            Ok(m) => println!("  {name:<40} {:.1} MiB", m.len() as f64 / 1048576.0),
            Err(_) => println!("  {name:<40} -"),
        }
    }
}

/// After `secs`: resident set, its private (anonymous) part, and the peak, in KiB. The rest
/// of the resident set is the binary's and libraries' pages, shared and clean: the kernel
/// drops them under memory pressure and reads them again when needed.
fn settle(daemon: &Daemon, secs: u64) -> (u64, u64, u64) {
    std::thread::sleep(Duration::from_secs(secs));
    (
        daemon.status_kib("VmRSS").unwrap_or(0),
        daemon.status_kib("RssAnon").unwrap_or(0),
        daemon.status_kib("VmHWM").unwrap_or(0),
    )
}

fn idle(settle_s: u64) {
    let broker = support::Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let env = environment(dir.path(), &db, broker.port, None, None);
    let daemon = Daemon::start(&env, &dir.path().join("daemon.log"));
    let (rss, anon, peak) = settle(&daemon, settle_s);
    println!(
        "idle (empty database, broker connected, clouds off): RSS {:.1} MiB ({:.1} MiB private), peak {:.1} MiB",
        mib(rss),
        mib(anon),
        mib(peak)
    );
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}

fn loaded(settle_s: u64) {
    let broker = support::Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let made = Instant::now();
    Backlog {
        prefix: "dev-",
        devices: 10_000,
        state: true,
        points: 1_000_000,
    }
    .write(&db);
    let made = made.elapsed();
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let mut env = environment(dir.path(), &db, broker.port, None, None);
    let key = dir.path().join("key");
    std::fs::write(&key, "not-a-real-key\n").unwrap();
    for (k, v) in [
        ("NNGW_GOLIOTH__ENABLED", "true"),
        ("NNGW_GOLIOTH__API_URL", dead.as_str()),
        ("NNGW_GOLIOTH__PROJECT_ID", "footprint"),
        ("NNGW_GOLIOTH__API_KEY_FILE", key.to_str().unwrap()),
        ("NNGW_NETNEURAL__ENABLED", "true"),
        ("NNGW_NETNEURAL__URL", dead.as_str()),
        ("NNGW_NETNEURAL__ORGANIZATION_ID", fakes::rig::ORG),
        ("NNGW_NETNEURAL__INTEGRATION_ID", fakes::rig::INTEGRATION),
        ("NNGW_NETNEURAL__API_KEY_FILE", key.to_str().unwrap()),
        ("NNGW_STORAGE__MAX_SIZE_MIB", "4096"),
    ] {
        env.push((k.into(), v.into()));
    }
    let daemon = Daemon::start(&env, &dir.path().join("daemon.log"));
    let (rss, anon, peak) = settle(&daemon, settle_s);
    let queued = rusqlite::Connection::open(&db)
        .and_then(|c| {
            c.query_row(
                "SELECT (SELECT count(*) FROM outbox WHERE state IN ('pending','in_flight')),
                        (SELECT count(*) FROM telemetry)",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
        })
        .unwrap();
    println!(
        "loaded (10,000 devices, {} outbox rows and {} telemetry points queued, clouds unreachable; made in {:.1} s): RSS {:.1} MiB ({:.1} MiB private), peak {:.1} MiB",
        queued.0,
        queued.1,
        made.as_secs_f64(),
        mib(rss),
        mib(anon),
        mib(peak)
    );
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}

/// A database of about `target_mib` MiB: 100 devices and 1 KiB telemetry payloads.
fn big_database(db: &Path, target_mib: u64) {
    Backlog {
        prefix: "big-",
        devices: 100,
        state: false,
        points: 0,
    }
    .write(db);
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    let pad = "x".repeat(1000);
    let rows = target_mib * 1024;
    let now = nn_gateway::model::UnixMillis::now().0;
    for chunk in 0..rows.div_ceil(50_000) {
        let tx = conn.transaction().unwrap();
        {
            let mut point = tx
                .prepare(
                    "INSERT INTO telemetry(device_id, device_ts, received_at, payload, content_type)
                     VALUES (?1, NULL, ?2, ?3, 'application/json')",
                )
                .unwrap();
            for i in chunk * 50_000..((chunk + 1) * 50_000).min(rows) {
                let payload = format!(r#"{{"n":{i},"pad":"{pad}"}}"#);
                point
                    .execute(rusqlite::params![(i % 100) as i64 + 1, now, payload])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
}

fn ready(runs: usize, db_mib: u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let made = Instant::now();
    big_database(&db, db_mib);
    let bytes = std::fs::metadata(&db).unwrap().len();
    let made = made.elapsed();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut env = environment(dir.path(), &db, support::free_port(), None, None);
    env.push((
        "NNGW_STORAGE__MAX_SIZE_MIB".into(),
        (db_mib * 4).to_string(),
    ));
    let mut ms = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).expect("READY=1 within 60 s");
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                break;
            }
        }
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(child.wait().unwrap().success(), "a clean stop");
        // Drain what the stop said (STOPPING=1, STATUS=…).
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while sock.recv(&mut buf).is_ok() {}
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "start to READY=1 on a {:.0} MiB database (made in {:.0} s), {runs} runs: median {:.0} ms (min {:.0}, max {:.0})",
        bytes as f64 / 1048576.0,
        made.as_secs_f64(),
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1]
    );
}

fn main() {
    let runs = support::env_or("FOOTPRINT_RUNS", 5);
    let db_mib = support::env_or("FOOTPRINT_DB_MIB", 1024);
    let settle_s = support::env_or("FOOTPRINT_SETTLE_S", 10);
    size();
    idle(settle_s);
    loaded(settle_s);
    ready(runs, db_mib);
}
