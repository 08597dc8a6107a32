//! The local HTTP API over real HTTP: a gateway in process with real Mosquitto, the fake
//! clouds and a real SQLite file; requests from a real client (reqwest), as a script or the
//! console would send them.

mod fakes;
mod support;
mod world;

use std::time::{Duration, Instant};

use fakes::faults::{Fault, Match};
use reqwest::Method;
use serde_json::{Value, json};
use world::http::Http;
use world::*;

/// Every route the token guards, with a method it takes.
const GUARDED: &[(&str, &str)] = &[
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/lamp-1"),
    ("PUT", "/api/v1/devices/lamp-1/desired"),
    ("GET", "/api/v1/devices/lamp-1/telemetry"),
    ("GET", "/api/v1/queue"),
    ("POST", "/api/v1/queue/1/retry"),
    ("POST", "/api/v1/queue/retry-dead"),
    ("GET", "/api/v1/conflicts"),
    ("GET", "/api/v1/conflicts/1"),
    ("POST", "/api/v1/conflicts/1/resolve"),
    ("GET", "/api/v1/sync-log"),
    ("POST", "/api/v1/sync"),
    ("POST", "/api/v1/clouds/golioth/test"),
    ("GET", "/api/v1/config"),
    ("GET", "/metrics"),
];

