//! Shared test rig: a real Mosquitto on a free port, an in-process gateway on port 0, and
//! helpers that watch the real SQLite file. Nothing here fakes a peer.
#![allow(dead_code)] // Each test binary uses a different part of the rig.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nn_gateway::config::{Config, Source, Synchronous};
use nn_gateway::daemon::{self, Sockets};
use nn_gateway::metrics::Metrics;
use nn_gateway::notify::Notifier;
use nn_gateway::store::Db;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Set (to anything but empty, `0` or `false`; CI services set `CI=true`, and so does
/// `.ci/test`) to make a test whose prerequisite is missing fail instead of skipping: CI must
/// run every test. Not an `NNGW_` name: the daemon, which the tests run with their environment,
/// takes every `NNGW_` variable for a configuration key and refuses unknown ones.
pub const NO_SKIP_VAR: &str = "CI";

/// For a test that cannot run here because `missing` (root, a tool) is not available: says so
/// on stderr, past the test harness's output capture so it shows even when the test passes,
/// and returns so the test can end; or, with [`NO_SKIP_VAR`] set, fails the test.
#[track_caller]
pub fn skip(test: &str, missing: &str) {
    if std::env::var(NO_SKIP_VAR).is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false")) {
        panic!("{test} cannot run: {missing}; {NO_SKIP_VAR} is set, and CI skips no test");
    }
    use std::io::Write as _;
    let bar = "!".repeat(78);
    // `eprintln!` would be captured (and hidden) by the harness; a direct write is not.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\n!!! SKIPPED {test}: {missing}.\n!!! This test did NOT run. \
         Set {NO_SKIP_VAR}=true to make this a failure (.ci/test does).\n{bar}\n"
    );
}

/// A free TCP port on loopback (bound, then released for the broker to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mosquitto broker for one test, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto with limits raised: its defaults (`max_queued_messages 1000`,
    /// `max_inflight_messages 20`) silently drop messages for a subscriber that is behind or
    /// offline.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(tempfile::tempdir().unwrap(), "allow_anonymous true\n")
    }

    /// Starts a broker that only lets in `user` with `password`.
    pub fn start_with_password(user: &str, password: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        let status = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&file)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd is installed with mosquitto");
        assert!(status.success());
        // Mosquitto started as root reads its files after dropping to its own user.
        use std::os::unix::fs::PermissionsExt;
        for path in [dir.path(), file.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let access = format!("allow_anonymous false\npassword_file {}\n", file.display());
        Mosquitto::start_with(dir, &access)
    }

    /// Starts a broker whose listener speaks TLS: `tls` holds the listener's lines (`cafile`,
    /// `certfile`, `keyfile`, `require_certificate` …); anonymous clients are let in. The
    /// files must be readable by Mosquitto's own user (it drops root before reading them).
    pub fn start_tls(tls: &str) -> Mosquitto {
        Mosquitto::start_with(
            tempfile::tempdir().unwrap(),
            &format!("{tls}\nallow_anonymous true\n"),
        )
    }

    fn start_with(mut dir: tempfile::TempDir, access: &str) -> Mosquitto {
        for _ in 0..5 {
            match Mosquitto::try_start_on(free_port(), access, dir) {
                Ok(m) => return m,
                Err(back) => dir = back,
            }
        }
        panic!("mosquitto did not start");
    }

    /// Starts a broker on a port chosen earlier (for a gateway started before its broker).
    pub fn start_on(port: u16) -> Mosquitto {
        Mosquitto::try_start_on(port, "allow_anonymous true\n", tempfile::tempdir().unwrap())
            .unwrap_or_else(|_| panic!("mosquitto did not start"))
    }

    /// Hands `dir` back when the port was taken meanwhile.
    fn try_start_on(
        port: u16,
        access: &str,
        dir: tempfile::TempDir,
    ) -> Result<Mosquitto, tempfile::TempDir> {
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{access}persistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 1000\nlog_dest stderr\nlog_type error\n"
            ),
        )
        .unwrap();
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "mosquitto must be installed (apt-get install mosquitto); .ci/test installs it",
            );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Mosquitto {
                    port,
                    child,
                    _dir: dir,
                });
            }
            if child.try_wait().unwrap().is_some() {
                return Err(dir); // Port taken meanwhile.
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(dir)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The embedded default configuration pointed at a test broker and a temporary database,
/// with CoAP on an ephemeral port.
pub fn config(dir: &Path, broker_port: u16, client_id: &str) -> Config {
    config_with_env(dir, broker_port, client_id, &[]).unwrap()
}

/// [`config`] loaded with `env` as the environment (`NNGW_…` keys), so that what the loader
/// reads from files (secrets, certificates) is read the daemon's way; its error if it refuses.
pub fn config_with_env(
    dir: &Path,
    broker_port: u16,
    client_id: &str,
    env: &[(String, String)],
) -> Result<Config, nn_gateway::config::ConfigError> {
    let mut cfg = Config::load_with(&Source::Embedded, env, None)?;
    cfg.storage.path = dir.join("gateway.db");
    cfg.storage.synchronous = Synchronous::Normal;
    cfg.mqtt.port = broker_port;
    cfg.mqtt.client_id = client_id.to_owned();
    cfg.mqtt.reconnect_min = Duration::from_millis(50);
    cfg.mqtt.reconnect_max = Duration::from_millis(500);
    cfg.coap.bind = "127.0.0.1:0".parse().unwrap();
    cfg.api.bind = "127.0.0.1:0".parse().unwrap();
    cfg.gateway.downlink_poll = Duration::from_millis(100);
    Ok(cfg)
}

/// The reported document of device `key` in the mirror, if it has one.
pub fn reported(db: &Db, key: &str) -> Option<serde_json::Value> {
    let key = nn_gateway::model::DeviceKey::parse(key).ok()?;
    db.device(&key).ok()??.0.reported
}

/// A benchmark's knob: the variable `name` parsed, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process's stdout then stderr, as one text (what an operator sees in a terminal).
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `nn-gateway` binary this test was built with, run to completion with `args` and the
/// variables in `env` added: its exit code and [`output_text`].
pub fn nngw<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    args: &[&str],
    env: &[(K, V)],
) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("the nn-gateway binary runs");
    (out.status.code(), output_text(&out))
}

