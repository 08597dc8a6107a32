//! The web console in a real browser. Real: Mosquitto, the daemon in this process with its
//! API and console on a loopback port of its own, its SQLite file, HTTP, and Debian's headless
//! Chromium driven by playwright-core (`tests/browser/console.mjs`). Faked: the two clouds
//! (`tests/fakes`), scripted here to fail and recover.
//!
//! The script walks the screens as an operator would and asks this test, one line at a time,
//! for what only the other side can do: `step NAME JSON` on its stdout, answered `ok JSON` on
//! its stdin once done (a cloud going down, a conflict made in both clouds) and checked (the
//! desired document the console saved arrives at the device over MQTT; the conflict the
//! console resolved lands in both clouds). Its screenshots of every screen, at desktop size
//! and at 375 px wide, are written to `target/console-screenshots/`.
//!
//! Needs `node`, `/usr/bin/chromium` (or `$CHROMIUM`) and `tests/browser/node_modules`
//! (`npm ci`); `.ci/test` installs them. Without them the test skips loudly, or fails under
//! `CI=true`.

mod fakes;
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fakes::rig::{clouds, with_keys};
use fakes::{FakeGolioth, FakeNetNeural, Fault, Match};
use serde_json::{Value, json};
use std::io::{BufRead as _, Read as _, Write as _};
use support::{Device, Site};

const WAIT: Duration = Duration::from_secs(20);
/// How long the script may stay silent (a step of its own, one browser wait and a margin).
const SCRIPT_SILENCE: Duration = Duration::from_secs(60);
const TOKEN: &str = "console-test-token-6f1c2a";
/// The device whose desired document the console edits, and the one that gets a conflict.
const EDITED: &str = "lamp-1";
const CONFLICTED: &str = "lamp-2";

