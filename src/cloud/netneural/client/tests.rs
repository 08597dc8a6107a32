//! The client against a small scripted HTTP server: requests as the API expects them,
//! answers and errors as it gives them.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

use super::*;
use crate::cloud::Failure;
use crate::cloud::testing::{Fake, serve};
use crate::config::Secret;

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

/// Rows `u00`, `u01`, … as a keyset-paging server answers them: the ids after `id=gt.X`, up
/// to `limit`. Row `u01` is soft-deleted.
fn keyset_server(rows: usize) -> impl Fn(&crate::cloud::testing::Seen, usize) -> (u16, String) {
    move |seen, _| {
        let after = seen
            .query("id")
            .map(|f| f.trim_start_matches("gt.").to_owned());
        let limit: usize = seen.query("limit").unwrap().parse().unwrap();
        let page: Vec<Value> = (0..rows)
            .map(|i| format!("u{i:02}"))
            .filter(|id| after.as_ref().is_none_or(|a| id > a))
            .take(limit)
            .map(|id| {
                let mut r = row(&id, json!({}), "2024-05-01T10:00:00.123456+00:00");
                if id == "u01" {
                    r["deleted_at"] = json!("2024-05-01T11:00:00+00:00");
                }
                r
            })
            .collect();
        (200, json!(page).to_string())
    }
}

#[tokio::test]
async fn a_pull_of_changed_devices_pages_by_id_until_a_short_page_and_keeps_deleted_rows() {
    let fake = serve(keyset_server(5)).await;
    let since = "2024-05-01T09:00:00.5+00:00";
    let got = client(&fake, NEW_KEY)
        .devices_changed_since(Some(since), 2)
        .await
        .unwrap();
    let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["u00", "u01", "u02", "u03", "u04"]);
    assert!(got[1].deleted && !got[0].deleted);
    assert_eq!(
        got[0].version.as_deref(),
        Some("2024-05-01T10:00:00.123456+00:00")
    );
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("GET", "/rest/v1/devices")
        );
        assert_eq!(s.query("organization_id"), Some("eq.org-1"));
        assert_eq!(
            s.query("updated_at"),
            Some("gte.2024-05-01T09:00:00.5+00:00")
        );
        assert_eq!(s.query("order"), Some("id.asc"));
        assert_eq!(s.query("limit"), Some("2"));
        assert_eq!(
            s.query("deleted_at"),
            None,
            "soft-deleted rows are asked for"
        );
        assert_eq!(s.query("offset"), None);
    }
    assert_eq!(seen[0].query("id"), None);
    assert_eq!(seen[1].query("id"), Some("gt.u01"));
    assert_eq!(seen[2].query("id"), Some("gt.u03"));
}

#[tokio::test]
async fn a_pull_from_the_start_has_no_cursor_and_a_full_last_page_costs_one_empty_page() {
    let fake = serve(keyset_server(4)).await;
    let got = client(&fake, NEW_KEY)
        .devices_changed_since(None, 2)
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.query("updated_at").is_none()));
    assert_eq!(seen[2].query("id"), Some("gt.u03"));

    let fake = serve(keyset_server(3)).await;
    client(&fake, NEW_KEY)
        .devices_changed_since(None, 0)
        .await
        .unwrap();
    assert_eq!(
        fake.seen()[0].query("limit"),
        Some("1"),
        "a page holds a row"
    );
    let fake = serve(keyset_server(0)).await;
    client(&fake, NEW_KEY)
        .devices_changed_since(None, 1_000_000)
        .await
        .unwrap();
    assert_eq!(
        fake.seen()[0].query("limit"),
        Some(MAX_PAGE_SIZE.to_string().as_str())
    );
}

