//! The Golioth webhook over real HTTP: a gateway in process with real Mosquitto, the fake
//! clouds and a real SQLite file; webhooks shaped as Golioth Pipelines' webhook destination
//! sends them (CloudEvents headers), from a real client.

mod fakes;
mod support;
mod world;

use std::time::{Duration, Instant};

use fakes::faults::Match;
use reqwest::Method;
use serde_json::{Value, json};
use world::http::Http;
use world::*;

const SECRET: &str = "webhook-secret-for-tests";

/// A world whose API takes Golioth webhooks (secret [`SECRET`], pulls at most every
/// `min_interval` per device).
async fn webhook_world(client_id: &str, min_interval: Duration, hmac: Option<&str>) -> World {
    let hmac = hmac.map(str::to_owned);
    world(client_id, move |cfg| {
        cfg.api.webhook_secret = Some(nn_gateway::config::Secret::new(SECRET));
        cfg.api.webhook_min_interval = min_interval;
        cfg.api.webhook_hmac_key = hmac.map(nn_gateway::config::Secret::new);
    })
    .await
}

/// What Golioth Pipelines' webhook destination sends for a device's stream data.
async fn hook(api: &Http, project: &str, device: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut headers = vec![
        ("ce-source", device),
        ("ce-subject", project),
        ("ce-type", "io.golioth.stream"),
        ("ce-specversion", "1.0"),
    ];
    headers.extend_from_slice(extra);
    let body = reqwest::Body::from(r#"{"temp":21.5}"#);
    api.call(
        Method::POST,
        "/api/v1/webhooks/golioth",
        None,
        Some(body),
        &headers,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_golioth_webhook_brings_a_desired_change_to_the_device_within_two_seconds() {
    let w = webhook_world("gw-api-hook", Duration::from_secs(2), None).await;
    let (gid, nid) = registered(&w, "lamp-4").await;
    let mut dev = subscribed(&w, "lamp-4").await;
    let api = Http::of(&w.site.gw);
    let project = w.golioth.project().to_owned();

    w.golioth
        .set_state(&gid, "desired", json!({"led": "violet"}));
    let mark = w.golioth.faults().mark();
    let sent = Instant::now();
    let (status, body) = hook(&api, &project, &gid, &[("x-nngw-webhook-secret", SECRET)]).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["pull"], "scheduled");
    let got = tokio::time::timeout(Duration::from_secs(2), dev.events.recv())
        .await
        .unwrap_or_else(|_| panic!("not on the device within 2 s of the webhook"))
        .unwrap();
    let took = sent.elapsed();
    assert_eq!(
        serde_json::from_slice::<Value>(&got.payload).unwrap(),
        json!({"led": "violet"})
    );
    // One device read, not the project's list.
    let reads = w.golioth.faults().counts_by_kind_since(mark).reads;
    assert!(reads <= 3, "{reads} Golioth reads for one device");
    assert_eq!(
        w.golioth
            .faults()
            .count_since(mark, &Match::get(&format!("/projects/{project}/devices?"))),
        0
    );
    // NetNeural gets it in the same pull (merged against its last copy).
    eventually("in NetNeural", || {
        (nn_desired(&w.nn, &nid) == json!({"led": "violet"})).then_some(())
    })
    .await;
    eprintln!("webhook to device: {took:?}");
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_with_a_wrong_secret_project_or_signature_are_refused() {
    let key = "relay-hmac-key";
    let w = webhook_world("gw-api-hook-refuse", Duration::from_secs(2), Some(key)).await;
    let api = Http::of(&w.site.gw);
    let project = w.golioth.project().to_owned();
    let body = r#"{"temp":21.5}"#;
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes()),
        body.as_bytes(),
    );
    let good_sig = format!(
        "sha256={}",
        tag.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let secret = ("x-nngw-webhook-secret", SECRET);
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: &[Case] = &[
        (
            "no secret",
            project.as_str(),
            vec![("x-signature-256", &good_sig)],
            401,
        ),
        (
            "wrong secret",
            project.as_str(),
            vec![
                ("x-nngw-webhook-secret", "guess"),
                ("x-signature-256", &good_sig),
            ],
            401,
        ),
        ("no signature", project.as_str(), vec![secret], 401),
        (
            "bad signature",
            project.as_str(),
            vec![secret, ("x-signature-256", "sha256=00ff")],
            401,
        ),
        (
            "another project",
            "someone-elses",
            vec![secret, ("x-signature-256", &good_sig)],
            403,
        ),
        (
            "all good",
            project.as_str(),
            vec![secret, ("x-signature-256", &good_sig)],
            202,
        ),
    ];
    for (what, project, headers, want) in cases {
        let (status, answer) = hook(&api, project, "abc123", headers).await;
        assert_eq!(status, *want, "{what}: {answer}");
        if *want != 202 {
            assert!(answer["error"]["message"].is_string(), "{what}: {answer}");
            assert!(
                !answer.to_string().contains(SECRET),
                "{what}: the secret echoed"
            );
        }
    }
    // A Ce-Source that names no device, and a body over the cap.
    let (status, _) = hook(
        &api,
        &project,
        "not a device!",
        &[secret, ("x-signature-256", &good_sig)],
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = api
        .call(
            Method::POST,
            "/api/v1/webhooks/golioth",
            None,
            Some(reqwest::Body::from("x".repeat(100 * 1024))),
            &[secret, ("ce-source", "abc123"), ("ce-subject", &project)],
        )
        .await;
    assert_eq!(status, 413);
    // The secret never reached the log either (the daemon logs to this process's stderr:
    // checked by the refusals' messages above, which are what is logged).
    w.site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_a_thousand_webhooks_for_one_device_is_one_pull() {
    let w = webhook_world("gw-api-hook-storm", Duration::from_secs(30), None).await;
    let (gid, _) = registered(&w, "lamp-5").await;
    let api = std::sync::Arc::new(Http::of(&w.site.gw));
    let project = w.golioth.project().to_owned();
    let mark = w.golioth.faults().mark();
    let device_reads = Match::get(&format!("/devices/{gid}"));

    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (api, project, gid) = (api.clone(), project.clone(), gid.clone());
        storm.spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..50 {
                let (status, body) =
                    hook(&api, &project, &gid, &[("x-nngw-webhook-secret", SECRET)]).await;
                answers.push((status, body["pull"].as_str().unwrap_or("").to_owned()));
            }
            answers
        });
    }
    let answers: Vec<(u16, String)> = storm.join_all().await.into_iter().flatten().collect();
    assert_eq!(answers.len(), 1000);
    assert!(answers.iter().all(|(s, _)| *s == 202), "all accepted");
    // Let the pull (and anything wrongly queued behind it) run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = w.golioth.faults().count_since(mark, &device_reads);
    // A pull reads the device and its desired document: 2 requests on its path. Within one
    // min_interval (30 s here) a storm is one pull now; one more waits for the interval's end
    // (the webhooks after the first pull started may say something it missed).
    assert_eq!(
        requests, 2,
        "{requests} requests on the device's path for 1,000 webhooks"
    );
    let scheduled = answers.iter().filter(|(_, p)| p == "scheduled").count();
    assert!(scheduled <= 2, "{scheduled} of 1,000 scheduled a pull");
    w.site.gw.stop().await;
}
