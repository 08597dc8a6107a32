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
mod world;

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fakes::{Fault, Match};
use serde_json::{Value, json};
use support::Device;
use world::*;

/// How long the script may stay silent (a step of its own, one browser wait and a margin).
const SCRIPT_SILENCE: Duration = Duration::from_secs(60);
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

/// The shared world (`tests/world`) and what the console test adds to it.
struct Scene {
    w: World,
    /// The API's base URL and the token the daemon made beside its database.
    base: String,
    token: String,
    http: reqwest::Client,
    /// Publishes the devices' reported state.
    publisher: Device,
}

impl Scene {
    async fn api(&self, method: reqwest::Method, path: &str) -> Value {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }
}

/// The gateway with both clouds, [`EDITED`] registered and linked in both, and its API on a
/// port of its own (`support::config`) guarded by the token it made at its start.
async fn scene() -> Scene {
    let w = world("gw-console", |_| {}).await;
    registered(&w, EDITED).await;
    nn_gateway::cloud::install_crypto_provider();
    let token_file = w.site.dir.path().join(nn_gateway::api::TOKEN_FILE_NAME);
    let token = std::fs::read_to_string(token_file)
        .unwrap()
        .trim()
        .to_owned();
    let publisher = w.site.device("console-pub").await;
    Scene {
        base: format!("http://127.0.0.1:{}", w.site.gw.api_port),
        token,
        http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        publisher,
        w,
    }
}

/// Makes a conflict on `/desired/led` of [`CONFLICTED`] (agreed "off" everywhere, then "red"
/// in Golioth and "blue" in NetNeural before the next run); returns what the console must
/// show of it.
async fn make_conflict(s: &Scene) -> Value {
    conflict(&s.w, CONFLICTED).await;
    let pending = s.api(reqwest::Method::GET, "/api/v1/conflicts").await;
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
async fn resolution_lands(s: &Scene, id: &Value, value: &Value) {
    let w = &s.w;
    let want = json!({ "led": value });
    let gid = w.golioth.device_by_hardware_id(CONFLICTED).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The API asked the daemon for a run; one more settles NetNeural's side for certain.
    eventually("the resolution in Golioth", || {
        (w.golioth.state(&gid, "desired").as_ref() == Some(&want)).then_some(())
    })
    .await;
    sync(&w.site.gw.db).await;
    let nid = nn_device(&w.nn.rows("devices"), CONFLICTED).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(nn_desired(&w.nn, &nid), want, "in NetNeural");
    let c = s
        .api(reqwest::Method::GET, &format!("/api/v1/conflicts/{id}"))
        .await;
    assert_eq!(c["status"], "resolved", "{c}");
    assert_eq!(&c["resolved_value"], value, "{c}");
}

/// The console's files are served without a token, as what they are; the API's data is not.
async fn console_files_are_open_and_the_api_is_not(w: &Scene) {
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
    let s = scene().await;
    let w = &s.w;
    console_files_are_open_and_the_api_is_not(&s).await;
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
        s.token.as_str(),
    ]
    .join(",");
    let mut child = support::KillOnDrop(
        std::process::Command::new("node")
            .arg("console.mjs")
            .current_dir(&browser_dir)
            .env("CONSOLE_URL", &s.base)
            .env("CONSOLE_TOKEN", &s.token)
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
                s.publisher
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
            "make-conflict" => make_conflict(&s).await,
            "conflict-resolved" => {
                resolution_lands(&s, &data["id"], &data["value"]).await;
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
    s.w.site.gw.stop().await;
}