#[tokio::test]
async fn a_failed_page_fails_the_whole_pull_naming_the_request() {
    let inner = keyset_server(5);
    let fake = serve(move |seen, n| {
        if n == 1 {
            (
                503,
                json!({"code": "PGRST002", "message": "busy"}).to_string(),
            )
        } else {
            inner(seen, n)
        }
    })
    .await;
    let e = client(&fake, NEW_KEY)
        .devices_changed_since(None, 2)
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(
        e.to_string()
            .starts_with("netneural: GET /rest/v1/devices: HTTP 503"),
        "{e}"
    );
    assert_eq!(fake.seen().len(), 2);

    // A server that ignores `id=gt.` would send the first page forever.
    let fake = serve(|_, _| {
        (
            200,
            json!([row("u0", json!({}), "T"), row("u1", json!({}), "T")]).to_string(),
        )
    })
    .await;
    let e = client(&fake, NEW_KEY)
        .devices_changed_since(None, 2)
        .await
        .unwrap_err();
    assert!(matches!(e.failure, Failure::Decode { .. }), "{e}");
    assert_eq!(fake.seen().len(), 2);
}

#[tokio::test]
async fn a_synced_write_sends_name_and_whole_metadata_guarded_by_the_version_read() {
    let fake = serve(|seen, _| {
        let body = seen.json();
        (
            200,
            json!([row("u1", body["metadata"].clone(), "T2")]).to_string(),
        )
    })
    .await;
    let nn = client(&fake, NEW_KEY);
    let id = DeviceId("u1".into());
    let metadata = json!({"owner": "ui", "desired": {"led": 1}});
    let metadata = metadata.as_object().unwrap();
    let written = nn
        .update_synced(
            &id,
            Some("2024-05-01T10:00:00.123456+00:00"),
            Some("s2"),
            metadata,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(written.version.as_deref(), Some("T2"));
    let s = &fake.seen()[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("PATCH", "/rest/v1/devices")
    );
    assert_eq!(s.query("id"), Some("eq.u1"));
    assert_eq!(s.query("organization_id"), Some("eq.org-1"));
    assert_eq!(
        s.query("updated_at"),
        Some("eq.2024-05-01T10:00:00.123456+00:00")
    );
    assert_eq!(s.header("prefer"), Some("return=representation"));
    let body = s.json();
    assert_eq!(body["name"], "s2");
    assert_eq!(
        body["metadata"],
        json!({"owner": "ui", "desired": {"led": 1}})
    );
    assert!(
        crate::cloud::parse_rfc3339(body["updated_at"].as_str().unwrap()).is_some(),
        "{body}"
    );

    nn.update_synced(&id, None, None, metadata).await.unwrap();
    let s = &fake.seen()[1];
    assert_eq!(s.query("updated_at"), Some("is.null"));
    assert!(s.json().get("name").is_none(), "no name, no name column");
}

#[tokio::test]
async fn a_synced_write_that_loses_the_race_is_none_without_a_retry() {
    let fake = serve(|_, _| (200, "[]".into())).await;
    let got = client(&fake, NEW_KEY)
        .update_synced(
            &DeviceId("u1".into()),
            Some("T1"),
            None,
            &serde_json::Map::new(),
        )
        .await
        .unwrap();
    assert_eq!(got, None);
    assert_eq!(fake.seen().len(), 1, "no read, no second write");

    let fake = serve(|_, _| {
        (
            400,
            json!({"code": "22007", "message": "invalid input syntax for type timestamp"})
                .to_string(),
        )
    })
    .await;
    let e = client(&fake, NEW_KEY)
        .update_synced(
            &DeviceId("u1".into()),
            Some("nope"),
            None,
            &serde_json::Map::new(),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("netneural: PATCH /rest/v1/devices: HTTP 400 [22007]"),
        "{e}"
    );
}

#[tokio::test]
async fn a_pull_of_changed_assignments_pages_by_id_and_keeps_each_version() {
    let fake = serve(|seen, _| {
        let after = seen
            .query("id")
            .map(|f| f.trim_start_matches("gt.").to_owned());
        let page: Vec<Value> = ["a1", "a2", "a3"]
            .iter()
            .filter(|id| after.as_deref().is_none_or(|a| **id > a))
            .take(2)
            .map(|id| {
                json!({"id": id, "device_id": format!("u-{id}"), "sync_enabled": true,
                       "sync_direction": "bidirectional",
                       "updated_at": format!("2024-05-01T10:00:00.{}+00:00", &id[1..])})
            })
            .collect();
        (200, json!(page).to_string())
    })
    .await;
    let got = client(&fake, NEW_KEY)
        .assignments_changed_since(Some("2024-05-01T09:00:00+00:00"), 2)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].0.device_id, DeviceId("u-a3".into()));
    assert_eq!(got[2].1.as_deref(), Some("2024-05-01T10:00:00.3+00:00"));
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path, "/rest/v1/device_service_assignments");
        assert_eq!(s.query("integration_id"), Some("eq.int-1"));
        assert_eq!(s.query("updated_at"), Some("gte.2024-05-01T09:00:00+00:00"));
        assert_eq!(s.query("order"), Some("id.asc"));
        assert_eq!(s.query("limit"), Some("2"));
        let select: Vec<&str> = s.query("select").unwrap().split(',').collect();
        assert!(
            select.contains(&"id") && select.contains(&"updated_at"),
            "{select:?}"
        );
    }
    assert_eq!(seen[1].query("id"), Some("gt.a2"));

    let fake = serve(|_, _| (401, json!({"message": "Invalid API key"}).to_string())).await;
    let e = client(&fake, NEW_KEY)
        .assignments_changed_since(None, 10)
        .await
        .unwrap_err();
    assert!(e.is_auth());
    assert!(
        e.to_string()
            .starts_with("netneural: GET /rest/v1/device_service_assignments: HTTP 401"),
        "{e}"
    );
}

