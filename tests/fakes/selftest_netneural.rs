//! The fake NetNeural backend answers like PostgREST over the NetNeural tables.

use serde_json::{Value, json};

use super::client;
use super::fakes::netneural::DEFAULT_KEY;
use super::fakes::{FakeNetNeural, Fault, Match};

const ORG: &str = "0b8f5c1e-0000-4000-8000-000000000001";
const INTEGRATION: &str = "0b8f5c1e-0000-4000-8000-000000000002";

struct Rest<'a> {
    fake: &'a FakeNetNeural,
    http: reqwest::Client,
}

impl Rest<'_> {
    fn new(fake: &FakeNetNeural) -> Rest<'_> {
        Rest {
            fake,
            http: client(),
        }
    }

    /// `method /rest/v1/{rest}` with both key headers; the body is `null` when empty.
    async fn send(
        &self,
        method: &str,
        rest: &str,
        prefer: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}/rest/v1/{rest}", self.fake.url()))
            .header("apikey", DEFAULT_KEY)
            .header("authorization", format!("Bearer {DEFAULT_KEY}"));
        if !prefer.is_empty() {
            req = req.header("prefer", prefer);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("an answer");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, body)
    }

    async fn get(&self, rest: &str) -> Value {
        let (status, body) = self.send("GET", rest, "", None).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

fn device(name: &str, hw: &[&str]) -> Value {
    json!({"organization_id": ORG, "name": name, "hardware_ids": hw, "metadata": {"desired": {"led": 1}}})
}

#[tokio::test]
async fn inserts_get_server_ids_and_timestamps_and_selects_filter_order_and_page() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let (status, rows) = rest
        .send(
            "POST",
            "devices",
            "return=representation",
            Some(json!([
                device("a", &["hw-a", "x"]),
                device("b", &["hw-b"]),
                device("c", &["hw-c", "x"])
            ])),
        )
        .await;
    assert_eq!(status, 201, "{rows}");
    let rows = rows.as_array().unwrap().clone();
    assert_eq!(rows.len(), 3);
    let a = &rows[0];
    assert_eq!(a["id"].as_str().unwrap().len(), 36);
    assert!(a["created_at"].as_str().unwrap().ends_with("+00:00"));
    assert_ne!(
        rows[0]["updated_at"], rows[1]["updated_at"],
        "server timestamps are distinct"
    );
    let (status, none) = rest
        .send("POST", "devices", "return=minimal", Some(device("d", &[])))
        .await;
    assert_eq!((status, none), (201, Value::Null));

    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(
            &rest
                .get("devices?select=id,name&order=name.desc&limit=2&offset=1")
                .await
        ),
        ["c", "b"]
    );
    let one = rest.get("devices?select=name&name=eq.a").await;
    assert_eq!(one, json!([{"name": "a"}]), "select= projects");
    assert_eq!(
        names(&rest.get("devices?hardware_ids=cs.{x}&order=name.asc").await),
        ["a", "c"]
    );
    assert_eq!(
        names(&rest.get("devices?name=in.(a,d)&order=name").await),
        ["a", "d"]
    );
    assert_eq!(
        names(
            &rest
                .get("devices?or=(name.eq.b,name.eq.c)&order=name")
                .await
        ),
        ["b", "c"]
    );
    assert_eq!(
        names(&rest.get("devices?name=neq.a&order=name").await),
        ["b", "c", "d"]
    );
    assert_eq!(
        rest.get("devices?deleted_at=is.null")
            .await
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        rest.get("devices?external_device_id=neq.x").await,
        json!([]),
        "NULL <> x is not true"
    );
    let t = a["updated_at"].as_str().unwrap();
    let later = rest
        .get(&format!(
            "devices?updated_at=gt.{}&order=name",
            urlencode(t)
        ))
        .await;
    assert_eq!(names(&later), ["b", "c", "d"]);
    let (status, err) = rest.send("GET", "devices?nope=eq.1", "", None).await;
    assert_eq!((status, err["code"].clone()), (400, json!("42703")));
    let (status, err) = rest.send("GET", "nothing", "", None).await;
    assert_eq!((status, err["code"].clone()), (404, json!("PGRST205")));
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn telemetry_bulk_inserts_skip_duplicates_by_idempotency_key_or_fail_with_23505() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let dev = fake.seed_device(ORG, "a", &["hw-a"]);
    let point = |k: &str| json!({"device_id": dev, "organization_id": ORG, "telemetry": {"t": 1}, "device_timestamp": "2024-05-01T10:00:00Z", "idempotency_key": k});
    let batch: Vec<Value> = ["k1", "k2", "k3"].iter().map(|k| point(k)).collect();
    let (status, _) = rest
        .send(
            "POST",
            "device_telemetry_history",
            "return=minimal",
            Some(json!(batch)),
        )
        .await;
    assert_eq!(status, 201);

    let again: Vec<Value> = ["k2", "k3", "k4"].iter().map(|k| point(k)).collect();
    let (status, err) = rest
        .send("POST", "device_telemetry_history", "", Some(json!(again)))
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        err,
        json!({
            "code": "23505",
            "message": "duplicate key value violates unique constraint \"device_telemetry_history_idempotency_key_key\"",
            "details": "Key (idempotency_key)=(k2) already exists.",
            "hint": null,
        })
    );
    assert_eq!(
        fake.count("device_telemetry_history"),
        3,
        "a failed statement inserts nothing"
    );

    let (status, inserted) = rest
        .send(
            "POST",
            "device_telemetry_history?on_conflict=idempotency_key",
            "resolution=ignore-duplicates, return=representation",
            Some(json!(again)),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        inserted.as_array().unwrap().len(),
        1,
        "only k4 is new: {inserted}"
    );
    assert_eq!(inserted[0]["device_timestamp"], "2024-05-01T10:00:00+00:00");
    assert_eq!(fake.telemetry_of(&dev).len(), 4);

    let stray = json!({"device_id": "0b8f5c1e-0000-4000-8000-0000000000ff", "organization_id": ORG, "telemetry": {}, "idempotency_key": "k9"});
    let (status, err) = rest
        .send("POST", "device_telemetry_history", "", Some(stray))
        .await;
    assert_eq!(
        (status, err["code"].clone()),
        (409, json!("23503")),
        "{err}"
    );
    let (status, err) = rest
        .send(
            "POST",
            "device_telemetry_history",
            "",
            Some(json!([point("k10"), {"device_id": dev}])),
        )
        .await;
    assert_eq!((status, err["code"].clone()), (400, json!("PGRST102")));
    let (status, err) = rest
        .send(
            "POST",
            "devices",
            "",
            Some(json!({"name": "x", "organization_id": ORG, "colour": 1})),
        )
        .await;
    assert_eq!((status, err["code"].clone()), (400, json!("PGRST204")));
    let (status, err) = rest
        .send(
            "POST",
            "devices",
            "",
            Some(json!({"name": "x", "organization_id": "org-1"})),
        )
        .await;
    assert_eq!((status, err["code"].clone()), (400, json!("22P02")));
}

