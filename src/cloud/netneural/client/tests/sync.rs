//! The reconciliation's calls: incremental pulls, the guarded synced write, conflicts.

use serde_json::json;

use super::*;

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