fn conflict(field: &str, status: ConflictStatus) -> NewConflict {
    NewConflict {
        device_id: DeviceId("u1".into()),
        field_name: field.into(),
        local_value: Some(json!({"led": 1})),
        remote_value: None,
        local_updated_at: Some(UnixMillis(1_714_557_600_000)),
        remote_updated_at: None,
        resolution_status: status,
        resolution_strategy: (status != ConflictStatus::Pending)
            .then_some(ConflictStrategy::RemoteWins),
        resolved_value: None,
    }
}

#[tokio::test]
async fn conflicts_are_inserted_in_one_request_and_their_ids_come_back_in_order() {
    let fake = serve(|seen, _| {
        let n = seen.json().as_array().unwrap().len();
        let ids: Vec<Value> = (0..n).map(|i| json!({"id": format!("c{i}")})).collect();
        (201, json!(ids).to_string())
    })
    .await;
    let nn = client(&fake, NEW_KEY);
    let rows = [
        conflict("desired.led", ConflictStatus::Pending),
        conflict("name", ConflictStatus::AutoResolved),
    ];
    assert_eq!(nn.insert_conflicts(&rows).await.unwrap(), ["c0", "c1"]);
    assert!(nn.insert_conflicts(&[]).await.unwrap().is_empty());
    let seen = fake.seen();
    assert_eq!(seen.len(), 1, "an empty batch sends nothing");
    let s = &seen[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/rest/v1/device_conflicts")
    );
    assert_eq!(s.query("select"), Some("id"));
    assert_eq!(s.query("columns"), Some(wire::CONFLICT_INSERT_COLUMNS));
    assert_eq!(s.header("prefer"), Some("return=representation"));
    let body = s.json();
    assert_eq!(
        body[0],
        json!({"device_id": "u1", "conflict_type": "data_mismatch", "field_name": "desired.led",
               "local_value": {"led": 1}, "remote_value": null,
               "local_updated_at": "2024-05-01T10:00:00Z", "remote_updated_at": null,
               "resolution_status": "pending", "resolution_strategy": null,
               "resolved_value": null, "resolved_at": null})
    );
    assert_eq!(body[1]["resolution_status"], "auto_resolved");
    assert_eq!(body[1]["resolution_strategy"], "remote_wins");
    assert!(
        body[1]["resolved_at"].is_string(),
        "a settled row says when"
    );
}

