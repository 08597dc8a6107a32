//! The client against a small scripted HTTP server: requests as the API expects them,
//! answers and errors as it gives them.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

use super::*;
use crate::cloud::Failure;
use crate::cloud::testing::{Fake, serve};
use crate::config::Secret;

mod sync;

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnLURPLU5PVC1MRUFL";
const NEW_KEY: &str = "sb_secret_DO-NOT-LEAK-0123456789";

fn client(fake: &Fake, key: &str) -> NetNeural {
    let config = NetNeuralConfig {
        url: Some(fake.url.clone()),
        organization_id: "org-1".into(),
        integration_id: "int-1".into(),
        ..NetNeuralConfig::default()
    };
    NetNeural::new(&config, ApiKey::new(Secret::new(key))).unwrap()
}

fn row(id: &str, metadata: Value, updated_at: &str) -> Value {
    json!({"id": id, "organization_id": "org-1", "name": "s1", "hardware_ids": ["site-s1"],
           "metadata": metadata, "updated_at": updated_at, "deleted_at": null})
}

#[tokio::test]
async fn the_key_goes_in_apikey_and_in_a_bearer_only_when_it_is_a_jwt() {
    let fake = serve(|_, _| (200, "[]".into())).await;
    client(&fake, JWT).probe().await.unwrap();
    client(&fake, NEW_KEY).probe().await.unwrap();
    let seen = fake.seen();
    assert_eq!(seen[0].path, "/rest/v1/devices");
    assert_eq!(seen[0].query("organization_id"), Some("eq.org-1"));
    assert_eq!(seen[0].header("apikey"), Some(JWT));
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {JWT}").as_str())
    );
    assert_eq!(seen[1].header("apikey"), Some(NEW_KEY));
    assert_eq!(seen[1].header("authorization"), None);
}

#[tokio::test]
async fn a_create_that_hits_a_unique_violation_returns_the_existing_device() {
    let fake = serve(|seen, _| match seen.method.as_str() {
        "POST" => (
            409,
            json!({"code": "23505", "message": "duplicate key", "details": null, "hint": null})
                .to_string(),
        ),
        _ => (
            200,
            json!([row("u1", json!({}), "2024-05-01T10:00:00+00:00")]).to_string(),
        ),
    })
    .await;
    let new = NewDevice {
        name: "s1".into(),
        hardware_ids: vec!["site-s1".into()],
        ..NewDevice::default()
    };
    let device = client(&fake, NEW_KEY).create_device(&new).await.unwrap();
    assert_eq!(device.id, DeviceId("u1".into()));
    let seen = fake.seen();
    assert_eq!(seen[0].header("prefer"), Some("return=representation"));
    assert_eq!(
        seen[0].json(),
        json!({"organization_id": "org-1", "integration_id": "int-1", "name": "s1",
               "hardware_ids": ["site-s1"]})
    );
    assert_eq!(seen[1].query("hardware_ids"), Some(r#"cs.{"site-s1"}"#));
    assert_eq!(seen[1].query("deleted_at"), Some("is.null"));
}

#[tokio::test]
async fn a_metadata_key_is_merged_and_a_lost_race_is_read_and_retried() {
    let reads = AtomicUsize::new(0);
    let fake = serve(move |seen, _| match seen.method.as_str() {
        "GET" => {
            let t = if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                "T1"
            } else {
                "T2"
            };
            (
                200,
                json!([row("u1", json!({"owner": "ui", "reported": {"t": 0}}), t)]).to_string(),
            )
        }
        // The first conditional write loses (another writer moved updated_at to T2).
        _ if seen.query("updated_at") == Some("eq.T1") => (200, "[]".into()),
        _ => (
            200,
            json!([row("u1", seen.json()["metadata"].clone(), "T3")]).to_string(),
        ),
    })
    .await;
    let id = DeviceId("u1".into());
    let device = client(&fake, NEW_KEY)
        .set_metadata_key(&id, "reported", &json!({"t": 5}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(device.metadata["reported"], json!({"t": 5}));
    assert_eq!(device.metadata["owner"], json!("ui"));
    let patches: Vec<_> = fake
        .seen()
        .into_iter()
        .filter(|s| s.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1].query("updated_at"), Some("eq.T2"));
    assert_eq!(patches[1].query("id"), Some("eq.u1"));
    assert_eq!(
        patches[1].json()["metadata"],
        json!({"owner": "ui", "reported": {"t": 5}})
    );
}

#[tokio::test]
async fn a_metadata_write_that_always_loses_gives_up_with_a_retryable_error() {
    let fake = serve(|seen, _| match seen.method.as_str() {
        "GET" => (200, json!([row("u1", json!(null), "T1")]).to_string()),
        _ => (200, "[]".into()),
    })
    .await;
    let e = client(&fake, JWT)
        .set_metadata_key(&DeviceId("u1".into()), "reported", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(e.failure, Failure::Contended { .. }) && e.is_retryable(),
        "{e}"
    );
    assert_eq!(fake.seen().len(), 2 * METADATA_ATTEMPTS);
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(JWT) && !text.contains("c2lnLURPLU5PVC1MRUFL"),
        "{text}"
    );
}

#[tokio::test]
async fn a_telemetry_batch_is_one_insert_that_ignores_keys_already_stored() {
    let fake = serve(|_, _| (201, String::new())).await;
    let rows: Vec<TelemetryRow> = (0..3)
        .map(|i| TelemetryRow {
            device_id: DeviceId("u1".into()),
            telemetry: json!({"t": i}),
            device_timestamp: (i > 0).then_some(UnixMillis(1_714_557_600_000)),
            received_at: UnixMillis(1_714_557_601_500),
            idempotency_key: format!("gw1:7:{i}"),
        })
        .collect();
    client(&fake, NEW_KEY)
        .insert_telemetry(&rows)
        .await
        .unwrap();
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/rest/v1/device_telemetry_history")
    );
    assert_eq!(s.query("on_conflict"), Some("idempotency_key"));
    assert_eq!(
        s.header("prefer"),
        Some("resolution=ignore-duplicates,return=minimal")
    );
    let body = s.json();
    assert_eq!(body.as_array().unwrap().len(), 3);
    assert_eq!(
        body[1],
        json!({"device_id": "u1", "organization_id": "org-1", "telemetry": {"t": 1},
               "device_timestamp": "2024-05-01T10:00:00Z",
               "received_at": "2024-05-01T10:00:01.5Z", "idempotency_key": "gw1:7:1"})
    );
    assert_eq!(body[0]["device_timestamp"], Value::Null);
}