/// A gateway running in this process.
pub struct Gateway {
    pub shutdown: CancellationToken,
    pub coap_port: u16,
    /// The HTTP API's port (0 when `[api]` is off).
    pub api_port: u16,
    pub db: PathBuf,
    /// The daemon's metrics, as `/metrics` serves them.
    pub metrics: Metrics,
    task: JoinHandle<Result<(), daemon::DaemonError>>,
}

/// How long a gateway may take from start to its first heartbeat.
const START_TIMEOUT: Duration = Duration::from_secs(20);

impl Gateway {
    /// Starts the daemon and returns once it runs with its store open (see
    /// [`Gateway::start_with`]).
    pub async fn start(cfg: Config) -> Gateway {
        Gateway::start_with(cfg, Notifier::disabled()).await
    }

    /// Starts the daemon with `notifier` and returns once its store is open and its main loop
    /// runs: once the database holds a heartbeat of this run. The daemon writes it through the
    /// store thread right after READY=1, so a test that then opens the database itself (as
    /// `desired set` does) never races the daemon's first open of a fresh file. The heartbeat,
    /// not READY=1, is what the rig watches because the caller may want the notifications
    /// itself (tests/systemd.rs does). Panics with the daemon's error if it stops instead.
    pub async fn start_with(cfg: Config, notifier: Notifier) -> Gateway {
        let sockets = Sockets::bind(&cfg).await.unwrap();
        let coap_port = sockets
            .coap
            .as_ref()
            .map_or(0, |s| s.local_addr().unwrap().port());
        let api_port = sockets
            .api
            .as_ref()
            .map_or(0, |s| s.local_addr().unwrap().port());
        let shutdown = CancellationToken::new();
        let db = cfg.storage.path.clone();
        let started = nn_gateway::model::UnixMillis::now().0;
        let metrics = Metrics::new();
        let (token, counted) = (shutdown.clone(), metrics.clone());
        let mut task = tokio::spawn(async move {
            // Kept for the daemon's life: reloads end when their sender goes.
            let (_reloads, reloads) = tokio::sync::watch::channel(cfg.clone());
            daemon::run_with_metrics(cfg, sockets, token, notifier, reloads, counted).await
        });
        let deadline = Instant::now() + START_TIMEOUT;
        while !beat_since(&db, started) {
            if task.is_finished() {
                match (&mut task).await {
                    Ok(Err(e)) => panic!("the gateway did not start: {e}"),
                    Ok(Ok(())) => panic!("the gateway stopped before its first heartbeat"),
                    Err(e) => panic!("the gateway's task failed: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no heartbeat from the gateway within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Gateway {
            shutdown,
            coap_port,
            api_port,
            db,
            metrics,
            task,
        }
    }

    /// Fires shutdown and waits for the daemon to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("daemon did not stop in time")
            .unwrap()
            .unwrap();
    }
}

/// Whether the database holds a heartbeat written at or after `since` (unix ms) by a daemon
/// that has not stopped.
fn beat_since(db: &Path, since: i64) -> bool {
    Db::open_readonly(db)
        .and_then(|d| d.status())
        .is_ok_and(|s| s.daemon.is_some_and(|b| b.at >= since && !b.stopped))
}

/// Polls `check` against a read-only connection to the database until it returns `Some`.
pub async fn wait_for<T>(
    db: &Path,
    timeout: Duration,
    mut check: impl FnMut(&Db) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(conn) = Db::open_readonly(db)
            && let Some(v) = check(&conn)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An MQTT client standing in for devices, driven on its own task.
pub struct Device {
    pub client: AsyncClient,
    pub events: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    connected: tokio::sync::watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Device {
    pub async fn connect(port: u16, id: &str) -> Device {
        Device::connect_with(MqttOptions::new(id, "127.0.0.1", port)).await
    }

    pub async fn connect_with(mut opts: MqttOptions) -> Device {
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(200)
            .set_max_packet_size(1 << 22, 1 << 22);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (up_tx, mut connected) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = up_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), connected.wait_for(|up| *up))
            .await
            .unwrap()
            .unwrap();
        Device {
            client,
            events,
            connected,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A child process (the daemon binary) that is SIGKILLed and reaped when dropped, so a test
/// that fails leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CBOR encoding of a JSON value, as a device would send it.
pub fn cbor(v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

/// Publishes a probe state until the gateway has stored one, proving its subscription is in
/// place (messages published before the broker knows of the subscription go nowhere). Leaves a
/// device named `probe` behind.
pub async fn wait_subscribed(dev: &Device, db: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        dev.publish("devices/probe/state", br#"{"probe":true}"#.to_vec())
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(conn) = Db::open_readonly(db)
            && conn
                .devices()
                .is_ok_and(|d| d.iter().any(|d| d.key == "probe"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "gateway never subscribed");
    }
}

/// Asserts that messages `0..total`, numbered in field `n` and spread round-robin over
/// devices `{prefix}0..{prefix}{devices-1}`, are each stored exactly once, in order per device.
pub fn assert_each_once_in_order(db: &Db, prefix: &str, devices: u64, total: u64) {
    for d in 0..devices {
        let key = nn_gateway::model::DeviceKey::parse(&format!("{prefix}{d}")).unwrap();
        let numbers: Vec<u64> = db
            .telemetry_payloads(&key)
            .unwrap()
            .iter()
            .map(|p| p["n"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (0..total).filter(|i| i % devices == d).collect();
        assert_eq!(numbers.len(), expected.len(), "{prefix}{d}: wrong count");
        assert!(
            numbers == expected,
            "{prefix}{d}: not every message once, in order"
        );
    }
}

/// Runs the `nn-gateway` binary's daemon with `env` (plus text logs) for `duration`, stops it
/// with SIGTERM, and returns whether it exited cleanly and what it logged.
pub fn run_daemon_binary_for(env: &[(&str, &str)], duration: Duration) -> (bool, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_nn-gateway"))
        .arg("run")
        .envs(env.iter().copied())
        .env("NNGW_LOG__FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(duration);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Messages `0..total` as devices `{prefix}0..{prefix}{devices-1}` send them, round-robin:
/// QoS 1 telemetry `{"n": i<extra>}` (`extra` adds fields, e.g. `,"pad":"xx"`).
pub struct Numbered<'a> {
    pub prefix: &'a str,
    pub devices: u64,
    pub total: u64,
    pub extra: &'a str,
}

impl Numbered<'_> {
    /// Builds every message, then publishes them from one client on a task of their own. The
    /// returned task ends when the broker has acknowledged each one.
    pub fn publish(&self, port: u16, client_id: &str) -> JoinHandle<()> {
        let messages: Vec<(String, String)> = (0..self.total)
            .map(|i| {
                let topic = format!("devices/{}{}/telemetry", self.prefix, i % self.devices);
                (topic, format!(r#"{{"n":{i}{}}}"#, self.extra))
            })
            .collect();
        let total = self.total;
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                for (topic, payload) in messages {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                }
                client // Kept alive until every PUBACK is in.
            });
            let mut acks = 0;
            while acks < total {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acks += 1,
                    Ok(_) => {}
                    Err(e) => panic!("test publisher lost the broker: {e}"),
                }
            }
            drop(publisher.await);
        })
    }
}

/// Telemetry points in the database (0 while it cannot be opened).
pub fn stored_points(db: &Path) -> u64 {
    Db::open_readonly(db)
        .and_then(|d| d.status())
        .map_or(0, |s| s.telemetry_points as u64)
}

/// Waits until at least `count` telemetry points are stored.
pub async fn wait_for_points(db: &Path, count: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while stored_points(db) < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} points stored within {timeout:?}",
            stored_points(db)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A site for one test: its own broker and a gateway on a temporary database.
pub struct Site {
    pub broker: Mosquitto,
    pub gw: Gateway,
    pub dir: tempfile::TempDir,
}

impl Site {
    pub async fn start(client_id: &str) -> Site {
        Site::start_with(client_id, |_, _| {}).await
    }

    /// Lets the test change the configuration (given the temporary directory) first.
    pub async fn start_with(client_id: &str, tweak: impl FnOnce(&mut Config, &Path)) -> Site {
        let broker = Mosquitto::start();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), broker.port, client_id);
        tweak(&mut cfg, dir.path());
        let gw = Gateway::start(cfg).await;
        Site { broker, gw, dir }
    }

    /// A device client, returned once the gateway's subscription is proven.
    pub async fn device(&self, id: &str) -> Device {
        let dev = Device::connect(self.broker.port, id).await;
        wait_subscribed(&dev, &self.gw.db).await;
        dev
    }
}