#[tokio::test]
async fn a_poisoned_row_fails_the_whole_batch_with_400() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let dev = fake.seed_device(ORG, "a", &[]);
    fake.faults().poison("\"bad\"");
    let rows: Vec<Value> = (0..4)
        .map(|i| json!({"device_id": dev, "organization_id": ORG, "telemetry": {"v": if i == 2 { json!("bad") } else { json!(i) }}}))
        .collect();
    let (status, err) = rest
        .send("POST", "device_telemetry_history", "", Some(json!(rows)))
        .await;
    assert_eq!(status, 400);
    assert!(
        err["code"].is_string() && err.get("hint").is_some(),
        "{err}"
    );
    assert_eq!(fake.count("device_telemetry_history"), 0);
    let (status, _) = rest
        .send(
            "POST",
            "device_telemetry_history",
            "",
            Some(json!(rows[..2])),
        )
        .await;
    assert_eq!(status, 201, "the halves without the poisoned row go in");
}

#[tokio::test]
async fn a_patch_guarded_by_updated_at_matches_nothing_after_another_writer() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let id = fake.seed_device(ORG, "a", &["hw-a"]);
    let read = fake.row("devices", &id).unwrap();
    let t = read["updated_at"].as_str().unwrap().to_owned();
    let edited = fake.edit_device(&id, json!({"metadata": {"desired": {"led": 2}}}));
    assert_ne!(edited["updated_at"], read["updated_at"]);

    let guarded = format!("devices?id=eq.{id}&updated_at=eq.{}", urlencode(&t));
    let patch = json!({"metadata": {"desired": {"led": 3}}});
    let (status, rows) = rest
        .send(
            "PATCH",
            &guarded,
            "return=representation",
            Some(patch.clone()),
        )
        .await;
    assert_eq!((status, rows), (200, json!([])));
    let (status, body) = rest.send("PATCH", &guarded, "", Some(patch.clone())).await;
    assert_eq!((status, body), (204, Value::Null));
    assert_eq!(
        fake.row("devices", &id).unwrap()["metadata"]["desired"]["led"],
        2
    );

    let fresh = format!(
        "devices?id=eq.{id}&updated_at=eq.{}",
        urlencode(edited["updated_at"].as_str().unwrap())
    );
    let (status, rows) = rest
        .send("PATCH", &fresh, "return=representation", Some(patch))
        .await;
    assert_eq!(status, 200);
    assert_eq!(rows[0]["metadata"]["desired"]["led"], 3);
    assert!(rows[0]["updated_at"].as_str() > edited["updated_at"].as_str());

    let (status, err) = rest
        .send("PATCH", "devices", "", Some(json!({"name": "all"})))
        .await;
    assert_eq!(
        (status, err["code"].clone()),
        (400, json!("21000")),
        "no filter, no update"
    );
    let (status, gone) = rest
        .send(
            "DELETE",
            &format!("devices?id=eq.{id}"),
            "return=representation",
            None,
        )
        .await;
    assert_eq!((status, gone.as_array().unwrap().len()), (200, 1));
}

