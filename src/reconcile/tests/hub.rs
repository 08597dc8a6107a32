//! The hub, by example: one device, both clouds, and what settling after the writes keeps.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::model::Target::{Golioth, NetNeural};
use crate::model::{Target, UnixMillis};
use crate::reconcile::*;

fn doc(v: Value) -> Fields {
    flatten(&v)
}

/// A two-way spoke with no held fields.
fn spoke(target: Target, base: Value, remote: Value, at: Option<i64>) -> Spoke {
    Spoke {
        target,
        base: doc(base),
        remote: doc(remote),
        remote_at: at.map(UnixMillis),
        direction: Direction::BOTH,
        held: BTreeSet::new(),
    }
}

fn name(v: &str) -> Value {
    json!({ "name": v })
}

#[test]
fn a_change_taken_from_golioth_reaches_netneural_in_the_same_run() {
    let spokes = [
        spoke(Golioth, name("a"), name("g"), None),
        spoke(NetNeural, name("a"), name("a"), None),
    ];
    let plan = reconcile_device(
        &doc(name("a")),
        None,
        &spokes,
        &Policy::new(Strategy::Manual),
    );
    assert_eq!(plan.local(), &doc(name("g")));
    assert!(plan.local_changed());
    assert_eq!(plan.pushes(Golioth), None);
    assert_eq!(plan.pushes(NetNeural), Some(&doc(name("g"))));
    assert_eq!(
        plan.pushed_fields(NetNeural),
        vec![("/name".to_owned(), Some(json!("g")))]
    );
    assert!(plan.conflicts().is_empty());
}

#[test]
fn a_change_from_the_second_cloud_reaches_the_first_in_a_second_pass() {
    let spokes = [
        spoke(Golioth, name("a"), name("a"), None),
        spoke(NetNeural, name("a"), name("n"), None),
    ];
    let plan = reconcile_device(
        &doc(name("a")),
        None,
        &spokes,
        &Policy::new(Strategy::Manual),
    );
    assert_eq!(plan.local(), &doc(name("n")));
    assert_eq!(plan.pushes(Golioth), Some(&doc(name("n"))));
    assert_eq!(plan.pushes(NetNeural), None);
    let settled = plan.settle(|_| true);
    assert_eq!(
        settled.bases,
        vec![(Golioth, doc(name("n"))), (NetNeural, doc(name("n")))]
    );
}

#[test]
fn concurrent_edits_in_both_clouds_surface_as_one_conflict() {
    let spokes = [
        spoke(Golioth, name("a"), name("g"), None),
        spoke(NetNeural, name("a"), name("n"), None),
    ];
    let manual = reconcile_device(
        &doc(name("a")),
        None,
        &spokes,
        &Policy::new(Strategy::Manual),
    );
    let held = Conflict {
        field: "/name".into(),
        local: Some(json!("g")),
        remote: Some(json!("n")),
        base: Some(json!("a")),
        settled: Settled::Held,
    };
    assert_eq!(manual.conflicts(), vec![(NetNeural, held.clone())]);
    assert_eq!(manual.local(), &doc(name("g")));
    assert_eq!(manual.pushes(NetNeural), None, "a held field is not pushed");

    let local = reconcile_device(
        &doc(name("a")),
        None,
        &spokes,
        &Policy::new(Strategy::LocalWins),
    );
    let conflicts = local.conflicts();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].1.settled, Settled::Local);
    assert_eq!(local.pushes(NetNeural), Some(&doc(name("g"))));
}

#[test]
fn a_failed_push_keeps_the_take_and_the_old_base_so_the_next_run_pushes_again() {
    let spokes = [
        spoke(Golioth, name("a"), name("g"), None),
        spoke(NetNeural, name("a"), name("a"), None),
    ];
    let policy = Policy::new(Strategy::Manual);
    let plan = reconcile_device(&doc(name("a")), None, &spokes, &policy);
    let settled = plan.settle(|target| target != NetNeural);
    assert_eq!(settled.local, doc(name("g")), "the take stands");
    assert_eq!(
        settled.bases,
        vec![(Golioth, doc(name("g"))), (NetNeural, doc(name("a")))]
    );
    assert_eq!(settled.remotes[1], (NetNeural, doc(name("a"))));

    let next = [
        spoke(Golioth, name("g"), name("g"), None),
        spoke(NetNeural, name("a"), name("a"), None),
    ];
    let again = reconcile_device(&settled.local, None, &next, &policy);
    assert_eq!(again.pushes(NetNeural), Some(&doc(name("g"))));
    assert!(!again.local_changed());
}

#[test]
fn a_conflict_settled_by_a_failed_push_is_left_for_the_next_run() {
    let spokes = [spoke(
        NetNeural,
        json!({"name": "a", "enabled": true, "desired": {"x": "a"}}),
        json!({"name": "n", "enabled": false, "desired": {"x": "n"}}),
        None,
    )];
    let policy = Policy {
        strategy: Strategy::LocalWins,
        fields: vec![
            ("/enabled".into(), FieldRule::Strategy(Strategy::RemoteWins)),
            ("/desired".into(), FieldRule::Strategy(Strategy::Manual)),
        ],
    };
    // Both sides changed all three: /name is settled by a push, /enabled by a take, and
    // /desired/x is held.
    let mirror = doc(json!({"name": "l", "enabled": null, "desired": {"x": "l"}}));
    let plan = reconcile_device(&mirror, None, &spokes, &policy);
    assert_eq!(plan.conflicts().len(), 3);

    let failed = plan.settle(|_| false);
    let kept: Vec<(&str, Settled)> = failed
        .conflicts
        .iter()
        .map(|(_, c)| (c.field.as_str(), c.settled))
        .collect();
    assert_eq!(
        kept,
        vec![("/desired/x", Settled::Held), ("/enabled", Settled::Remote)]
    );
    let taken = json!({"name": "l", "enabled": false, "desired": {"x": "l"}});
    assert_eq!(failed.local, doc(taken));
    let base = json!({"name": "a", "enabled": false, "desired": {"x": "a"}});
    assert_eq!(failed.bases, vec![(NetNeural, doc(base))]);
    assert_eq!(plan.settle(|_| true).conflicts.len(), 3);
}

