//! Every fault kind, as a reqwest client sees it, and the request log.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::fakes::golioth::DEFAULT_KEY;
use super::fakes::{Answer, Counts, FakeGolioth, FakeNetNeural, Fault, Match, netneural};
use super::{client, client_with_timeout};

fn devices_url(fake: &FakeGolioth) -> String {
    format!("{}/v1/projects/{}/devices", fake.url(), fake.project())
}

async fn create(
    http: &reqwest::Client,
    fake: &FakeGolioth,
    name: &str,
) -> reqwest::Result<reqwest::Response> {
    http.post(devices_url(fake))
        .header("x-api-key", DEFAULT_KEY)
        .json(&json!({"name": name}))
        .send()
        .await
}

async fn list(http: &reqwest::Client, fake: &FakeGolioth) -> reqwest::Result<reqwest::Response> {
    http.get(devices_url(fake))
        .header("x-api-key", DEFAULT_KEY)
        .send()
        .await
}

#[tokio::test]
async fn scripted_statuses_answer_instead_of_handling_then_stop() {
    let fake = FakeGolioth::start().await;
    let http = client();
    fake.faults()
        .next(Match::post("/devices"), Fault::too_many_requests(3), 1);
    fake.faults().next(
        Match::post("/devices"),
        Fault::retry_after(503, "Sun, 06 Nov 1994 08:49:37 GMT"),
        1,
    );
    fake.faults()
        .next(Match::post("/devices"), Fault::status(500), 1);

    let r = create(&http, &fake, "a").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 8, "the vendor's error body: {body}");
    let r = create(&http, &fake, "a").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "Sun, 06 Nov 1994 08:49:37 GMT");
    let r = create(&http, &fake, "a").await.unwrap();
    assert_eq!(r.status(), 500);
    assert!(r.headers().get("retry-after").is_none());
    assert_eq!(fake.device_count(), 0, "nothing applied");
    assert_eq!(fake.faults().pending(), 0);
    assert_eq!(create(&http, &fake, "a").await.unwrap().status(), 200);

    fake.faults().next(
        Match::any(),
        Fault::Status {
            status: 502,
            retry_after: None,
            body: Some("<html>bad gateway</html>".into()),
        },
        1,
    );
    let r = list(&http, &fake).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.text().await.unwrap(), "<html>bad gateway</html>");
}

#[tokio::test]
async fn an_outage_lasts_until_cleared_and_the_log_counts_what_it_cost() {
    let fake = FakeGolioth::start().await;
    let http = client();
    let faults = fake.faults();
    faults.always(Match::any(), Fault::status(503));
    let mark = faults.mark();
    for _ in 0..3 {
        assert_eq!(list(&http, &fake).await.unwrap().status(), 503);
    }
    faults.clear();
    assert_eq!(list(&http, &fake).await.unwrap().status(), 200);
    assert_eq!(faults.count_since(mark, &Match::get("/devices")), 4);
    assert_eq!(faults.count_since(mark, &Match::post("/devices")), 0);
    let answers: Vec<Answer> = faults.since(mark).iter().map(|l| l.answer).collect();
    assert_eq!(
        answers,
        [
            Answer::Status(503),
            Answer::Status(503),
            Answer::Status(503),
            Answer::Status(200)
        ]
    );
    let last = faults.log().pop().unwrap();
    assert_eq!(
        (last.method.as_str(), last.header("x-api-key")),
        ("GET", Some(DEFAULT_KEY))
    );
    assert_eq!(faults.count(&Match::any()), 4);
}

