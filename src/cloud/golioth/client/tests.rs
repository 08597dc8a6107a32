//! The client against a small scripted HTTP server: requests as the API expects them,
//! answers and errors as it gives them.

use serde_json::json;

use super::*;
use crate::cloud::testing::{Fake, serve};
use crate::config::Secret;

const KEY: &str = "golioth-key-DO-NOT-LEAK-42";

fn client(fake: &Fake) -> Golioth {
    let config = GoliothConfig {
        api_url: fake.url.clone(),
        project_id: "proj-1".into(),
        ..GoliothConfig::default()
    };
    Golioth::new(&config, ApiKey::new(Secret::new(KEY))).unwrap()
}

fn device(id: &str, hw: &str) -> serde_json::Value {
    json!({"id": id, "name": hw, "hardwareIds": [hw], "tagIds": [], "enabled": true})
}

#[tokio::test]
async fn a_list_walks_every_zero_based_page_with_its_filters() {
    let fake = serve(|seen, _| {
        let page: usize = seen.query("page").unwrap().parse().unwrap();
        let list: Vec<_> = (page * 100..(page * 100 + 100).min(250))
            .map(|i| {
                json!({"id": format!("d{i}"), "name": format!("n{i}"),
                            "data": {"want": i}})
            })
            .collect();
        (
            200,
            json!({"list": list, "page": page, "perPage": 100, "total": 250}).to_string(),
        )
    })
    .await;
    let filter = DeviceFilter {
        tag_ids: vec![TagId("t1".into()), TagId("t2".into())],
        state_path: Some("desired".into()),
        ..DeviceFilter::default()
    };
    let devices = client(&fake).list_devices(&filter).await.unwrap();
    assert_eq!(devices.len(), 250);
    assert_eq!(devices[249].state, Some(json!({"want": 249})));
    // Pages after the first are read at once, and put back in order.
    assert!(
        devices
            .iter()
            .enumerate()
            .all(|(i, d)| d.id.0 == format!("d{i}"))
    );
    let mut seen = fake.seen();
    seen.sort_by_key(|s| s.query("page").map(str::to_owned));
    assert_eq!(seen.len(), 3);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("GET", "/v1/projects/proj-1/devices")
        );
        assert_eq!(s.query("page"), Some(i.to_string().as_str()));
        assert_eq!(s.query("perPage"), Some("100"));
        assert_eq!(s.query("statePath"), Some("desired"));
        let tags: Vec<&str> = s
            .query
            .iter()
            .filter(|(k, _)| k == "tags")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(tags, ["t1", "t2"]);
        assert_eq!(s.header("x-api-key"), Some(KEY));
    }
}

#[tokio::test]
async fn a_list_that_grows_while_it_is_read_is_read_to_its_new_end() {
    // The first page says 150 devices; by the second, 250 (or the list would end at 200).
    let fake = serve(|seen, _| {
        let page: usize = seen.query("page").unwrap().parse().unwrap();
        let total = if page == 0 { 150 } else { 250 };
        let list: Vec<_> = (page * 100..(page * 100 + 100).min(total))
            .map(|i| device(&format!("d{i}"), &format!("h{i}")))
            .collect();
        (
            200,
            json!({"list": list, "page": page, "perPage": 100, "total": total}).to_string(),
        )
    })
    .await;
    let devices = client(&fake)
        .list_devices(&DeviceFilter::default())
        .await
        .unwrap();
    assert_eq!(devices.len(), 250);
    assert_eq!(fake.seen().len(), 3);
}

#[tokio::test]
async fn register_finds_the_device_another_attempt_created_after_a_409() {
    let fake = serve(|seen, n| match (seen.method.as_str(), n) {
        ("GET", 0) => (
            200,
            json!({"list": [], "page": 0, "perPage": 100, "total": 0}).to_string(),
        ),
        ("POST", 1) => (
            409,
            json!({"code": 6, "message": "device exists", "details": []}).to_string(),
        ),
        ("GET", 2) => (
            200,
            json!({"list": [device("d9", "site-s1")], "total": "1"}).to_string(),
        ),
        _ => (500, "{}".into()),
    })
    .await;
    let found = client(&fake)
        .register("site-s1", "site-s1", &[TagId("t1".into())])
        .await
        .unwrap();
    assert_eq!(found.id, DeviceId("d9".into()));
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].query("hardwareId"), Some("site-s1"));
    assert_eq!(
        seen[1].json(),
        json!({"name": "site-s1", "hardwareIds": ["site-s1"], "tagIds": ["t1"]})
    );
}

#[tokio::test]
async fn state_reads_none_for_a_missing_path_and_writes_at_the_path() {
    let fake = serve(|seen, _| match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", "/v1/projects/proj-1/devices/d1/data/gw/desired") => {
            (200, r#"{"data": null}"#.into())
        }
        ("GET", _) => (404, json!({"code": 5, "message": "not found"}).to_string()),
        ("PUT", _) => (200, json!({"data": null}).to_string()),
        _ => (500, "{}".into()),
    })
    .await;
    let g = client(&fake);
    let id = DeviceId("d1".into());
    assert_eq!(g.get_state(&id, "gw/desired").await.unwrap(), None);
    assert_eq!(g.get_state(&id, "state").await.unwrap(), None);
    g.put_state(&id, "state", &json!({"t": 1})).await.unwrap();
    let put = fake.seen().pop().unwrap();
    assert_eq!(put.path, "/v1/projects/proj-1/devices/d1/data/state");
    assert_eq!(put.json(), json!({"t": 1}));
    assert!(g.get_state(&id, "a//b").await.is_err());
}

#[tokio::test]
async fn errors_name_the_request_and_status_and_never_the_key_or_query() {
    let fake = serve(|_, _| {
        (
            503,
            json!({"code": 14, "message": "try later", "details": []}).to_string(),
        )
    })
    .await;
    let e = client(&fake)
        .find_by_hardware_id("secret-hw-77")
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "golioth: GET /v1/projects/{projectId}/devices: HTTP 503 [UNAVAILABLE] try later; will be retried"
    );
    assert!(e.is_retryable());
    let debug = format!("{e:?} {:?}", client(&fake));
    for text in [e.to_string(), debug] {
        assert!(
            !text.contains(KEY) && !text.contains("secret-hw-77"),
            "{text}"
        );
    }

    // No answer at all: a closed port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = GoliothConfig {
        api_url: Url::parse(&format!("http://{closed}")).unwrap(),
        project_id: "p".into(),
        ..GoliothConfig::default()
    };
    let g = Golioth::new(&config, ApiKey::new(Secret::new(KEY))).unwrap();
    let e = g.probe().await.unwrap_err();
    assert!(e.is_unreachable() && e.is_retryable(), "{e}");
    let text = format!("{e} {e:?}");
    assert!(!text.contains(KEY) && !text.contains("perPage"), "{text}");
}
