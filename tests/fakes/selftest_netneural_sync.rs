//! The fake NetNeural's answers to the reconciliation's reads and writes: keyset pages,
//! timestamps compared as instants, `device_conflicts`.

use serde_json::{Value, json};

use super::fakes::FakeNetNeural;
use super::selftest_netneural::{ORG, Rest, urlencode};

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