#[tokio::test]
async fn drop_closes_the_connection_without_a_status_and_applies_nothing() {
    let fake = FakeGolioth::start().await;
    let http = client();
    fake.faults().next(Match::post("/devices"), Fault::Drop, 1);
    let e = create(&http, &fake, "a").await.expect_err("no response");
    assert!(e.status().is_none() && !e.is_timeout(), "{e:?}");
    assert_eq!(fake.device_count(), 0);
    assert_eq!(fake.faults().log()[0].answer, Answer::Dropped);
    // The next request (a new connection) is served.
    assert_eq!(create(&http, &fake, "a").await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_lost_response_still_commits_the_write() {
    let fake = FakeGolioth::start().await;
    let http = client();
    fake.faults()
        .next(Match::post("/devices"), Fault::LoseResponse, 1);
    let e = create(&http, &fake, "a").await.expect_err("no response");
    assert!(e.status().is_none(), "{e:?}");
    assert!(fake.device_by_name("a").is_some(), "the write was applied");
    assert_eq!(fake.faults().log()[0].answer, Answer::Lost(200));
    // A retry of the same create now meets the committed device.
    assert_eq!(create(&http, &fake, "a").await.unwrap().status(), 409);
}

#[tokio::test]
async fn a_delay_past_the_client_timeout_times_out_but_the_write_lands() {
    let fake = FakeGolioth::start().await;
    let http = client_with_timeout(Duration::from_millis(150));
    fake.faults().next(
        Match::post("/devices"),
        Fault::Delay(Duration::from_millis(400)),
        1,
    );
    let e = create(&http, &fake, "slow").await.expect_err("timed out");
    assert!(e.is_timeout(), "{e:?}");
    for _ in 0..50 {
        if fake.device_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fake.device_by_name("slow").is_some());

    fake.faults().next(
        Match::get("/devices"),
        Fault::Delay(Duration::from_millis(50)),
        1,
    );
    assert_eq!(
        list(&http, &fake).await.unwrap().status(),
        200,
        "a short delay is just slow"
    );
}

#[tokio::test]
async fn a_poisoned_write_is_refused_with_400_and_reads_are_not_affected() {
    let fake = FakeGolioth::start().await;
    let http = client();
    fake.faults().poison("BAD");
    let r = create(&http, &fake, "BAD-device").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 3);
    assert_eq!(list(&http, &fake).await.unwrap().status(), 200);
    assert_eq!(fake.device_count(), 0);
    fake.faults().clear_poison();
    assert_eq!(
        create(&http, &fake, "BAD-device").await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_standing_delay_slows_every_request_overlapping_and_is_never_used_up() {
    let fake = FakeGolioth::start().await;
    let http = client();
    let faults = fake.faults();
    faults.always(Match::any(), Fault::Delay(Duration::from_millis(20)));
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(list(&http, &fake).await.unwrap().status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
    let started = Instant::now();
    assert_eq!(create(&http, &fake, "a").await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(20), "writes too");
    assert_eq!(
        faults.pending(),
        0,
        "a standing fault is not a scripted count"
    );

    faults.clear();
    faults.always(Match::any(), Fault::Delay(Duration::from_millis(250)));
    let started = Instant::now();
    let mut lists = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, url) = (http.clone(), devices_url(&fake));
        lists.spawn(async move { http.get(url).header("x-api-key", DEFAULT_KEY).send().await });
    }
    while let Some(r) = lists.join_next().await {
        assert_eq!(r.unwrap().unwrap().status(), 200);
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "8 requests of 250 ms each, in parallel, took {took:?}"
    );
    faults.clear();
    let started = Instant::now();
    list(&http, &fake).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(250), "cleared");
}

#[tokio::test]
async fn both_fakes_count_reads_and_writes_however_they_were_answered() {
    let golioth = FakeGolioth::start().await;
    let http = client();
    let mark = golioth.faults().mark();
    golioth
        .faults()
        .next(Match::get("/devices"), Fault::status(503), 1);
    golioth
        .faults()
        .next(Match::post("/devices"), Fault::Drop, 1);
    for _ in 0..3 {
        let _ = list(&http, &golioth).await;
    }
    for name in ["a", "b"] {
        let _ = create(&http, &golioth, name).await;
    }
    assert_eq!(
        golioth.faults().counts(),
        Counts {
            reads: 3,
            writes: 2
        }
    );
    assert_eq!(
        golioth.faults().counts_by_kind_since(mark),
        Counts {
            reads: 3,
            writes: 2
        }
    );

    let nn = FakeNetNeural::start().await;
    let url = |rest: &str| format!("{}/rest/v1/{rest}", nn.url());
    nn.faults()
        .next(Match::patch("/devices"), Fault::LoseResponse, 1);
    let id = nn.seed_device("0b8f5c1e-0000-4000-8000-000000000001", "a", &[]);
    let mark = nn.faults().mark();
    for _ in 0..2 {
        http.get(url("devices"))
            .header("apikey", netneural::DEFAULT_KEY)
            .send()
            .await
            .unwrap();
    }
    let _ = http
        .patch(url(&format!("devices?id=eq.{id}")))
        .header("apikey", netneural::DEFAULT_KEY)
        .json(&json!({"name": "b"}))
        .send()
        .await;
    http.delete(url(&format!("devices?id=eq.{id}")))
        .header("apikey", netneural::DEFAULT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        nn.faults().counts_by_kind_since(mark),
        Counts {
            reads: 2,
            writes: 2
        },
        "seeding through the fake's own helpers is not a request"
    );
    assert_eq!(
        nn.faults().counts(),
        Counts {
            reads: 2,
            writes: 2
        }
    );
}
