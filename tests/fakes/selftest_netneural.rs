//! The fake NetNeural backend answers like PostgREST over the NetNeural tables.

use serde_json::{Value, json};

use super::client;
use super::fakes::netneural::DEFAULT_KEY;
use super::fakes::{FakeNetNeural, Fault, Match};

pub(super) const ORG: &str = "0b8f5c1e-0000-4000-8000-000000000001";
const INTEGRATION: &str = "0b8f5c1e-0000-4000-8000-000000000002";

pub(super) struct Rest<'a> {
    fake: &'a FakeNetNeural,
    http: reqwest::Client,
}

impl Rest<'_> {
    pub(super) fn new(fake: &FakeNetNeural) -> Rest<'_> {
        Rest {
            fake,
            http: client(),
        }
    }

    /// `method /rest/v1/{rest}` with both key headers; the body is `null` when empty.
    pub(super) async fn send(
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

    pub(super) async fn get(&self, rest: &str) -> Value {
        let (status, body) = self.send("GET", rest, "", None).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

pub(super) fn device(name: &str, hw: &[&str]) -> Value {
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

pub(super) fn urlencode(s: &str) -> String {
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
