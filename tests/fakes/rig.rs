//! A gateway with work owed, run as the real `nn-gateway` binary against the fakes: a
//! database pre-filled by SQL (devices with reported state owed to both clouds, a telemetry
//! backlog owed to NetNeural), the daemon's environment (`NNGW_…`) pointing at the fakes, and
//! the process itself (peak memory from `/proc`, SIGKILL, SIGTERM).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use nn_gateway::config::{Config, Synchronous};
use nn_gateway::model::Target;
use nn_gateway::store::{Db, OpenOptions};

use super::{FakeGolioth, FakeNetNeural};

/// The organization and integration the daemon writes as (uuids: the fake checks the type).
pub const ORG: &str = "00000000-0000-4000-8000-000000000001";
pub const INTEGRATION: &str = "00000000-0000-4000-8000-000000000002";

/// What a pre-filled database holds.
#[derive(Clone, Copy, Debug)]
pub struct Backlog<'a> {
    /// Devices `{prefix}0..{prefix}{devices-1}`.
    pub prefix: &'a str,
    pub devices: u64,
    /// Each device has a reported state `{"fw":"1.0","n":<device>}` owed to both clouds.
    pub state: bool,
    /// Telemetry points `{"n":i,…}` round-robin over the devices, owed to NetNeural from the
    /// first (its cursor at 0).
    pub points: u64,
}

