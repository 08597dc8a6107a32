//! Reconciliation as a property, through the real sync runs: random sequences of edits in the
//! three places (the local operator, Golioth, NetNeural) interleaved with sync runs whose reads
//! and writes fail at random (503s from the fake clouds, real HTTP), and operators resolving
//! conflicts. After a final fault-free run:
//! - the mirror and both clouds agree on every field no pending manual conflict holds;
//! - no conflict was recorded twice (same cloud, field, and pair of values);
//! - no edit vanished: each one is a final value somewhere, a side of a recorded conflict, or
//!   was superseded by a later edit of the same field;
//! - one more run, with nothing new, writes nothing to either cloud.
//!
//! The pure merge has its own, larger property tests (src/reconcile/proptests.rs); these check
//! the runs that execute it: reads, writes, settling after failures, commits, resolutions.

mod fakes;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use fakes::rig::{clouds, with_keys};
use fakes::{FakeGolioth, FakeNetNeural, Fault, Match};
use nn_gateway::cloud::ApiKey;
use nn_gateway::cloud::golioth::Golioth;
use nn_gateway::cloud::netneural::NetNeural;
use nn_gateway::cloud::sync::{GoliothSpoke, NetNeuralSpoke, Syncer};
use nn_gateway::cloud::uplink::Identity;
use nn_gateway::config::{Config, IdTemplate, Source, Synchronous};
use nn_gateway::model::{DeviceKey, Origin, Target};
use nn_gateway::reconcile::Strategy as Merge;
use nn_gateway::store::sync::Resolution;
use nn_gateway::store::{Db, OpenOptions, Store};
use proptest::prelude::*;
use serde_json::{Value, json};

const DEVICES: [&str; 2] = ["d-0", "d-1"];
/// Desired fields; `/name` is edited in the clouds only (no local command edits names).
const FIELDS: [&str; 3] = ["/desired/a", "/desired/b", "/name"];

#[derive(Clone, Debug)]
enum Place {
    Local,
    Golioth,
    NetNeural,
}

