use std::time::Duration;

use serde_json::json;

use super::*;
use crate::config::Synchronous;
use crate::model::{
    DeviceKey, Format, Inbound, MqttDelivery, Origin, Point, Rejection, UnixMillis,
};
use crate::store::OpenOptions;

/// The value of the sample `series` (name and labels exactly as exposed), if it is there.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

fn value(metrics: &Metrics, series: &str) -> f64 {
    let text = metrics.encode();
    sample(&text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn inbound(origin: Origin, reading: Reading) -> WriteOp {
    WriteOp::Ingest(Inbound {
        device: DeviceKey::parse("d1").unwrap(),
        origin,
        format: Format::Json,
        received_at: UnixMillis::now(),
        reading,
        mqtt: (origin == Origin::Mqtt).then_some(MqttDelivery {
            pkid: 1,
            dup: false,
            digest: 1,
        }),
    })
}

fn state(origin: Origin) -> WriteOp {
    inbound(
        origin,
        Reading::State(json!({"on": true}).as_object().unwrap().clone()),
    )
}

fn telemetry(origin: Origin) -> WriteOp {
    inbound(
        origin,
        Reading::Telemetry(vec![Point {
            device_ts: None,
            data: json!({"t": 1}).as_object().unwrap().clone(),
        }]),
    )
}

fn rejection(origin: Origin, cause: RejectCause) -> WriteOp {
    WriteOp::Reject(Rejection {
        origin,
        device: None,
        locator: "x".into(),
        cause,
        reason: "a sentence that must not become a label".into(),
        size: 1,
        excerpt: vec![],
        received_at: UnixMillis::now(),
        mqtt: None,
    })
}

#[test]
fn every_family_is_exposed_with_its_labels_before_anything_happens() {
    let text = Metrics::new().encode();
    for series in [
        r#"nngw_messages_ingested_total{transport="mqtt",kind="state"}"#,
        r#"nngw_messages_ingested_total{transport="coap",kind="telemetry"}"#,
        r#"nngw_messages_rejected_total{transport="coap",reason="too_large"}"#,
        r#"nngw_messages_duplicate_total{transport="mqtt"}"#,
        "nngw_store_commit_duration_seconds_count",
        "nngw_store_commit_group_size_count",
        r#"nngw_cloud_lane_state{cloud="golioth",state="online"}"#,
        r#"nngw_outbox_rows{cloud="netneural",state="dead"}"#,
        r#"nngw_outbox_oldest_pending_age_seconds{cloud="golioth"}"#,
        r#"nngw_telemetry_backlog_points{cloud="netneural"}"#,
        r#"nngw_telemetry_oldest_undelivered_age_seconds{cloud="netneural"}"#,
        r#"nngw_telemetry_deleted_total{reason="size_undelivered"}"#,
        "nngw_mqtt_connected",
        "nngw_conflicts_pending",
        "nngw_database_bytes",
        "nngw_database_wal_bytes",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in:\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"nngw_cloud_lane_state{cloud="netneural",state="disabled"}"#
        ),
        Some(1.0)
    );
    let build = format!(
        r#"nngw_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &build), Some(1.0), "{text}");
    assert!(text.contains("# TYPE nngw_messages_ingested_total counter\n"));
    assert!(text.contains("# TYPE nngw_store_commit_duration_seconds histogram\n"));
    assert!(text.contains("# TYPE nngw_build_info gauge\n"));
    assert!(!text.contains("_total_total"), "{text}");
    // Golioth takes no telemetry: no backlog series for it.
    assert!(!text.contains(r#"nngw_telemetry_backlog_points{cloud="golioth"}"#));
    // Prometheus' text format, not OpenMetrics (whose `# EOF` Prometheus 0.0.4 does not know).
    assert!(!text.contains("# EOF"));
}

#[test]
fn a_commit_counts_what_was_stored_rejected_and_recognised_per_transport() {
    let metrics = Metrics::new();
    let ops = vec![
        state(Origin::Mqtt),
        state(Origin::Mqtt),
        telemetry(Origin::Coap),
        rejection(Origin::Mqtt, RejectCause::Decode),
        rejection(Origin::Coap, RejectCause::Topic),
        // A message the store kept as rejected because it could not take it.
        telemetry(Origin::Mqtt),
        state(Origin::Mqtt),
        // Failed writes are not counted: they are retried and counted when they go in.
        telemetry(Origin::Coap),
    ];
    let results: Vec<Result<Outcome, StoreError>> = vec![
        Ok(Outcome::Stored { new_device: true }),
        Ok(Outcome::Stored { new_device: false }),
        Ok(Outcome::Stored { new_device: false }),
        Ok(Outcome::Rejected),
        Ok(Outcome::Rejected),
        Ok(Outcome::Rejected),
        Ok(Outcome::Duplicate),
        Err(StoreError::Closed),
    ];
    metrics.commit(&ops, &results, Duration::from_millis(3));
    let v = |s: &str| value(&metrics, s);
    assert_eq!(
        v(r#"nngw_messages_ingested_total{transport="mqtt",kind="state"}"#),
        2.0
    );
    assert_eq!(
        v(r#"nngw_messages_ingested_total{transport="mqtt",kind="telemetry"}"#),
        0.0
    );
    assert_eq!(
        v(r#"nngw_messages_ingested_total{transport="coap",kind="telemetry"}"#),
        1.0
    );
    assert_eq!(
        v(r#"nngw_messages_rejected_total{transport="mqtt",reason="decode"}"#),
        1.0
    );
    assert_eq!(
        v(r#"nngw_messages_rejected_total{transport="coap",reason="topic"}"#),
        1.0
    );
    assert_eq!(
        v(r#"nngw_messages_rejected_total{transport="mqtt",reason="unstorable"}"#),
        1.0
    );
    assert_eq!(v(r#"nngw_messages_duplicate_total{transport="mqtt"}"#), 1.0);
    assert_eq!(v("nngw_store_commit_duration_seconds_count"), 1.0);
    assert_eq!(v("nngw_store_commit_duration_seconds_sum"), 0.003);
    assert_eq!(
        v(r#"nngw_store_commit_duration_seconds_bucket{le="0.004"}"#),
        1.0
    );
    assert_eq!(
        v(r#"nngw_store_commit_duration_seconds_bucket{le="0.002"}"#),
        0.0
    );
    assert_eq!(v("nngw_store_commit_group_size_sum"), 8.0);
    assert_eq!(v(r#"nngw_store_commit_group_size_bucket{le="8"}"#), 1.0);
    assert_eq!(v(r#"nngw_store_commit_group_size_bucket{le="4"}"#), 0.0);
    assert!(!metrics.encode().contains("a sentence"));
}

#[test]
fn every_reject_cause_has_its_own_series() {
    let metrics = Metrics::new();
    for (i, cause) in RejectCause::ALL.into_iter().enumerate() {
        let ops: Vec<_> = (0..=i).map(|_| rejection(Origin::Coap, cause)).collect();
        let results: Vec<Result<_, StoreError>> =
            ops.iter().map(|_| Ok(Outcome::Rejected)).collect();
        metrics.commit(&ops, &results, Duration::ZERO);
    }
    for (i, cause) in RejectCause::ALL.into_iter().enumerate() {
        let series = format!(
            r#"nngw_messages_rejected_total{{transport="coap",reason="{}"}}"#,
            cause.as_str()
        );
        assert_eq!(value(&metrics, &series), (i + 1) as f64, "{series}");
    }
}

#[test]
fn cloud_requests_count_by_status_or_error_and_are_timed_per_operation() {
    let metrics = Metrics::new();
    let op = "GET /rest/v1/devices";
    metrics.cloud_request(Target::NetNeural, op, Some(200), Duration::from_millis(20));
    metrics.cloud_request(Target::NetNeural, op, Some(200), Duration::from_millis(30));
    metrics.cloud_request(Target::NetNeural, op, Some(503), Duration::from_millis(5));
    metrics.cloud_request(Target::Golioth, "PUT /x", None, Duration::from_secs(10));
    let v = |s: &str| value(&metrics, s);
    let requests = |cloud: &str, op: &str, status: &str| {
        v(&format!(
            r#"nngw_cloud_requests_total{{cloud="{cloud}",operation="{op}",status="{status}"}}"#
        ))
    };
    assert_eq!(requests("netneural", op, "200"), 2.0);
    assert_eq!(requests("netneural", op, "503"), 1.0);
    assert_eq!(requests("golioth", "PUT /x", "error"), 1.0);
    assert_eq!(
        v(&format!(
            r#"nngw_cloud_request_duration_seconds_count{{cloud="netneural",operation="{op}"}}"#
        )),
        3.0
    );
    assert_eq!(
        v(r#"nngw_cloud_request_duration_seconds_sum{cloud="golioth",operation="PUT /x"}"#),
        10.0
    );
}

#[test]
fn lane_states_and_the_mqtt_link_are_read_from_health() {
    let metrics = Metrics::new();
    let health = Health::default();
    health.set_lane(Target::Golioth, LaneState::BackingOff);
    health.set_lane(Target::NetNeural, LaneState::Online);
    health.set_mqtt(LinkState::Connected);
    metrics.refresh_health(&health);
    let lane = |cloud: &str, state: LaneState| {
        value(
            &metrics,
            &format!(
                r#"nngw_cloud_lane_state{{cloud="{cloud}",state="{}"}}"#,
                lane_word(state)
            ),
        )
    };
    for state in LANE_STATES {
        let golioth = f64::from(u8::from(state == LaneState::BackingOff));
        let netneural = f64::from(u8::from(state == LaneState::Online));
        assert_eq!(lane("golioth", state), golioth, "{state:?}");
        assert_eq!(lane("netneural", state), netneural, "{state:?}");
    }
    assert_eq!(value(&metrics, "nngw_mqtt_connected"), 1.0);
    health.set_mqtt(LinkState::Down);
    health.set_lane(Target::Golioth, LaneState::AuthFailed);
    metrics.refresh_health(&health);
    assert_eq!(value(&metrics, "nngw_mqtt_connected"), 0.0);
    assert_eq!(lane("golioth", LaneState::BackingOff), 0.0);
    assert_eq!(lane("golioth", LaneState::AuthFailed), 1.0);
}

#[test]
fn outbox_conflicts_and_file_sizes_are_read_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    let opts = OpenOptions {
        synchronous: Synchronous::Normal,
        targets: vec![Target::Golioth, Target::NetNeural],
        rejected_keep: 10,
    };
    let mut db = Db::open(&path, &opts).unwrap();
    let metrics = Metrics::new();
    metrics.refresh_from(&db).unwrap();
    let pending = |cloud: &str| format!(r#"nngw_outbox_rows{{cloud="{cloud}",state="pending"}}"#);
    assert_eq!(value(&metrics, &pending("golioth")), 0.0);
    assert!(value(&metrics, "nngw_database_bytes") > 0.0);

    // A reported state owes one row to each cloud, a telemetry point one to NetNeural.
    let results = db.apply_batch(&[state(Origin::Mqtt), telemetry(Origin::Mqtt)]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    std::thread::sleep(Duration::from_millis(20));
    metrics.refresh_from(&db).unwrap();
    assert_eq!(value(&metrics, &pending("golioth")), 1.0);
    assert_eq!(value(&metrics, &pending("netneural")), 1.0);
    let age = value(
        &metrics,
        r#"nngw_outbox_oldest_pending_age_seconds{cloud="golioth"}"#,
    );
    assert!((0.015..60.0).contains(&age), "{age}");
    assert_eq!(
        value(
            &metrics,
            r#"nngw_telemetry_backlog_points{cloud="netneural"}"#
        ),
        1.0
    );
    let age = value(
        &metrics,
        r#"nngw_telemetry_oldest_undelivered_age_seconds{cloud="netneural"}"#,
    );
    assert!((0.015..60.0).contains(&age), "{age}");
    assert!(value(&metrics, "nngw_database_wal_bytes") > 0.0);
    assert_eq!(value(&metrics, "nngw_conflicts_pending"), 0.0);
}

#[test]
fn retention_deletions_count_by_reason() {
    let metrics = Metrics::new();
    let report = Report {
        aged_out: 5,
        dropped_delivered: 2,
        dropped_undelivered: 1,
        more: false,
    };
    metrics.retention_deleted(&report);
    metrics.retention_deleted(&report);
    let v = |reason: &str| {
        value(
            &metrics,
            &format!(r#"nngw_telemetry_deleted_total{{reason="{reason}"}}"#),
        )
    };
    assert_eq!(
        (v("age"), v("size_delivered"), v("size_undelivered")),
        (10.0, 4.0, 2.0)
    );
}

#[test]
fn clones_count_into_one_registry_and_new_ones_apart() {
    let a = Metrics::new();
    let b = a.clone();
    let other = Metrics::new();
    b.cloud_request(Target::Golioth, "GET /x", Some(200), Duration::ZERO);
    let series = r#"nngw_cloud_requests_total{cloud="golioth",operation="GET /x",status="200"}"#;
    assert_eq!(value(&a, series), 1.0);
    assert_eq!(sample(&other.encode(), series), None);
}