/// The browser, or what is missing for this test to run.
fn prerequisites(browser_dir: &Path) -> Result<PathBuf, String> {
    let chromium =
        std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from);
    if !chromium.exists() {
        return Err(format!(
            "no browser at {} (apt-get install chromium)",
            chromium.display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("no `node` (apt-get install nodejs npm)".into());
    }
    if !browser_dir.join("node_modules/playwright-core").is_dir() {
        return Err(format!(
            "no playwright-core (npm ci in {})",
            browser_dir.display()
        ));
    }
    Ok(chromium)
}

struct World {
    site: Site,
    golioth: FakeGolioth,
    nn: FakeNetNeural,
    base: String,
    http: reqwest::Client,
    /// Publishes the devices' reported state.
    publisher: Device,
}

impl World {
    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    fn golioth_id(&self, key: &str) -> Option<String> {
        self.golioth
            .device_by_hardware_id(key)
            .map(|d| d["id"].as_str().unwrap().to_owned())
    }

    fn nn_id(&self, key: &str) -> Option<String> {
        self.nn.rows("devices").into_iter().find_map(|d| {
            d["hardware_ids"]
                .as_array()
                .is_some_and(|ids| ids.contains(&Value::from(key)))
                .then(|| d["id"].as_str().unwrap().to_owned())
        })
    }

    fn nn_desired(&self, key: &str) -> Value {
        let id = self.nn_id(key).unwrap();
        self.nn.row("devices", &id).unwrap()["metadata"]["desired"].clone()
    }

    /// One sync run, started now (SIGUSR1 to this process, as `nn-gateway sync now` does).
    async fn sync(&self) {
        let db = self.site.gw.db.clone();
        tokio::task::spawn_blocking(move || nn_gateway::cli::sync_now(&db, WAIT).unwrap())
            .await
            .unwrap();
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what`.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateway with both clouds, two devices registered and linked in both, and the API on
/// a free port with the test's token.
async fn world() -> World {
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    let site = Site::start_with("gw-console", |cfg, dir| {
        clouds(cfg, dir, Some(&golioth), Some(&nn));
        cfg.sync.interval = Duration::from_secs(3600);
        let token_file = dir.join("console-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        cfg.api.enabled = true; // on port 0 (support::config)
        cfg.api.token_file = Some(token_file);
        // As `Config::load` reads it (the rig builds its config by hand).
        cfg.api.token = Some(nn_gateway::config::Secret::new(TOKEN.to_owned()));
        *cfg = with_keys(cfg.clone());
    })
    .await;
    nn_gateway::cloud::install_crypto_provider();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let publisher = site.device("console-pub").await;
    let w = World {
        base: format!("http://127.0.0.1:{}", site.gw.api_port),
        site,
        golioth,
        nn,
        http,
        publisher,
    };
    for key in [EDITED, CONFLICTED] {
        w.publisher
            .publish(&format!("devices/{key}/state"), r#"{"on":false}"#)
            .await;
    }
    let db = w.site.gw.db.clone();
    eventually("both devices linked to both clouds in the mirror", || {
        let conn = rusqlite::Connection::open(&db).ok()?;
        let linked: i64 = conn
            .query_row(
                "SELECT count(*) FROM device WHERE key IN (?1, ?2)
                   AND golioth_id IS NOT NULL AND netneural_id IS NOT NULL",
                [EDITED, CONFLICTED],
                |r| r.get(0),
            )
            .ok()?;
        (linked == 2).then_some(())
    })
    .await;
    w.sync().await;
    w
}

/// Makes a conflict on `/desired/led` of [`CONFLICTED`]: agreed "off" everywhere, then "red"
/// in Golioth and "blue" in NetNeural before the next run. Returns what the console must show.
async fn make_conflict(w: &World) -> Value {
    w.api(
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{CONFLICTED}/desired"),
        Some(json!({"led": "off"})),
    )
    .await;
    w.sync().await;
    let gid = w.golioth_id(CONFLICTED).unwrap();
    assert_eq!(
        w.golioth.state(&gid, "desired"),
        Some(json!({"led": "off"}))
    );
    w.golioth.set_state(&gid, "desired", json!({"led": "red"}));
    let nid = w.nn_id(CONFLICTED).unwrap();
    let mut metadata = w.nn.row("devices", &nid).unwrap()["metadata"].clone();
    metadata["desired"] = json!({"led": "blue"});
    w.nn.edit_device(&nid, json!({ "metadata": metadata }));
    w.sync().await;
    let pending = w.api(reqwest::Method::GET, "/api/v1/conflicts", None).await;
    let pending = pending.as_array().unwrap();
    assert_eq!(pending.len(), 1, "one conflict: {pending:#?}");
    let c = &pending[0];
    assert_eq!(
        (c["device"].as_str(), c["field"].as_str()),
        (Some(CONFLICTED), Some("/desired/led"))
    );
    json!({"id": c["id"], "base": c["base"], "sides": [c["local"], c["remote"]]})
}

/// Waits for the console's resolution (`value`) to land in both clouds.
async fn resolution_lands(w: &World, id: &Value, value: &Value) {
    let want = json!({ "led": value });
    let gid = w.golioth_id(CONFLICTED).unwrap();
    // The API asked the daemon for a run; one more settles NetNeural's side for certain.
    eventually("the resolution in Golioth", || {
        (w.golioth.state(&gid, "desired").as_ref() == Some(&want)).then_some(())
    })
    .await;
    w.sync().await;
    assert_eq!(w.nn_desired(CONFLICTED), want, "in NetNeural");
    let c = w
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/conflicts/{id}"),
            None,
        )
        .await;
    assert_eq!(c["status"], "resolved", "{c}");
    assert_eq!(&c["resolved_value"], value, "{c}");
}

/// The console's files are served without a token, as what they are; the API's data is not.
async fn console_files_are_open_and_the_api_is_not(w: &World) {
    for (path, kind) in [
        ("/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = w
            .http
            .get(format!("{}{path}", w.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let content_type = h["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert!(h.contains_key("etag"), "{path}");
    }
    let r = w
        .http
        .get(format!("{}/api/v1/status", w.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Waits for `want` on the device's desired topic.
async fn device_receives(sub: &mut Device, key: &str, want: &Value) {
    let topic = format!("devices/{key}/desired");
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let p = tokio::time::timeout(left, sub.events.recv())
            .await
            .unwrap_or_else(|_| panic!("{want} never published on {topic}; saw {seen:?}"))
            .unwrap();
        let doc: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
        if p.topic == topic && &doc == want {
            return;
        }
        seen.push((p.topic, doc));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_and_acts_on_the_gateway_through_the_console_in_a_real_browser() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = match prerequisites(&browser_dir) {
        Ok(c) => c,
        Err(missing) => return support::skip("the console's browser test", &missing),
    };
    let started = Instant::now();
    let w = world().await;
    console_files_are_open_and_the_api_is_not(&w).await;
    let mut sub = Device::connect(w.site.broker.port, "console-device").await;
    sub.client
        .subscribe(
            format!("devices/{EDITED}/desired"),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let secrets = [
        fakes::golioth::DEFAULT_KEY,
        fakes::netneural::DEFAULT_KEY,
        TOKEN,
    ]
    .join(",");
    let mut child = support::KillOnDrop(
        std::process::Command::new("node")
            .arg("console.mjs")
            .current_dir(&browser_dir)
            .env("CONSOLE_URL", &w.base)
            .env("CONSOLE_TOKEN", TOKEN)
            .env("CONSOLE_SECRETS", secrets)
            .env("CONSOLE_DEVICE", EDITED)
            .env("CONSOLE_SCREENSHOTS", &shots)
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs"),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    // The script's output, read on threads of their own (its pipes block).
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.0.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut transcript = String::new();
    let mut steps = Vec::new();
    while let Some(line) = tokio::time::timeout(SCRIPT_SILENCE, lines.recv())
        .await
        .unwrap_or_else(|_| panic!("console.mjs silent for {SCRIPT_SILENCE:?}:\n{transcript}"))
    {
        transcript.push_str(&line);
        transcript.push('\n');
        let Some((name, data)) = line.strip_prefix("step ").and_then(|s| s.split_once(' ')) else {
            continue;
        };
        let data: Value = serde_json::from_str(data).unwrap();
        let reply = match name {
            "golioth-down" => {
                w.golioth.faults().always(Match::any(), Fault::status(503));
                // Something for the lane to send, so it finds out.
                w.publisher
                    .publish(&format!("devices/{EDITED}/state"), r#"{"on":true}"#)
                    .await;
                json!({})
            }
            "golioth-up" | "netneural-up" => {
                w.golioth.faults().clear();
                w.nn.faults().clear();
                json!({})
            }
            "netneural-down" => {
                w.nn.faults().always(Match::any(), Fault::status(503));
                json!({})
            }
            "desired-saved" => {
                assert_eq!(data["device"], EDITED);
                device_receives(&mut sub, EDITED, &data["desired"]).await;
                json!({})
            }
            "make-conflict" => make_conflict(&w).await,
            "conflict-resolved" => {
                resolution_lands(&w, &data["id"], &data["value"]).await;
                json!({})
            }
            other => panic!("console.mjs asked for an unknown step {other}"),
        };
        steps.push(name.to_owned());
        stdin
            .write_all(format!("ok {reply}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("console.mjs reads its answers");
    }
    let status = child.0.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(
        status.success(),
        "console.mjs failed ({status}):\n{transcript}\n{errors}"
    );
    let expected = [
        "golioth-down",
        "golioth-up",
        "desired-saved",
        "make-conflict",
        "conflict-resolved",
        "netneural-down",
        "netneural-up",
    ];
    assert_eq!(steps, expected, "every scenario ran:\n{transcript}");
    for name in [
        "overview",
        "devices",
        "device",
        "conflicts",
        "sync",
        "config",
        "phone-overview",
    ] {
        assert!(
            shots.join(format!("{name}.png")).is_file(),
            "no screenshot {name}.png"
        );
    }
    eprintln!(
        "{transcript}console browser test: {:?} in all",
        started.elapsed()
    );
    w.site.gw.stop().await;
}