#[derive(Clone, Debug)]
enum Step {
    Edit {
        place: Place,
        device: usize,
        field: usize,
    },
    Sync {
        golioth_read: bool,
        netneural_read: bool,
        golioth_write: bool,
        netneural_write: bool,
    },
    /// Resolve the oldest pending conflict: local, remote, or a value of the operator's own.
    Resolve(u8),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    let place = prop_oneof![
        Just(Place::Local),
        Just(Place::Golioth),
        Just(Place::NetNeural)
    ];
    let ok = prop::bool::weighted(0.75);
    prop_oneof![
        4 => (place, 0..DEVICES.len(), 0..FIELDS.len())
            .prop_map(|(place, device, field)| Step::Edit { place, device, field }),
        3 => (ok, ok, ok, ok).prop_map(|(a, b, c, d)| Step::Sync {
            golioth_read: a, netneural_read: b, golioth_write: c, netneural_write: d
        }),
        1 => (0u8..3).prop_map(Step::Resolve),
    ]
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Merge> {
    prop_oneof![
        Just(Merge::Manual),
        Just(Merge::LocalWins),
        Just(Merge::RemoteWins),
        Just(Merge::NewestWins),
    ]
}

struct World {
    golioth: FakeGolioth,
    nn: FakeNetNeural,
    syncer: Syncer,
    db: std::path::PathBuf,
    /// Per device: (Golioth id, NetNeural id).
    ids: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

async fn world(strategy: Merge) -> World {
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::load_with(&Source::Embedded, &[], None).unwrap();
    clouds(&mut cfg, dir.path(), Some(&golioth), Some(&nn));
    let cfg = with_keys(cfg);
    let db = dir.path().join("g.db");
    let opts = OpenOptions {
        synchronous: Synchronous::Normal,
        targets: vec![Target::Golioth, Target::NetNeural],
        rejected_keep: 10,
    };
    let mut ids = Vec::new();
    {
        let mut conn = Db::open(&db, &opts).unwrap();
        for key in DEVICES {
            let g = golioth.create_device(key, &[key]);
            let n = nn.seed_device(fakes::rig::ORG, key, &[key]);
            let k = DeviceKey::parse(key).unwrap();
            conn.sync_import(&k, Origin::Mqtt, Target::Golioth, &g)
                .unwrap();
            conn.sync_import(&k, Origin::Mqtt, Target::NetNeural, &n)
                .unwrap();
            ids.push((g, n));
        }
    }
    let store = Store::open(&db, &opts).unwrap();
    let key = |s: &Option<nn_gateway::config::Secret>| ApiKey::new(s.clone().unwrap());
    let syncer = Syncer::new(
        store,
        Some(GoliothSpoke::new(
            Golioth::new(&cfg.golioth, key(&cfg.golioth.api_key)).unwrap(),
            cfg.golioth.desired_path.clone(),
        )),
        Some(NetNeuralSpoke {
            client: NetNeural::new(&cfg.netneural, key(&cfg.netneural.api_key)).unwrap(),
        }),
        nn_gateway::reconcile::Policy {
            strategy,
            fields: Vec::new(),
        },
        Identity {
            template: IdTemplate::default(),
            site: String::new(),
        },
        4,
    );
    World {
        golioth,
        nn,
        syncer,
        db,
        ids,
        _dir: dir,
    }
}

fn conn(db: &Path) -> Db {
    Db::open(
        db,
        &OpenOptions {
            synchronous: Synchronous::Normal,
            targets: Vec::new(),
            rejected_keep: 10,
        },
    )
    .unwrap()
}

/// The field's value in each place: (local, Golioth, NetNeural).
fn values(w: &World, device: usize, field: &str) -> [Option<Value>; 3] {
    let (g, n) = &w.ids[device];
    let local = {
        let db = conn(&w.db);
        let d = db
            .sync_devices()
            .unwrap()
            .into_iter()
            .find(|d| d.key.as_str() == DEVICES[device])
            .unwrap();
        match field {
            "/name" => d.name.map(Value::from),
            f => d
                .desired
                .and_then(|doc| doc.get(&f["/desired/".len()..]).cloned()),
        }
    };
    let golioth = match field {
        "/name" => w.golioth.device(g).map(|d| d["name"].clone()),
        f => w
            .golioth
            .state(g, "desired")
            .and_then(|doc| doc.get(&f["/desired/".len()..]).cloned()),
    };
    let row = w.nn.row("devices", n).unwrap();
    let netneural = match field {
        "/name" => Some(row["name"].clone()),
        f => row["metadata"]["desired"]
            .get(&f["/desired/".len()..])
            .cloned(),
    };
    [local, golioth, netneural].map(|v| v.filter(|v| !v.is_null()))
}

fn edit(w: &World, place: &Place, device: usize, field: &str, value: &str) {
    let (g, n) = &w.ids[device];
    let key = &field["/desired/".len().min(field.len())..];
    match (place, field) {
        (Place::Local, "/name") => {}
        (Place::Local, _) => {
            let mut db = conn(&w.db);
            let k = DeviceKey::parse(DEVICES[device]).unwrap();
            let mut doc = db.desired(&k).unwrap().map_or_else(|| json!({}), |d| d.doc);
            doc[key] = json!(value);
            db.set_desired(&k, &doc, Origin::Local).unwrap();
        }
        (Place::Golioth, "/name") => {
            w.golioth.update_device(g, json!({ "name": value }));
        }
        (Place::Golioth, _) => {
            let mut doc = w.golioth.state(g, "desired").unwrap_or_else(|| json!({}));
            if !doc.is_object() {
                doc = json!({});
            }
            doc[key] = json!(value);
            w.golioth.set_state(g, "desired", doc);
        }
        (Place::NetNeural, "/name") => {
            w.nn.edit_device(n, json!({ "name": value }));
        }
        (Place::NetNeural, _) => {
            let mut metadata = w.nn.row("devices", n).unwrap()["metadata"].clone();
            if !metadata["desired"].is_object() {
                metadata["desired"] = json!({});
            }
            metadata["desired"][key] = json!(value);
            w.nn.edit_device(n, json!({ "metadata": metadata }));
        }
    }
}

async fn run(w: &World) -> nn_gateway::cloud::sync::RunReport {
    w.syncer.run_once().await.unwrap()
}

async fn scenario(strategy: Merge, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let w = world(strategy).await;
    run(&w).await;
    // (device, field) → edit values in order; value → whether it was a real change.
    let mut edits: Vec<(usize, String, String, usize)> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Edit {
                place,
                device,
                field,
            } => {
                let field = FIELDS[*field];
                if matches!(place, Place::Local) && field == "/name" {
                    continue;
                }
                let value = format!("e{i}");
                edit(&w, place, *device, field, &value);
                edits.push((*device, field.to_owned(), value, i));
            }
            Step::Sync {
                golioth_read,
                netneural_read,
                golioth_write,
                netneural_write,
            } => {
                let (g, n) = (w.golioth.faults(), w.nn.faults());
                if !golioth_read {
                    g.always(Match::get("/devices"), Fault::status(503));
                }
                if !netneural_read {
                    n.always(Match::get("/devices"), Fault::status(503));
                }
                if !golioth_write {
                    g.always(Match::method("PUT"), Fault::status(503));
                    g.always(Match::method("PATCH"), Fault::status(503));
                }
                if !netneural_write {
                    n.always(Match::patch("/devices"), Fault::status(503));
                }
                run(&w).await;
                g.clear();
                n.clear();
            }
            Step::Resolve(how) => {
                let mut db = conn(&w.db);
                if let Some(c) = db.conflicts(false, 1).unwrap().pop() {
                    let choice = match how {
                        0 => Resolution::Local,
                        1 => Resolution::Remote,
                        _ => Resolution::Value(json!(format!("r{i}"))),
                    };
                    if let Resolution::Value(v) = &choice {
                        let device = DEVICES.iter().position(|d| *d == c.device).unwrap();
                        edits.push((device, c.field.clone(), v.as_str().unwrap().into(), i));
                    }
                    db.resolve_conflict(c.id, &choice, "prop").unwrap().unwrap();
                }
            }
        }
    }
    let last = run(&w).await;
    prop_assert!(
        last.errors.is_empty(),
        "the final run failed: {:?}",
        last.errors
    );