#[tokio::test]
async fn upserts_merge_on_the_named_unique_columns() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let dev = fake.seed_device(ORG, "a", &[]);
    let seeded = fake.seed_assignment(&dev, INTEGRATION, "golioth-1", "bidirectional");
    assert_eq!(seeded["sync_enabled"], true);
    let row = json!({"device_id": dev, "integration_id": INTEGRATION, "external_device_id": "golioth-1", "sync_status": "synced"});
    let (status, err) = rest
        .send("POST", "device_service_assignments", "", Some(row.clone()))
        .await;
    assert_eq!((status, err["code"].clone()), (409, json!("23505")));
    let (status, rows) = rest
        .send(
            "POST",
            "device_service_assignments?on_conflict=device_id,integration_id",
            "resolution=merge-duplicates,return=representation",
            Some(row.clone()),
        )
        .await;
    assert_eq!(status, 201, "{rows}");
    assert_eq!(rows[0]["id"], seeded["id"]);
    assert_eq!(rows[0]["sync_status"], "synced");
    assert_eq!(fake.count("device_service_assignments"), 1);
    let (status, err) = rest
        .send(
            "POST",
            "device_service_assignments?on_conflict=sync_status",
            "resolution=merge-duplicates",
            Some(row),
        )
        .await;
    assert_eq!((status, err["code"].clone()), (400, json!("42P10")));
}

#[tokio::test]
async fn the_apikey_header_is_required_and_a_bearer_must_match_it() {
    let fake = FakeNetNeural::start().await;
    let http = client();
    let url = format!("{}/rest/v1/devices", fake.url());
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(&url)
        .header("apikey", DEFAULT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "apikey alone is enough");
    let r = http
        .get(&url)
        .header("apikey", DEFAULT_KEY)
        .header("authorization", "Bearer other")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    fake.set_key("rotated");
    let r = http
        .get(&url)
        .header("apikey", DEFAULT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    fake.faults()
        .next(Match::post("/rest/v1/"), Fault::status(503), 1);
    let r = http
        .post(&url)
        .header("apikey", "rotated")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["code"].is_string() && body.get("details").is_some(),
        "{body}"
    );
}

fn ids_of(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn keyset_pages_by_id_neither_shift_nor_repeat_when_rows_change_between_pages() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let mut all: Vec<String> = (0..25)
        .map(|i| fake.seed_device(ORG, &format!("d{i}"), &[]))
        .collect();
    fake.edit_device(&all[3], json!({"deleted_at": "2024-05-01T10:00:00Z"}));
    fake.seed_device("0b8f5c1e-0000-4000-8000-0000000000ee", "elsewhere", &[]);
    all.sort();

    let base =
        format!("devices?select=id,updated_at&organization_id=eq.{ORG}&order=id.asc&limit=10");
    let mut seen: Vec<String> = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(last) => format!("{base}&id=gt.{last}"),
            None => base.clone(),
        };
        let page = ids_of(&rest.get(&query).await);
        sizes.push(page.len());
        if seen.is_empty() {
            // Another writer changes a row already read, and one not yet read: neither moves.
            fake.edit_device(&page[0], json!({"name": "renamed"}));
            fake.edit_device(&all[24], json!({"name": "renamed too"}));
        }
        seen.extend(page.iter().cloned());
        if page.len() < 10 {
            break;
        }
        after = page.last().cloned();
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(
        seen, all,
        "every row of the organization once, soft-deleted one included"
    );

    let upper = all[9].to_ascii_uppercase();
    assert_eq!(
        ids_of(&rest.get(&format!("{base}&id=gt.{upper}")).await),
        all[10..20],
        "uuids compare by value, not by the case they are written in"
    );
    let (status, err) = rest.send("GET", "devices?id=gt.nope", "", None).await;
    assert_eq!((status, err["code"].clone()), (400, json!("22P02")));
}