#[test]
fn pushes_that_cancel_out_need_no_write_request() {
    // Golioth is pushed "l", then NetNeural's conflict is settled for its "b", which goes
    // back to Golioth in the second pass: Golioth ends as it was.
    let spokes = [
        spoke(Golioth, name("b"), name("b"), None),
        spoke(NetNeural, name("x"), name("b"), None),
    ];
    let plan = reconcile_device(
        &doc(name("l")),
        None,
        &spokes,
        &Policy::new(Strategy::RemoteWins),
    );
    assert_eq!(plan.local(), &doc(name("b")));
    assert_eq!(plan.pushes(Golioth), None);
    assert!(plan.pushed_fields(Golioth).is_empty());
    assert_eq!(plan.actions(Golioth).len(), 2, "pushed, then pushed back");
    let settled = plan.settle(|_| panic!("no write was needed"));
    assert_eq!(settled.bases[0], (Golioth, doc(name("b"))));
}

#[test]
fn newest_wins_counts_the_time_of_the_document_taken_from() {
    // The mirror (10) takes Golioth's change (30); NetNeural's concurrent change (20) is then
    // older than the mirror.
    let spokes = [
        spoke(Golioth, name("a"), name("g"), Some(30)),
        spoke(NetNeural, name("a"), name("n"), Some(20)),
    ];
    let policy = Policy::new(Strategy::NewestWins);
    let plan = reconcile_device(&doc(name("a")), Some(UnixMillis(10)), &spokes, &policy);
    assert_eq!(plan.local_at(), Some(UnixMillis(30)));
    assert_eq!(plan.conflicts()[0].1.settled, Settled::Local);
    assert_eq!(plan.pushes(NetNeural), Some(&doc(name("g"))));
}

#[test]
fn a_held_field_is_left_alone_only_in_its_own_cloud() {
    let mut golioth = spoke(Golioth, name("a"), name("x"), None);
    golioth.held.insert("/name".into());
    let spokes = [golioth, spoke(NetNeural, name("a"), name("n"), None)];
    let plan = reconcile_device(
        &doc(name("a")),
        None,
        &spokes,
        &Policy::new(Strategy::Manual),
    );
    assert_eq!(plan.local(), &doc(name("n")));
    assert!(plan.actions(Golioth).is_empty());
    assert_eq!(plan.pushes(Golioth), None);
}

#[test]
fn removals_are_pushed_as_none_and_a_cloud_left_out_gets_nothing() {
    let spokes = [spoke(
        Golioth,
        json!({"name": "a", "tags": ["t"]}),
        json!({"name": "a", "tags": ["t"]}),
        None,
    )];
    let plan = reconcile_device(
        &doc(name("a")),
        None,
        &spokes,
        &Policy::new(Strategy::Manual),
    );
    assert_eq!(
        plan.pushed_fields(Golioth),
        vec![("/tags".to_owned(), None)]
    );
    assert_eq!(plan.pushes(Golioth), Some(&doc(name("a"))));
    assert_eq!(plan.pushes(NetNeural), None);
    assert!(plan.actions(NetNeural).is_empty());
}

#[test]
fn quiet_means_nothing_to_write_and_a_base_refresh_is_not_quiet() {
    let synced = [spoke(Golioth, name("a"), name("a"), None)];
    let policy = Policy::new(Strategy::Manual);
    let plan = reconcile_device(&doc(name("a")), None, &synced, &policy);
    assert!(plan.is_quiet());
    assert_eq!(plan.settle(|_| true).bases, vec![(Golioth, doc(name("a")))]);

    let stale = [spoke(Golioth, name("old"), name("a"), None)];
    let plan = reconcile_device(&doc(name("a")), None, &stale, &policy);
    assert!(!plan.is_quiet());
    assert_eq!(plan.pushes(Golioth), None);
    assert_eq!(
        plan.settle(|_| false).bases,
        vec![(Golioth, doc(name("a")))]
    );
}

#[test]
fn a_merged_set_whose_push_failed_is_merged_again_not_taken_back() {
    let policy = Policy {
        strategy: Strategy::Manual,
        fields: vec![(TAGS.into(), FieldRule::MergeSet)],
    };
    let spokes = [spoke(
        NetNeural,
        json!({"tags": ["a"]}),
        json!({"tags": ["a", "n"]}),
        None,
    )];
    let mirror = doc(json!({"tags": ["a", "l"]}));
    let merged = doc(json!({"tags": ["a", "l", "n"]}));
    let plan = reconcile_device(&mirror, None, &spokes, &policy);
    assert_eq!(plan.local(), &merged);
    assert_eq!(plan.pushes(NetNeural), Some(&merged));

    let failed = plan.settle(|_| false);
    assert_eq!(failed.bases, vec![(NetNeural, doc(json!({"tags": ["a"]})))]);
    let next = [spoke(
        NetNeural,
        json!({"tags": ["a"]}),
        json!({"tags": ["a", "n"]}),
        None,
    )];
    let again = reconcile_device(&failed.local, None, &next, &policy);
    assert_eq!(again.local(), &merged, "the mirror keeps l");
    assert_eq!(again.pushes(NetNeural), Some(&merged));
}