#[tokio::test]
async fn a_conflict_insert_that_fails_names_the_request_and_a_short_answer_is_an_error() {
    let fake = serve(|_, _| {
        (
            409,
            json!({"code": "23503", "message": "violates foreign key constraint"}).to_string(),
        )
    })
    .await;
    let e = client(&fake, NEW_KEY)
        .insert_conflicts(&[conflict("x", ConflictStatus::Pending)])
        .await
        .unwrap_err();
    assert!(e.is_foreign_key_violation(), "{e}");
    assert!(
        e.to_string()
            .starts_with("netneural: POST /rest/v1/device_conflicts: HTTP 409"),
        "{e}"
    );
    let fake = serve(|_, _| (201, "[]".into())).await;
    let e = client(&fake, NEW_KEY)
        .insert_conflicts(&[conflict("x", ConflictStatus::Pending)])
        .await
        .unwrap_err();
    assert!(matches!(e.failure, Failure::Decode { .. }), "{e}");
}

#[tokio::test]
async fn conflicts_are_read_by_id_in_chunks() {
    let fake = serve(|seen, _| {
        let first = seen
            .query("id")
            .unwrap()
            .trim_start_matches("in.(\"")
            .split('"')
            .next();
        (
            200,
            json!([{"id": first, "device_id": "u1", "field_name": "desired.led",
                    "local_value": 1, "remote_value": 2, "resolution_status": "resolved",
                    "resolution_strategy": "manual", "resolved_value": 3,
                    "resolved_by": "ops@example.com",
                    "resolved_at": "2024-05-01T10:00:00.123456+00:00"}])
            .to_string(),
        )
    })
    .await;
    let ids: Vec<String> = (0..150).map(|i| format!("c{i}")).collect();
    let got = client(&fake, NEW_KEY).conflicts(&ids).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].id, "c100");
    let c = &got[0];
    assert_eq!(c.resolution_status, ConflictStatus::Resolved);
    assert_eq!(c.resolution_strategy, Some(ConflictStrategy::Manual));
    assert_eq!(c.resolved_value, Some(json!(3)));
    assert_eq!(c.resolved_by.as_deref(), Some("ops@example.com"));
    assert_eq!(c.resolved_at, Some(UnixMillis(1_714_557_600_123)));
    assert_eq!(
        (c.local_value.clone(), c.remote_value.clone()),
        (Some(json!(1)), Some(json!(2)))
    );
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/rest/v1/device_conflicts");
    assert_eq!(seen[0].query("select"), Some(wire::CONFLICT_COLUMNS));
    assert_eq!(seen[1].query("id").unwrap().matches(',').count(), 49);
    assert!(
        client(&fake, NEW_KEY)
            .conflicts(&[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(fake.seen().len(), 2);
}

#[tokio::test]
async fn resolving_a_conflict_patches_it_by_id_with_who_and_when() {
    let fake = serve(|seen, _| match seen.query("id") {
        Some("eq.c2") => (503, String::new()),
        _ => (204, String::new()),
    })
    .await;
    let nn = client(&fake, NEW_KEY);
    nn.resolve_conflict(
        "c1",
        ConflictStatus::Resolved,
        Some(ConflictStrategy::LocalWins),
        Some(&json!({"led": 1})),
        "nn-gateway",
    )
    .await
    .unwrap();
    let s = &fake.seen()[0];
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("PATCH", "/rest/v1/device_conflicts")
    );
    assert_eq!(s.query("id"), Some("eq.c1"));
    let body = s.json();
    assert_eq!(body["resolution_status"], "resolved");
    assert_eq!(body["resolution_strategy"], "local_wins");
    assert_eq!(body["resolved_value"], json!({"led": 1}));
    assert_eq!(body["resolved_by"], "nn-gateway");
    assert!(crate::cloud::parse_rfc3339(body["resolved_at"].as_str().unwrap()).is_some());

    nn.resolve_conflict("c1", ConflictStatus::Pending, None, None, "nn-gateway")
        .await
        .unwrap();
    let body = fake.seen()[1].json();
    assert_eq!(
        (
            body["resolution_strategy"].clone(),
            body["resolved_at"].clone()
        ),
        (Value::Null, Value::Null),
        "reopened: nothing settled"
    );

    let e = nn
        .resolve_conflict("c2", ConflictStatus::Ignored, None, None, "nn-gateway")
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("netneural: PATCH /rest/v1/device_conflicts: HTTP 503"),
        "{e}"
    );
}