#[tokio::test]
async fn timestamps_compare_as_instants_whatever_their_offset_or_precision() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| fake.seed_device(ORG, n, &[]))
        .collect();
    let raw = fake.row("devices", &ids[1]).unwrap()["updated_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let at = |op: &str, t: &str| format!("devices?updated_at={op}.{}&order=name", urlencode(t));
    assert_eq!(names(&rest.get(&at("gte", &raw)).await), ["b", "c"]);
    assert_eq!(names(&rest.get(&at("gt", &raw)).await), ["c"]);

    let instant =
        time::OffsetDateTime::parse(&raw, &time::format_description::well_known::Rfc3339).unwrap();
    let plus_two = instant
        .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_ne!(plus_two, raw);
    assert_eq!(
        names(&rest.get(&at("gte", &plus_two)).await),
        ["b", "c"],
        "{plus_two} is {raw}"
    );
    let padded = if raw.contains('.') {
        raw.replace("+00:00", "000+00:00")
    } else {
        raw.replace("+00:00", ".000+00:00")
    };
    assert_eq!(
        names(&rest.get(&at("eq", &padded)).await),
        ["b"],
        "{padded}"
    );
    let (status, err) = rest
        .send("GET", "devices?updated_at=gte.yesterday", "", None)
        .await;
    assert_eq!((status, err["code"].clone()), (400, json!("22007")));
}

#[tokio::test]
async fn device_conflicts_check_their_words_and_go_with_their_device() {
    let fake = FakeNetNeural::start().await;
    let rest = Rest::new(&fake);
    let dev = fake.seed_device(ORG, "a", &[]);
    let conflict = |patch: Value| {
        let mut c = json!({"device_id": dev, "conflict_type": "data_mismatch",
                           "field_name": "desired.led", "local_value": {"led": 1},
                           "remote_value": {"led": 2}});
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let (status, rows) = rest
        .send(
            "POST",
            "device_conflicts?columns=device_id,conflict_type,field_name,local_value,remote_value,\
             resolution_status,resolution_strategy\
             &select=id,resolution_status,resolution_strategy,created_at,updated_at",
            "missing=default,return=representation",
            Some(json!([
                conflict(json!({})),
                conflict(json!({"field_name": "name",
                "resolution_status": "auto_resolved", "resolution_strategy": "remote_wins"}))
            ])),
        )
        .await;
    assert_eq!(status, 201, "{rows}");
    assert_eq!(rows[0]["resolution_status"], "pending", "the default");
    assert_eq!(rows[0]["resolution_strategy"], Value::Null);
    assert_eq!(rows[1]["resolution_strategy"], "remote_wins");
    let id = rows[0]["id"].as_str().unwrap().to_owned();

    for (bad, code, status) in [
        (json!({"conflict_type": "mismatch"}), "23514", 400),
        (json!({"resolution_status": "done"}), "23514", 400),
        (json!({"resolution_strategy": "newest_wins"}), "23514", 400),
        (json!({"field_name": null}), "23502", 400),
        (json!({"conflict_type": null}), "23502", 400),
        (
            json!({"device_id": "0b8f5c1e-0000-4000-8000-0000000000ff"}),
            "23503",
            409,
        ),
        (json!({"local_updated_at": "soon"}), "22007", 400),
    ] {
        let (got, err) = rest
            .send("POST", "device_conflicts", "", Some(conflict(bad.clone())))
            .await;
        assert_eq!(
            (got, err["code"].clone()),
            (status, json!(code)),
            "{bad}: {err}"
        );
    }
    assert_eq!(fake.conflicts().len(), 2, "a refused row is not stored");

    let before = fake.row("device_conflicts", &id).unwrap();
    let resolved = fake.resolve_conflict(&id, json!({"led": 3}), "ops@example.com");
    assert_eq!(resolved["resolution_status"], "resolved");
    assert_eq!(resolved["resolution_strategy"], "manual");
    assert_eq!(resolved["resolved_value"], json!({"led": 3}));
    assert_eq!(resolved["resolved_by"], "ops@example.com");
    assert!(
        resolved["resolved_at"]
            .as_str()
            .unwrap()
            .ends_with("+00:00")
    );
    assert!(resolved["updated_at"].as_str() > before["updated_at"].as_str());
    let (_, read) = rest
        .send(
            "GET",
            &format!(
                "device_conflicts?id=in.(\"{id}\")&select=id,resolution_status,resolved_value"
            ),
            "",
            None,
        )
        .await;
    assert_eq!(
        read,
        json!([{"id": id, "resolution_status": "resolved", "resolved_value": {"led": 3}}])
    );

    let (status, _) = rest
        .send(
            "PATCH",
            &format!("device_conflicts?id=eq.{id}"),
            "",
            Some(json!({"resolution_strategy": "coin_toss"})),
        )
        .await;
    assert_eq!(status, 400, "updates are checked too");
    fake.delete("devices", &dev);
    assert!(fake.conflicts().is_empty(), "ON DELETE CASCADE");
}
