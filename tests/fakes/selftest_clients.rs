//! The gateway's own cloud clients against the fakes: what the reconciliation calls send,
//! the fakes take and answer as the real clouds would (unit tests pin the requests; these
//! pin that the fakes understand them).

use serde_json::{Map, json};

use nn_gateway::cloud::ApiKey;
use nn_gateway::cloud::golioth::{self, DeviceFilter, Golioth};
use nn_gateway::cloud::netneural::{
    self, ConflictStatus, ConflictStrategy, NetNeural, NewConflict,
};
use nn_gateway::config::{GoliothConfig, NetNeuralConfig, Secret};

use super::fakes::{FakeGolioth, FakeNetNeural};

const ORG: &str = "0b8f5c1e-0000-4000-8000-000000000001";
const INTEGRATION: &str = "0b8f5c1e-0000-4000-8000-000000000002";

fn netneural_client(fake: &FakeNetNeural) -> NetNeural {
    let config = NetNeuralConfig {
        url: Some(fake.url().parse().unwrap()),
        organization_id: ORG.into(),
        integration_id: INTEGRATION.into(),
        ..NetNeuralConfig::default()
    };
    let key = ApiKey::new(Secret::new(super::fakes::netneural::DEFAULT_KEY));
    NetNeural::new(&config, key).unwrap()
}

fn golioth_client(fake: &FakeGolioth) -> Golioth {
    let config = GoliothConfig {
        api_url: fake.url().parse().unwrap(),
        project_id: fake.project().into(),
        ..GoliothConfig::default()
    };
    let key = ApiKey::new(Secret::new(super::fakes::golioth::DEFAULT_KEY));
    Golioth::new(&config, key).unwrap()
}

#[tokio::test]
async fn a_pull_reads_every_changed_device_and_a_stale_guarded_write_changes_nothing() {
    let fake = FakeNetNeural::start().await;
    let nn = netneural_client(&fake);
    let ids: Vec<String> = (0..23)
        .map(|i| fake.seed_device(ORG, &format!("d{i}"), &[]))
        .collect();
    fake.edit_device(&ids[4], json!({"deleted_at": "2024-05-01T10:00:00Z"}));
    fake.seed_device("0b8f5c1e-0000-4000-8000-0000000000ee", "elsewhere", &[]);

    let all = nn.devices_changed_since(None, 10).await.unwrap();
    assert_eq!(all.len(), 23);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(all.iter().filter(|d| d.deleted).count(), 1);
    let cursor = all.iter().filter_map(|d| d.version.clone()).max().unwrap();

    let edited = fake.edit_device(&ids[9], json!({"name": "renamed"}));
    let changed = nn.devices_changed_since(Some(&cursor), 10).await.unwrap();
    let changed: Vec<&str> = changed.iter().map(|d| d.id.as_str()).collect();
    assert!(changed.contains(&ids[9].as_str()), "{changed:?}");
    assert!(
        changed.len() <= 2,
        "the cursor row itself and the edit: {changed:?}"
    );

    let id = netneural::DeviceId(ids[9].clone());
    let version = edited["updated_at"].as_str().unwrap().to_owned();
    let mut metadata = Map::new();
    metadata.insert("owner".into(), json!("ui"));
    metadata.insert("desired".into(), json!({"led": 1}));
    let written = nn
        .update_synced(&id, Some(&version), Some("synced"), &metadata)
        .await
        .unwrap()
        .expect("the guard matched");
    assert_eq!(written.name, "synced");
    assert_ne!(written.version.as_deref(), Some(version.as_str()));
    let stale = nn
        .update_synced(&id, Some(&version), Some("lost"), &Map::new())
        .await
        .unwrap();
    assert_eq!(stale, None);
    let row = fake.row("devices", &ids[9]).unwrap();
    assert_eq!(
        (row["name"].clone(), row["metadata"].clone()),
        (
            json!("synced"),
            json!({"owner": "ui", "desired": {"led": 1}})
        )
    );
}