/// Polls `check` until it returns `Some` (20 s at most).
async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn error_message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_with_the_token_and_only_with_it() {
    let w = world("gw-api-routes", |_| {}).await;
    let (gid, nid) = registered(&w, "lamp-1").await;
    let api = Http::of(&w.site.gw);

    // No token, a wrong one: 401 on every guarded route, in the one error shape.
    for (method, path) in GUARDED {
        let m: Method = method.parse().unwrap();
        for token in [None, Some("wrong")] {
            let (status, body) = api.call(m.clone(), path, token, None, &[]).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }
    // The probes need none.
    assert_eq!(
        api.call(Method::GET, "/healthz", None, None, &[]).await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        api.call(Method::GET, "/readyz", None, None, &[]).await,
        (200, json!({"ready": true}))
    );

    // status: the CLI's document, plus what the daemon knows live.
    let (status, s) = api.get("/api/v1/status").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["daemon_running"], true);
    assert_eq!(s["devices"], 2, "lamp-1 and the rig's subscription probe");
    assert_eq!(s["live"]["mqtt"], "connected");
    assert_eq!(s["live"]["clouds"]["golioth"]["state"], "online", "{s}");
    assert_eq!(s["live"]["sync_enabled"], true);
    let (ok, cli_status) = cli(&w.site.gw.db, &["status", "--json"]);
    assert!(ok, "{cli_status}");
    let cli_status: Value = serde_json::from_str(&cli_status).unwrap();
    for key in cli_status.as_object().unwrap().keys() {
        assert!(
            s.get(key).is_some(),
            "the API's status lacks the CLI's {key}"
        );
    }

    // devices: pages, search, one device with its links.
    for k in ["pump-1", "pump-2", "valve-1"] {
        let (status, body) = api
            .send(
                Method::PUT,
                &format!("/api/v1/devices/{k}/desired?create=true"),
                json!({"on": true}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, page) = api.get("/api/v1/devices?limit=2&offset=2").await;
    assert_eq!(page["total"], 5, "{page}");
    let keys: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["pump-1", "pump-2"]);
    let (_, found) = api.get("/api/v1/devices?q=PUMP").await;
    assert_eq!(found["total"], 2, "{found}");
    let (status, one) = api.get("/api/v1/devices/lamp-1").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["links"], json!({"golioth": gid, "netneural": nid}));
    assert_eq!(one["reported"], json!({"on": false}));
    let (status, body) = api.get("/api/v1/devices/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = api.get("/api/v1/devices/bad%20key").await;
    assert_eq!(status, 400, "{body}");

    // desired: reaches the device over MQTT; a typo'd device is refused, not created.
    let mut dev = subscribed(&w, "lamp-1").await;
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/devices/lamp-1/desired",
            json!({"led": "green"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["doc"], json!({"led": "green"}));
    assert_eq!(next_desired(&mut dev).await, json!({"led": "green"}));
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/devices/lamp-9/desired",
            json!({"a": 1}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(error_message(&body).contains("?create=true"), "{body}");
    let (status, body) = api
        .send(Method::PUT, "/api/v1/devices/lamp-1/desired", json!([1]))
        .await;
    assert_eq!(status, 400, "{body}");

    // telemetry, newest first.
    let pubber = w.site.device("lamp-1-tel").await;
    for i in 0..3 {
        pubber
            .publish("devices/lamp-1/telemetry", format!(r#"{{"t":{i}}}"#))
            .await;
    }
    let points = eventually("3 points", || {
        support::stored_points(&w.site.gw.db).ge(&3).then_some(())
    });
    points.await;
    let (status, points) = api.get("/api/v1/devices/lamp-1/telemetry?limit=2").await;
    assert_eq!(status, 200, "{points}");
    assert_eq!(points[0]["payload"], json!({"t": 2}));
    assert_eq!(points.as_array().unwrap().len(), 2);
    let rate = eventually_async(|| async {
        let (_, s) = api.get("/api/v1/status").await;
        s["live"]["ingest_per_s"].as_f64().filter(|r| *r > 0.0)
    })
    .await;
    assert!(rate > 0.0);
    let (status, body) = api.get("/api/v1/devices/lamp-1/telemetry?since=soon").await;
    assert_eq!(status, 400, "{body}");

    // queue and its retries.
    let (status, q) = api.get("/api/v1/queue").await;
    assert_eq!(status, 200, "{q}");
    assert!(q["rows"].is_array(), "{q}");
    let (status, q) = api.get("/api/v1/queue?cloud=netneural&state=dead").await;
    assert_eq!(status, 200, "{q}");
    let (status, q) = api.get("/api/v1/queue?state=lost").await;
    assert_eq!(status, 400, "{q}");
    assert_eq!(
        api.post("/api/v1/queue/retry-dead").await,
        (200, json!({"requeued": 0}))
    );
    let (status, _) = api.post("/api/v1/queue/999999/retry").await;
    assert_eq!(status, 404);

    // sync now, then the sync log shows the run.
    let before = cli_status["sync_last_run"]["started_ms"].as_i64();
    let (status, body) = api.post("/api/v1/sync").await;
    assert_eq!((status, body), (202, json!({"scheduled": true})));
    eventually("a new sync run", || {
        let db = nn_gateway::store::Db::open_readonly(&w.site.gw.db).ok()?;
        let run = db.sync_last_run().ok()??;
        (run["started_ms"].as_i64() != before).then_some(())
    })
    .await;
    let (status, log) = api.get("/api/v1/sync-log?limit=5").await;
    assert_eq!(status, 200, "{log}");
    let log = log.as_array().unwrap();
    assert!(!log.is_empty());
    let oldest = log.last().unwrap()["id"].as_i64().unwrap();
    let (_, older) = api
        .get(&format!("/api/v1/sync-log?before={oldest}&limit=5"))
        .await;
    assert!(
        older
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"].as_i64().unwrap() < oldest)
    );
    let (_, pushes) = api
        .get("/api/v1/sync-log?cloud=golioth&outcome=completed")
        .await;
    assert!(
        pushes
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["target"] == "golioth" && r["outcome"] == "completed"),
        "{pushes}"
    );

    // conflicts: none yet; an unknown one is 404.
    assert_eq!(api.get("/api/v1/conflicts").await, (200, json!([])));
    assert_eq!(api.get("/api/v1/conflicts/77").await.0, 404);

    // connection tests: one read each, then the exact error of a failing cloud.
    for cloud in ["golioth", "netneural"] {
        let (status, t) = api.post(&format!("/api/v1/clouds/{cloud}/test")).await;
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["ok"], true, "{t}");
        assert!(t["latency_ms"].as_f64().unwrap() > 0.0);
    }
    w.golioth
        .faults()
        .next(Match::get("/devices"), Fault::status(503), 1);
    let (_, t) = api.post("/api/v1/clouds/golioth/test").await;
    assert_eq!(t["ok"], false, "{t}");
    assert_eq!(t["status"], 503, "{t}");
    assert!(t["error"].as_str().unwrap().contains("503"), "{t}");
    assert_eq!(t["request"], "GET /v1/projects/{projectId}/devices");
    assert_eq!(api.post("/api/v1/clouds/other/test").await.0, 404);

    // config: the effective configuration, no secret in it.
    let (status, c) = api.get("/api/v1/config").await;
    assert_eq!(status, 200);
    let toml = c["toml"].as_str().unwrap();
    assert!(
        toml.contains("[api]") && toml.contains("api_key_file"),
        "{toml}"
    );
    for secret in [
        fakes::golioth::DEFAULT_KEY,
        fakes::netneural::DEFAULT_KEY,
        &api.token,
    ] {
        assert!(!toml.contains(secret), "a secret in the config view");
    }

    // Not a route, not a method: JSON too.
    let (status, body) = api.get("/api/v1/nothing").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = api
        .call(
            Method::DELETE,
            "/api/v1/status",
            Some(&api.token),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 405, "{body}");
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_oversized_bodies_are_refused_with_the_reason() {
    let w = world("gw-api-bodies", |_| {}).await;
    let api = Http::of(&w.site.gw);
    let path = "/api/v1/devices/d1/desired?create=true";
    let raw = |s: &str| Some(reqwest::Body::from(s.to_owned()));

    let (status, body) = api
        .call(Method::PUT, path, Some(&api.token), raw(r#"{"a": "#), &[])
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(error_message(&body).contains("EOF"), "{body}");

    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(70 * 1024));
    let (status, body) = api
        .call(Method::PUT, path, Some(&api.token), raw(&big), &[])
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");

    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/conflicts/1/resolve",
            Some(&api.token),
            raw(r#"{"use": "mine"}"#),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/conflicts/1/resolve",
            Some(&api.token),
            raw(r#"{"winner": "local"}"#),
            &[],
        )
        .await;
    assert!(status == 400 || status == 422, "{status} {body}");
    assert!(error_message(&body).contains("winner"), "{body}");
    let (status, body) = api.get("/api/v1/devices?limit=ten").await;
    assert_eq!(status, 400, "{body}");
    // Nothing of those was stored.
    assert_eq!(api.get("/api/v1/devices").await.1["total"], 0);
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_resolutions_of_one_conflict_exactly_one_wins_and_lands_in_both_clouds() {
    let w = world("gw-api-resolve", |_| {}).await;
    let (gid, nid) = conflict(&w, "lamp-3").await;
    let api = Http::of(&w.site.gw);
    let (status, list) = api.get("/api/v1/conflicts").await;
    assert_eq!(status, 200);
    let c = &list.as_array().unwrap()[0];
    assert_eq!(c["field"], "/desired/led", "{c}");
    let id = c["id"].as_i64().unwrap();
    let (_, shown) = api.get(&format!("/api/v1/conflicts/{id}")).await;
    assert_eq!(shown["base"], "off", "{shown}");

    let path = format!("/api/v1/conflicts/{id}/resolve");
    let (a, b) = tokio::join!(
        api.send(Method::POST, &path, json!({"value": "green"})),
        api.send(Method::POST, &path, json!({"value": "amber"})),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let (won, lost) = if a.0 == 200 { (a, b) } else { (b, a) };
    assert_eq!(lost.1["error"]["code"], "conflict", "{lost:?}");
    assert!(error_message(&lost.1).contains("already"), "{lost:?}");
    let value = won.1["value"].clone();

    // The resolution rang a sync run: the winner lands in both clouds.
    eventually("the resolution in Golioth", || {
        (w.golioth.state(&gid, "desired") == Some(json!({"led": value.clone()}))).then_some(())
    })
    .await;
    eventually("the resolution in NetNeural", || {
        (nn_desired(&w.nn, &nid) == json!({"led": value.clone()})).then_some(())
    })
    .await;
    assert_eq!(api.get("/api/v1/conflicts").await.1, json!([]));
    let (_, all) = api.get("/api/v1/conflicts?all=true").await;
    assert_eq!(all[0]["status"], "resolved", "{all}");
    w.site.gw.stop().await;
}

#[test]
fn a_network_bind_without_a_chosen_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gw.db");
    let db = db.to_str().unwrap();
    let env = [
        ("NNGW_STORAGE__PATH", db),
        ("NNGW_API__BIND", "0.0.0.0:0"),
        ("NNGW_COAP__BIND", "127.0.0.1:0"),
    ];
    for command in ["check-config", "run"] {
        let (code, out) = support::nngw(&[command], &env);
        assert_eq!(code, Some(78), "{command}: {out}");
        assert!(
            out.contains("api.bind") && out.contains("0.0.0.0:0") && out.contains("token_file"),
            "{command}: {out}"
        );
    }
    assert!(!std::path::Path::new(db).exists(), "nothing was started");
    // With a token chosen it is accepted, and the token is not printed.
    let token = dir.path().join("token");
    std::fs::write(&token, "a-chosen-token-0123\n").unwrap();
    let mut env = env.to_vec();
    env.push(("NNGW_API__TOKEN_FILE", token.to_str().unwrap()));
    let (code, out) = support::nngw(&["check-config"], &env);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("a-chosen-token-0123"), "{out}");
}