    let db = conn(&w.db);
    let all = db.conflicts(true, 10_000).unwrap();
    let held: HashSet<(String, String)> = all
        .iter()
        .filter(|c| c.status == "pending")
        .map(|c| (c.device.clone(), c.field.clone()))
        .collect();
    let mut finals: BTreeMap<(usize, &str), [Option<Value>; 3]> = BTreeMap::new();
    for (device, key) in DEVICES.iter().enumerate() {
        for field in FIELDS {
            let v = values(&w, device, field);
            if !held.contains(&((*key).to_owned(), field.to_owned())) {
                prop_assert!(
                    v[0] == v[1] && v[1] == v[2],
                    "{key} {field}: local {:?}, golioth {:?}, netneural {:?}",
                    v[0],
                    v[1],
                    v[2]
                );
            }
            finals.insert((device, field), v);
        }
    }
    let mut recorded = HashSet::new();
    for c in &all {
        let k = (
            c.device.clone(),
            c.target.clone(),
            c.field.clone(),
            c.local.clone().map(|v| v.to_string()),
            c.remote.clone().map(|v| v.to_string()),
        );
        prop_assert!(recorded.insert(k), "conflict recorded twice: {c:?}");
    }
    for (n, (device, field, value, at)) in edits.iter().enumerate() {
        let v = json!(value);
        let is_final = finals[&(*device, field.as_str())].contains(&Some(v.clone()));
        let in_conflict = all.iter().any(|c| {
            c.device == DEVICES[*device]
                && c.field == *field
                && (c.local.as_ref() == Some(&v) || c.remote.as_ref() == Some(&v))
        });
        let superseded = edits[n + 1..]
            .iter()
            .any(|(d, f, _, later)| d == device && f == field && later > at);
        prop_assert!(
            is_final || in_conflict || superseded,
            "edit {value} of {} {field} vanished; finals {:?}",
            DEVICES[*device],
            finals[&(*device, field.as_str())]
        );
    }
    let (g0, n0) = (w.golioth.faults().counts(), w.nn.faults().counts());
    let quiet = run(&w).await;
    let (g1, n1) = (w.golioth.faults().counts(), w.nn.faults().counts());
    prop_assert_eq!(
        (g1.writes, n1.writes),
        (g0.writes, n0.writes),
        "{:?}",
        quiet
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_three_places_converge_and_no_edit_or_conflict_is_lost(
        strategy in strategy(),
        steps in prop::collection::vec(step(), 1..24),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(strategy, steps))?;
    }
}
