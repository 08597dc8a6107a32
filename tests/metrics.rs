//! The daemon's Prometheus metrics while messages flow. Real: Mosquitto, the gateway in
//! process on a real SQLite file, a raw CoAP client on UDP, and `promtool` (Debian's
//! `prometheus` package) judging the exposition. Faked: the clouds (`tests/fakes`, real HTTP
//! servers on port 0), one told to drop its first request. The metrics are read from the
//! daemon's own [`nn_gateway::metrics::Metrics`] handle, as the API's `/metrics` reads them.

mod fakes;
mod support;

use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use fakes::rig::{clouds, with_keys};
use fakes::{FakeGolioth, FakeNetNeural, Fault, Match};
use nn_gateway::metrics::Metrics;
use support::{Gateway, Mosquitto, Site, config};

/// The value of the sample `series` (name and labels exactly as exposed), if it is there.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

/// Waits until every `(series, value)` is exposed with at least that value.
async fn until_at_least(metrics: &Metrics, want: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics.encode();
        let short: Vec<_> = want
            .iter()
            .filter(|(series, min)| sample(&text, series).is_none_or(|v| v < *min))
            .collect();
        if short.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "not reached within 20 s: {short:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One confirmable CoAP POST, answered before this returns.
async fn coap_post(port: u16, mid: u16, path: &str, payload: &[u8]) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(vec![mid as u8]);
    for segment in path.split('/').skip(1) {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    socket
        .send_to(&p.to_bytes().unwrap(), ("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0; 1500];
    tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .expect("a CoAP answer")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_counters_move_per_transport_kind_and_reason_as_messages_flow() {
    let site = Site::start("gw-metrics-flow").await;
    let metrics = &site.gw.metrics;
    let series = [
        r#"nngw_messages_ingested_total{transport="mqtt",kind="state"}"#,
        r#"nngw_messages_ingested_total{transport="mqtt",kind="telemetry"}"#,
        r#"nngw_messages_ingested_total{transport="coap",kind="telemetry"}"#,
        r#"nngw_messages_rejected_total{transport="mqtt",reason="decode"}"#,
        r#"nngw_messages_rejected_total{transport="mqtt",reason="invalid"}"#,
        r#"nngw_messages_rejected_total{transport="coap",reason="too_large"}"#,
    ];
    let text = metrics.encode();
    for s in series {
        assert_eq!(sample(&text, s), Some(0.0), "{s} before any message");
    }
    // Proving the subscription publishes probe states; one marker behind them (the broker
    // keeps one client's messages in order) says when the last probe is counted.
    let dev = site.device("m-dev").await;
    dev.publish("devices/marker/telemetry", br#"{"t":0}"#.to_vec())
        .await;
    let before = until_at_least(metrics, &[(series[1], 1.0)]).await;
    let count = |text: &str, s: &str| sample(text, s).unwrap();
    let base: Vec<f64> = series.iter().map(|s| count(&before, s)).collect();
    let commits_before = count(&before, "nngw_store_commit_duration_seconds_count");
    let grouped_before = count(&before, "nngw_store_commit_group_size_sum");

    for i in 0..3 {
        dev.publish("devices/m-1/state", format!(r#"{{"n":{i}}}"#))
            .await;
    }
    for i in 0..5 {
        dev.publish("devices/m-1/telemetry", format!(r#"{{"t":{i}}}"#))
            .await;
    }
    dev.publish("devices/m-1/state", b"{oops".to_vec()).await;
    dev.publish("devices/m-1/state", b"[1]".to_vec()).await;
    coap_post(site.gw.coap_port, 1, "/d/c-1/telemetry", br#"{"t":1}"#).await;
    coap_post(site.gw.coap_port, 2, "/d/c-1/telemetry", &[b' '; 1100]).await;

    // What each series must have gained.
    let gained = [3.0, 5.0, 1.0, 1.0, 1.0, 1.0];
    let want: Vec<(&str, f64)> = series
        .iter()
        .zip(base.iter().zip(gained))
        .map(|(s, (base, n))| (*s, base + n))
        .collect();
    let text = until_at_least(metrics, &want).await;
    // Exactly, not at least: one message is one count.
    for (s, want) in &want {
        assert_eq!(sample(&text, s), Some(*want), "{s}\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"nngw_messages_ingested_total{transport="coap",kind="state"}"#
        ),
        Some(0.0)
    );
    let commits = count(&text, "nngw_store_commit_duration_seconds_count");
    assert!(
        commits > commits_before,
        "commits {commits_before} -> {commits}"
    );
    let grouped = count(&text, "nngw_store_commit_group_size_sum") - grouped_before;
    assert_eq!(grouped, 12.0, "writes in group commits since the marker");
    drop(dev);
    site.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_of_a_gateway_talking_to_both_clouds() {
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        support::skip(
            "promtool_accepts_the_metrics_of_a_gateway_talking_to_both_clouds",
            "promtool is not installed (apt-get install prometheus; .ci/test installs it)",
        );
        return;
    }
    let golioth = FakeGolioth::start().await;
    let netneural = FakeNetNeural::start().await;
    // One request gets no answer at all, for a `status="error"` sample.
    golioth.faults().next(Match::any(), Fault::Drop, 1);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.port, "gw-metrics-promtool");
    clouds(&mut cfg, dir.path(), Some(&golioth), Some(&netneural));
    let gw = Gateway::start(with_keys(cfg)).await;
    let dev = support::Device::connect(broker.port, "p-dev").await;
    support::wait_subscribed(&dev, &gw.db).await;
    dev.publish("devices/p-1/state", br#"{"fw":"1.0"}"#.to_vec())
        .await;
    for i in 0..3 {
        dev.publish("devices/p-1/telemetry", format!(r#"{{"t":{i}}}"#))
            .await;
    }
    dev.publish("devices/p-1/telemetry", b"\xff not json".to_vec())
        .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while netneural.count("device_telemetry_history") < 3 || golioth.device_count() < 1 {
        assert!(Instant::now() < deadline, "the clouds did not get the data");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = until_at_least(
        &gw.metrics,
        &[(
            r#"nngw_messages_rejected_total{transport="mqtt",reason="decode"}"#,
            1.0,
        )],
    )
    .await;
    // What a Prometheus scrape gets: `/metrics` over HTTP, with the API's token (and not
    // without it), the gauges read from the database and the lanes at the scrape.
    let text_after = scrape(&gw).await;
    for cloud in ["golioth", "netneural"] {
        assert!(
            text_after.contains(&format!(
                r#"nngw_cloud_lane_state{{cloud="{cloud}",state="online"}} 1"#
            )),
            "{cloud}'s lane not online in /metrics:\n{text_after}"
        );
    }
    assert!(text_after.contains("nngw_mqtt_connected 1"), "{text_after}");
    assert!(sample(&text_after, "nngw_database_bytes").unwrap() > 0.0);
    for cloud in ["golioth", "netneural"] {
        let requests: f64 = text_after
            .lines()
            .filter(|l| l.starts_with(&format!(r#"nngw_cloud_requests_total{{cloud="{cloud}""#)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(requests > 0.0, "no {cloud} requests counted:\n{text}");
    }
    assert!(
        text_after.contains(r#"cloud="golioth""#) && text_after.contains(r#"status="error"} 1"#),
        "the dropped request is not counted as an error:\n{text_after}"
    );
    assert!(text_after.contains(r#"nngw_cloud_request_duration_seconds_bucket{cloud="netneural""#));

    let out = promtool_check(&text_after);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\nstdout:\n{}\nstderr:\n{}\ninput:\n{text_after}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // promtool must be able to refuse: a counter without `_total` is a lint failure.
    let bad = promtool_check("# HELP nngw_x x\n# TYPE nngw_x counter\nnngw_x 1\n");
    assert!(!bad.status.success(), "promtool accepted a bad exposition");
    drop(dev);
    gw.stop().await;
}

/// `GET /metrics` from the gateway's API: refused without the token, text with it.
async fn scrape(gw: &Gateway) -> String {
    nn_gateway::cloud::install_crypto_provider();
    let url = format!("http://127.0.0.1:{}/metrics", gw.api_port);
    let http = reqwest::Client::new();
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let token_file = gw
        .db
        .parent()
        .unwrap()
        .join(nn_gateway::api::TOKEN_FILE_NAME);
    let token = std::fs::read_to_string(token_file).unwrap();
    let resp = http
        .get(&url)
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    resp.text().await.unwrap()
}

fn promtool_check(text: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
