//! The fake Golioth answers like the Management API contract.

use serde_json::{Value, json};

use super::client;
use super::fakes::FakeGolioth;
use super::fakes::golioth::DEFAULT_KEY;

struct Api<'a> {
    fake: &'a FakeGolioth,
    http: reqwest::Client,
}

impl Api<'_> {
    fn new(fake: &FakeGolioth) -> Api<'_> {
        Api {
            fake,
            http: client(),
        }
    }

    fn url(&self, rest: &str) -> String {
        format!(
            "{}/v1/projects/{}/{rest}",
            self.fake.url(),
            self.fake.project()
        )
    }

    async fn send(&self, method: &str, rest: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, self.url(rest))
            .header("x-api-key", DEFAULT_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("an answer");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("a JSON body"))
    }

    async fn get(&self, rest: &str) -> (u16, Value) {
        self.send("GET", rest, None).await
    }

    async fn create(&self, name: &str, hw: &str) -> Value {
        let (status, body) = self
            .send(
                "POST",
                "devices",
                Some(json!({"name": name, "hardwareIds": [hw]})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }
}

#[tokio::test]
async fn devices_come_back_in_the_contract_envelopes_with_zero_based_pages() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    let d = api.create("dev-0", "hw-0").await;
    for k in [
        "id",
        "name",
        "hardwareIds",
        "tagIds",
        "enabled",
        "createdAt",
        "updatedAt",
    ] {
        assert!(d.get(k).is_some(), "{k} in {d}");
    }
    assert_eq!(d["status"], "-");
    assert_eq!(d["metadata"]["status"], "-");
    assert_eq!(d["enabled"], true);
    for i in 1..5 {
        api.create(&format!("dev-{i}"), &format!("hw-{i}")).await;
    }
    let mut names = Vec::new();
    for page in 0..3 {
        let (status, body) = api.get(&format!("devices?page={page}&perPage=2")).await;
        assert_eq!(status, 200);
        assert_eq!(body["page"], page);
        assert_eq!(body["perPage"], 2);
        assert_eq!(body["total"], 5);
        names.extend(
            body["list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["name"].clone()),
        );
    }
    assert_eq!(names, ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4"]);
    let (_, past) = api.get("devices?page=3&perPage=2").await;
    assert_eq!(past["list"], json!([]));
    assert_eq!(past["total"], 5);
    let (_, all) = api.get("devices").await;
    assert_eq!(all["perPage"], 100);
    assert_eq!(all["list"].as_array().unwrap().len(), 5);

    let (status, err) = api.get("devices?perPage=101").await;
    assert_eq!(status, 400);
    assert_eq!(err["code"], 3);
    assert_eq!(err["details"], json!([]));
    assert!(err["message"].is_string());

    let id = d["id"].as_str().unwrap();
    let (status, one) = api.get(&format!("devices/{id}")).await;
    assert_eq!((status, one["data"]["name"].clone()), (200, json!("dev-0")));
    let (status, gone) = api.send("DELETE", &format!("devices/{id}"), None).await;
    assert_eq!((status, gone), (200, json!({})));
    let (status, err) = api.get(&format!("devices/{id}")).await;
    assert_eq!((status, err["code"].clone()), (404, json!(5)));
    assert_eq!(fake.device_count(), 4);
}

#[tokio::test]
async fn names_and_hardware_ids_are_unique_in_a_project() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    api.create("a", "hw-a").await;
    let (status, err) = api
        .send(
            "POST",
            "devices",
            Some(json!({"name": "a", "hardwareIds": ["hw-b"]})),
        )
        .await;
    assert_eq!((status, err["code"].clone()), (409, json!(6)), "{err}");
    let (status, _) = api
        .send(
            "POST",
            "devices",
            Some(json!({"name": "b", "hardwareIds": ["hw-a"]})),
        )
        .await;
    assert_eq!(status, 409);
    let b = api.create("b", "hw-b").await;
    let (status, _) = api
        .send(
            "PATCH",
            &format!("devices/{}", b["id"].as_str().unwrap()),
            Some(json!({"name": "a"})),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(fake.device_count(), 2);
}

#[tokio::test]
async fn lists_filter_by_hardware_id_name_and_all_tags_and_carry_state_at_state_path() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    let (status, tag) = api
        .send("POST", "tags", Some(json!({"name": "site-1"})))
        .await;
    assert_eq!(status, 200);
    let tag_id = tag["data"]["id"].as_str().unwrap().to_owned();
    let other = fake.create_tag("other");
    let (_, tags) = api.get("tags").await;
    assert_eq!(tags["total"], 2);

    let a = api.create("a", "hw-a").await;
    api.create("b", "hw-b").await;
    let a_id = a["id"].as_str().unwrap();
    let (status, patched) = api
        .send(
            "PATCH",
            &format!("devices/{a_id}"),
            Some(json!({"addTagId": [tag_id, other]})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["data"]["tagIds"].as_array().unwrap().len(), 2);
    assert!(patched["data"]["updatedAt"].as_str() >= a["updatedAt"].as_str());
    fake.set_state(a_id, "state", json!({"temp": 21}));

    let names = |v: &Value| -> Vec<String> {
        v["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, by_hw) = api.get("devices?hardwareId=hw-b").await;
    assert_eq!(names(&by_hw), ["b"]);
    let (_, by_name) = api.get("devices?deviceName=a").await;
    assert_eq!(names(&by_name), ["a"]);
    let (_, by_tags) = api
        .get(&format!("devices?tags={tag_id}&tags={other}"))
        .await;
    assert_eq!(names(&by_tags), ["a"]);
    assert_eq!(by_tags["total"], 1);
    let (_, with_state) = api.get("devices?statePath=state").await;
    assert_eq!(with_state["list"][0]["data"], json!({"temp": 21}));
    assert!(with_state["list"][1].get("data").is_none());
    let (_, plain) = api.get("devices").await;
    assert!(plain["list"][0].get("data").is_none());
}

#[tokio::test]
async fn lightdb_put_replaces_at_the_path_and_post_merges_into_it() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    let id = api.create("a", "hw-a").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let data = |p: &str| format!("devices/{id}/data/{p}");

    let (status, body) = api
        .send(
            "PUT",
            &data("desired"),
            Some(json!({"led": 1, "cfg": {"x": 1}})),
        )
        .await;
    assert_eq!((status, body), (200, json!({})));
    api.send("PUT", &data("state"), Some(json!({"on": true})))
        .await;
    api.send("POST", &data("desired"), Some(json!({"cfg": {"y": 2}})))
        .await;
    assert_eq!(
        fake.state(&id, "desired"),
        Some(json!({"led": 1, "cfg": {"x": 1, "y": 2}}))
    );
    api.send("PUT", &data("desired/cfg"), Some(json!({"z": 3})))
        .await;
    let (status, got) = api.get(&data("desired")).await;
    assert_eq!(status, 200);
    assert_eq!(got, json!({"data": {"led": 1, "cfg": {"z": 3}}}));
    let (_, leaf) = api.get(&data("desired/cfg/z")).await;
    assert_eq!(leaf, json!({"data": 3}));
    assert_eq!(
        fake.state(&id, "state"),
        Some(json!({"on": true})),
        "siblings are kept"
    );

    let (status, body) = api.send("DELETE", &data("desired/led"), None).await;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(fake.state(&id, "desired"), Some(json!({"cfg": {"z": 3}})));
    let (status, missing) = api.get(&data("nothing/here")).await;
    assert_eq!((status, missing), (200, json!({"data": null})));
    let (status, _) = api.get("devices/000000000000000000000000/data/state").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn requests_without_the_key_or_with_a_revoked_one_get_401() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    let resp = api.http.get(api.url("devices")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["code"].clone(), body["details"].clone()),
        (json!(16), json!([]))
    );
    assert_eq!(api.get("devices").await.0, 200);
    fake.set_key("rotated");
    assert_eq!(api.get("devices").await.0, 401);
    let resp = api
        .http
        .get(api.url("devices"))
        .header("x-api-key", "rotated")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let wrong_project = format!("{}/v1/projects/elsewhere/devices", fake.url());
    let resp = api
        .http
        .get(wrong_project)
        .header("x-api-key", "rotated")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn a_list_at_a_state_path_carries_each_devices_nested_document_on_every_page() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    let desired =
        |i: usize| json!({"led": i, "cfg": {"mode": format!("m{i}"), "levels": [i, i + 1]}});
    let ids: Vec<String> = (0..250)
        .map(|i| {
            let id = fake.create_device(&format!("dev-{i:03}"), &[&format!("hw-{i:03}")]);
            match i {
                7 => fake.set_state(&id, "state", json!({"on": true})),
                8 => fake.set_state(&id, "desired", Value::Null),
                _ => fake.set_state(&id, "desired", desired(i)),
            }
            id
        })
        .collect();

    let mut got: Vec<Value> = Vec::new();
    for page in 0..3 {
        let (status, body) = api
            .get(&format!(
                "devices?statePath=desired&page={page}&perPage=100"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["page"].clone(), body["total"].clone()),
            (json!(page), json!(250))
        );
        got.extend(body["list"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(got.len(), 250);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d["id"], ids[i].as_str());
        match i {
            7 => assert!(d.get("data").is_none(), "nothing at the path: no data"),
            8 => assert_eq!(d["data"], Value::Null),
            _ => assert_eq!(d["data"], desired(i), "device {i}"),
        }
    }
    let (_, deeper) = api
        .get("devices?statePath=desired/cfg&perPage=1&page=5")
        .await;
    assert_eq!(deeper["list"][0]["data"], desired(5)["cfg"]);
}

#[tokio::test]
async fn a_state_sub_path_is_replaced_by_put_merged_by_post_and_deleted_alone() {
    let fake = FakeGolioth::start().await;
    let api = Api::new(&fake);
    let id = fake.create_device("a", &["hw-a"]);
    let data = |p: &str| format!("devices/{id}/data/{p}");
    fake.set_state(&id, "desired", json!({"led": 1, "cfg": {"x": 1, "y": 1}}));
    fake.set_state(&id, "state", json!({"led": 0}));

    api.send("PUT", &data("desired/cfg"), Some(json!({"x": 2})))
        .await;
    assert_eq!(
        fake.state(&id, "desired"),
        Some(json!({"led": 1, "cfg": {"x": 2}}))
    );
    api.send(
        "POST",
        &data("desired"),
        Some(json!({"cfg": {"z": 3}, "fan": true})),
    )
    .await;
    assert_eq!(
        fake.state(&id, "desired"),
        Some(json!({"led": 1, "cfg": {"x": 2, "z": 3}, "fan": true}))
    );
    let (status, body) = api.send("DELETE", &data("desired/led"), None).await;
    assert_eq!((status, body), (200, json!({})));
    let (status, body) = api.send("DELETE", &data("desired/led"), None).await;
    assert_eq!((status, body), (200, json!({})), "deleting nothing is done");
    assert_eq!(
        fake.state(&id, "desired"),
        Some(json!({"cfg": {"x": 2, "z": 3}, "fan": true}))
    );
    assert_eq!(
        fake.state(&id, "state"),
        Some(json!({"led": 0})),
        "siblings stay"
    );
    api.send("PUT", &data("desired/cfg/x"), Some(json!(5)))
        .await;
    assert_eq!(
        fake.state(&id, "desired/cfg"),
        Some(json!({"x": 5, "z": 3}))
    );
    let (_, listed) = api.get("devices?statePath=desired").await;
    assert_eq!(
        listed["list"][0]["data"],
        json!({"cfg": {"x": 5, "z": 3}, "fan": true})
    );
}