#[tokio::test]
async fn assignments_pull_by_cursor_and_conflicts_round_trip_through_an_operator() {
    let fake = FakeNetNeural::start().await;
    let nn = netneural_client(&fake);
    let devs: Vec<String> = (0..5)
        .map(|i| fake.seed_device(ORG, &format!("d{i}"), &[]))
        .collect();
    for (i, d) in devs.iter().enumerate() {
        fake.seed_assignment(d, INTEGRATION, &format!("g{i}"), "bidirectional");
    }
    let all = nn.assignments_changed_since(None, 2).await.unwrap();
    assert_eq!(all.len(), 5);
    let cursor = all.iter().filter_map(|(_, v)| v.clone()).max().unwrap();
    let assignment = fake
        .rows("device_service_assignments")
        .into_iter()
        .find(|a| a["device_id"] == devs[1].as_str())
        .unwrap();
    fake.edit(
        "device_service_assignments",
        assignment["id"].as_str().unwrap(),
        json!({"sync_direction": "export"}),
    );
    let changed = nn
        .assignments_changed_since(Some(&cursor), 2)
        .await
        .unwrap();
    let export = changed
        .iter()
        .find(|(a, _)| a.device_id.as_str() == devs[1])
        .expect("the edited assignment");
    assert_eq!(export.0.direction, netneural::SyncDirection::Export);

    let conflict = |field: &str, status| NewConflict {
        device_id: netneural::DeviceId(devs[0].clone()),
        field_name: field.into(),
        local_value: Some(json!({"led": 1})),
        remote_value: Some(json!({"led": 2})),
        local_updated_at: None,
        remote_updated_at: None,
        resolution_status: status,
        resolution_strategy: None,
        resolved_value: None,
    };
    let ids = nn
        .insert_conflicts(&[
            conflict("desired.led", ConflictStatus::Pending),
            conflict("name", ConflictStatus::AutoResolved),
        ])
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    let stored = fake.conflicts();
    assert_eq!(stored[0]["id"], ids[0].as_str());
    assert_eq!(stored[0]["conflict_type"], "data_mismatch");
    assert_eq!(stored[1]["field_name"], "name");
    assert!(stored[1]["resolved_at"].is_string() && stored[0]["resolved_at"].is_null());

    fake.resolve_conflict(&ids[0], json!({"led": 3}), "ops@example.com");
    nn.resolve_conflict(
        &ids[1],
        ConflictStatus::Ignored,
        Some(ConflictStrategy::LocalWins),
        None,
        "nn-gateway",
    )
    .await
    .unwrap();
    let mut read = nn.conflicts(&ids).await.unwrap();
    read.sort_by_key(|c| ids.iter().position(|i| *i == c.id));
    assert_eq!(read[0].resolution_status, ConflictStatus::Resolved);
    assert_eq!(read[0].resolution_strategy, Some(ConflictStrategy::Manual));
    assert_eq!(read[0].resolved_value, Some(json!({"led": 3})));
    assert_eq!(read[0].resolved_by.as_deref(), Some("ops@example.com"));
    assert!(read[0].resolved_at.is_some());
    assert_eq!(read[1].resolution_status, ConflictStatus::Ignored);
    assert_eq!(read[1].resolved_by.as_deref(), Some("nn-gateway"));

    let stray = NewConflict {
        device_id: netneural::DeviceId("0b8f5c1e-0000-4000-8000-0000000000ff".into()),
        ..conflict("x", ConflictStatus::Pending)
    };
    let e = nn.insert_conflicts(&[stray]).await.unwrap_err();
    assert!(e.is_foreign_key_violation(), "{e}");
}

#[tokio::test]
async fn a_golioth_list_at_the_desired_path_brings_every_devices_document() {
    let fake = FakeGolioth::start().await;
    let g = golioth_client(&fake);
    let desired = |i: usize| json!({"led": i, "cfg": {"mode": format!("m{i}")}});
    let ids: Vec<String> = (0..250)
        .map(|i| fake.create_device(&format!("dev-{i:03}"), &[&format!("hw-{i:03}")]))
        .collect();
    for (i, id) in ids.iter().enumerate().skip(1) {
        g.put_state(&golioth::DeviceId(id.clone()), "desired", &desired(i))
            .await
            .unwrap();
    }
    let first = golioth::DeviceId(ids[1].clone());
    g.delete_state(&first, "desired/led").await.unwrap();
    g.put_state(&first, "desired/cfg/fan", &json!(true))
        .await
        .unwrap();

    let mark = fake.faults().mark();
    let filter = DeviceFilter {
        state_path: Some("desired".into()),
        ..DeviceFilter::default()
    };
    let devices = g.list_devices(&filter).await.unwrap();
    assert_eq!(
        fake.faults().counts_by_kind_since(mark).reads,
        3,
        "pages of 100"
    );
    assert_eq!(devices.len(), 250);
    assert_eq!(devices[0].state, None, "nothing at the path");
    assert_eq!(
        devices[1].state,
        Some(json!({"cfg": {"mode": "m1", "fan": true}}))
    );
    for (i, d) in devices.iter().enumerate().skip(2) {
        assert_eq!(d.id.as_str(), ids[i]);
        assert_eq!(d.state, Some(desired(i)), "device {i}");
    }
}