impl Backlog<'_> {
    /// Creates the database at `db` (schema by [`Db::open`]) and fills it in one transaction.
    pub fn write(&self, db: &Path) {
        let opts = OpenOptions {
            synchronous: Synchronous::Normal,
            targets: vec![Target::Golioth, Target::NetNeural],
            rejected_keep: 1000,
        };
        drop(Db::open(db, &opts).expect("a new database"));
        let mut conn = rusqlite::Connection::open(db).expect("the database");
        let now = nn_gateway::model::UnixMillis::now().0;
        let tx = conn.transaction().unwrap();
        {
            let mut device = tx
                .prepare(
                    "INSERT INTO device(key, origin, first_seen, last_seen) VALUES (?1, 'mqtt', ?2, ?2)",
                )
                .unwrap();
            let mut state = tx
                .prepare(
                    "INSERT INTO reported_state(device_id, doc, version, updated_at) VALUES (?1, ?2, 1, ?3)",
                )
                .unwrap();
            let mut outbox = tx
                .prepare(
                    "INSERT INTO outbox(target, operation, device_id, payload, idempotency_key,
                                        next_attempt_at, created_at, updated_at)
                     VALUES (?1, 'reported_state', ?2, ?3, ?4, ?5, ?5, ?5)",
                )
                .unwrap();
            let mut ids = Vec::with_capacity(self.devices as usize);
            for d in 0..self.devices {
                device
                    .execute(rusqlite::params![format!("{}{d}", self.prefix), now])
                    .unwrap();
                let id = tx.last_insert_rowid();
                ids.push(id);
                if self.state {
                    let doc = format!(r#"{{"fw":"1.0","n":{d}}}"#);
                    state.execute(rusqlite::params![id, doc, now]).unwrap();
                    for target in ["golioth", "netneural"] {
                        let key = format!("st:rig:{id}:1:{target}");
                        outbox
                            .execute(rusqlite::params![target, id, doc, key, now])
                            .unwrap();
                    }
                }
            }
            tx.execute(
                "INSERT INTO telemetry_cursor(target, delivered_through, updated_at)
                 VALUES ('netneural', 0, ?1)
                 ON CONFLICT(target) DO UPDATE SET delivered_through = 0",
                [now],
            )
            .unwrap();
            let mut point = tx
                .prepare(
                    "INSERT INTO telemetry(device_id, device_ts, received_at, payload, content_type)
                     VALUES (?1, NULL, ?2, ?3, 'application/json')",
                )
                .unwrap();
            for i in 0..self.points {
                let device = ids[(i % self.devices) as usize];
                let payload = format!(r#"{{"n":{i},"temp":21.5,"humidity":40.2,"battery":3.61}}"#);
                point
                    .execute(rusqlite::params![device, now, payload])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

/// The daemon's environment: database `db`, broker on `broker_port`, CoAP on an ephemeral
/// port, and each cloud given enabled against its fake (keys in files under `dir`).
pub fn environment(
    dir: &Path,
    db: &Path,
    broker_port: u16,
    golioth: Option<&FakeGolioth>,
    netneural: Option<&FakeNetNeural>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("NNGW_STORAGE__PATH".into(), db.display().to_string()),
        ("NNGW_MQTT__PORT".into(), broker_port.to_string()),
        ("NNGW_MQTT__CLIENT_ID".into(), "nn-gateway-rig".into()),
        ("NNGW_COAP__BIND".into(), "127.0.0.1:0".into()),
        ("NNGW_API__BIND".into(), "127.0.0.1:0".into()),
        ("NNGW_LOG__FORMAT".into(), "text".into()),
    ];
    let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
    if let Some(g) = golioth {
        let key = dir.join("golioth.key");
        std::fs::write(&key, format!("{}\n", super::golioth::DEFAULT_KEY)).unwrap();
        set("NNGW_GOLIOTH__ENABLED", "true".into());
        set("NNGW_GOLIOTH__API_URL", g.url());
        set("NNGW_GOLIOTH__PROJECT_ID", g.project().to_owned());
        set("NNGW_GOLIOTH__API_KEY_FILE", key.display().to_string());
        set("NNGW_GOLIOTH__RETRY_MIN", "100ms".into());
        set("NNGW_GOLIOTH__RETRY_MAX", "2s".into());
    }
    if let Some(n) = netneural {
        let key = dir.join("netneural.key");
        std::fs::write(&key, format!("{}\n", super::netneural::DEFAULT_KEY)).unwrap();
        set("NNGW_NETNEURAL__ENABLED", "true".into());
        set("NNGW_NETNEURAL__URL", n.url());
        set("NNGW_NETNEURAL__ORGANIZATION_ID", ORG.into());
        set("NNGW_NETNEURAL__INTEGRATION_ID", INTEGRATION.into());
        set("NNGW_NETNEURAL__API_KEY_FILE", key.display().to_string());
        set("NNGW_NETNEURAL__RETRY_MIN", "100ms".into());
        set("NNGW_NETNEURAL__RETRY_MAX", "2s".into());
    }
    env
}

/// A running `nn-gateway run`. Killed (SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the binary this test or bench was built with, its log in `log`.
    pub fn start(env: &[(String, String)], log: &Path) -> Daemon {
        let file = std::fs::File::create(log).expect("a log file");
        let child = Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the nn-gateway binary");
        Daemon {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// A `/proc/PID/status` field in KiB (`VmHWM` is the peak resident set, `VmRSS` now).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL, as a power cut would (nothing is flushed, nothing is said).
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// SIGTERM, and waits: whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        ok && child.wait().is_ok_and(|s| s.success())
    }

    /// What it logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Points the configuration at the fakes (either may be left out), with fast retries.
pub fn clouds(
    cfg: &mut Config,
    dir: &std::path::Path,
    golioth: Option<&FakeGolioth>,
    netneural: Option<&FakeNetNeural>,
) {
    if let Some(g) = golioth {
        let key = dir.join("golioth.key");
        std::fs::write(&key, format!("{}\n", super::golioth::DEFAULT_KEY)).unwrap();
        cfg.golioth.enabled = true;
        cfg.golioth.api_url = g.url().parse().unwrap();
        cfg.golioth.project_id = g.project().to_owned();
        cfg.golioth.api_key_file = Some(key);
        cfg.golioth.retry_min = Duration::from_millis(100);
        cfg.golioth.retry_max = Duration::from_secs(2);
        cfg.golioth.request_timeout = Duration::from_secs(2);
    }
    if let Some(n) = netneural {
        let key = dir.join("netneural.key");
        std::fs::write(&key, format!("{}\n", super::netneural::DEFAULT_KEY)).unwrap();
        cfg.netneural.enabled = true;
        cfg.netneural.url = Some(n.url().parse().unwrap());
        cfg.netneural.organization_id = ORG.into();
        cfg.netneural.integration_id = INTEGRATION.into();
        cfg.netneural.api_key_file = Some(key);
        cfg.netneural.retry_min = Duration::from_millis(100);
        cfg.netneural.retry_max = Duration::from_secs(2);
        cfg.netneural.request_timeout = Duration::from_secs(2);
        cfg.netneural.telemetry_batch = 200;
    }
}

/// Loads the key files as `Config::load` does (the test builds its config by hand).
pub fn with_keys(mut cfg: Config) -> Config {
    let read = |p: &Option<std::path::PathBuf>| {
        p.as_ref().map(|p| {
            nn_gateway::config::Secret::new(std::fs::read_to_string(p).unwrap().trim().to_owned())
        })
    };
    cfg.golioth.api_key = read(&cfg.golioth.api_key_file);
    cfg.netneural.api_key = read(&cfg.netneural.api_key_file);
    cfg
}