#[tokio::test]
async fn last_seen_only_moves_forward_and_foreign_key_errors_are_recognised() {
    let fake = serve(|seen, _| match seen.method.as_str() {
        "PATCH" => (200, "[]".into()),
        _ => (
            409,
            json!({"code": "23503", "message": "violates foreign key constraint",
                   "details": "Key (device_id)=(u9) is not present in table \"devices\".",
                   "hint": null})
            .to_string(),
        ),
    })
    .await;
    let nn = client(&fake, NEW_KEY);
    let moved = nn
        .advance_last_seen(&DeviceId("u1".into()), UnixMillis(1_714_557_600_000))
        .await
        .unwrap();
    assert!(!moved);
    let patch = &fake.seen()[0];
    assert_eq!(
        patch.query("or"),
        Some(r#"(last_seen.is.null,last_seen.lt."2024-05-01T10:00:00Z")"#)
    );
    assert_eq!(patch.json(), json!({"last_seen": "2024-05-01T10:00:00Z"}));

    let row = TelemetryRow {
        device_id: DeviceId("u9".into()),
        telemetry: json!({}),
        device_timestamp: None,
        received_at: UnixMillis(0),
        idempotency_key: "k".into(),
    };
    let e = nn.insert_telemetry(&[row]).await.unwrap_err();
    assert!(e.is_foreign_key_violation() && !e.is_unique_violation() && !e.is_retryable());
    assert!(
        e.to_string().starts_with(
            "netneural: POST /rest/v1/device_telemetry_history: HTTP 409 [23503] violates"
        ),
        "{e}"
    );
}

#[tokio::test]
async fn assignments_are_read_for_the_integration_and_the_given_devices() {
    let fake = serve(|_, _| {
        (
            200,
            json!([{"device_id": "u1", "external_device_id": "g1", "sync_enabled": true,
                    "sync_direction": "import", "sync_status": "synced", "last_sync_at": null},
                   {"device_id": "u2", "sync_enabled": false, "sync_direction": "export"}])
            .to_string(),
        )
    })
    .await;
    let ids = [DeviceId("u1".into()), DeviceId("u2".into())];
    let got = client(&fake, NEW_KEY).assignments(&ids).await.unwrap();
    assert_eq!(got[0].direction, super::super::SyncDirection::Import);
    assert_eq!(got[1].direction, super::super::SyncDirection::None);
    let s = &fake.seen()[0];
    assert_eq!(s.path, "/rest/v1/device_service_assignments");
    assert_eq!(s.query("integration_id"), Some("eq.int-1"));
    assert_eq!(s.query("device_id"), Some(r#"in.("u1","u2")"#));
}
