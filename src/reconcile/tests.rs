//! The rule, case by case: one table of [`plan`] cases, then the policy's parsing and
//! lookup. Documents as fields are tested in `tests/fields.rs`, the hub in `tests/hub.rs`.

mod fields;
mod hub;

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::model::UnixMillis;

/// One row of the table. Documents are written as JSON and flattened, as the callers do.
struct Case {
    name: String,
    base: Value,
    local: Value,
    remote: Value,
    local_at: Option<i64>,
    remote_at: Option<i64>,
    direction: Direction,
    held: &'static [&'static str],
    policy: Policy,
    expect: Vec<Action>,
}

fn case(name: impl Into<String>, base: Value, local: Value, remote: Value) -> Case {
    Case {
        name: name.into(),
        base,
        local,
        remote,
        local_at: None,
        remote_at: None,
        direction: Direction::BOTH,
        held: &[],
        // Manual by default, so that a case that forgets its policy cannot pass by luck
        // with a strategy that pushes or takes.
        policy: Policy::new(Strategy::Manual),
        expect: Vec::new(),
    }
}

const N: &str = "/name";

/// A case about `/name` alone: each side's value, `-` for absent.
fn row(name: impl Into<String>, base: &str, local: &str, remote: &str) -> Case {
    let doc = |v: &str| {
        if v == "-" {
            json!({})
        } else {
            json!({ "name": v })
        }
    };
    case(name, doc(base), doc(local), doc(remote))
}

impl Case {
    fn strategy(mut self, strategy: Strategy) -> Case {
        self.policy.strategy = strategy;
        self
    }
    fn rule(mut self, pointer: &str, rule: FieldRule) -> Case {
        self.policy.fields.push((pointer.to_owned(), rule));
        self
    }
    fn times(mut self, local: Option<i64>, remote: Option<i64>) -> Case {
        self.local_at = local;
        self.remote_at = remote;
        self
    }
    fn direction(mut self, direction: Direction) -> Case {
        self.direction = direction;
        self
    }
    fn held(mut self, held: &'static [&'static str]) -> Case {
        self.held = held;
        self
    }
    fn expect(mut self, expect: impl IntoIterator<Item = Action>) -> Case {
        self.expect = expect.into_iter().collect();
        self
    }
}

/// `null` stands for absent in the expected actions.
fn value(v: Value) -> Option<Value> {
    (!v.is_null()).then_some(v)
}
fn take(field: &str, v: Value) -> Action {
    Action::Take {
        field: field.into(),
        value: value(v),
    }
}
fn push(field: &str, v: Value) -> Action {
    Action::Push {
        field: field.into(),
        value: value(v),
    }
}
fn agree(field: &str, v: Value) -> Action {
    Action::Agree {
        field: field.into(),
        value: value(v),
    }
}
fn conflict(field: &str, [l, r, b]: [Value; 3], settled: Settled) -> Action {
    Action::Conflict(Conflict {
        field: field.into(),
        local: value(l),
        remote: value(r),
        base: value(b),
        settled,
    })
}
fn local_wins(field: &str, [l, r, b]: [Value; 3]) -> Vec<Action> {
    vec![
        conflict(field, [l.clone(), r, b], Settled::Local),
        push(field, l),
    ]
}
fn remote_wins(field: &str, [l, r, b]: [Value; 3]) -> Vec<Action> {
    vec![
        conflict(field, [l, r.clone(), b], Settled::Remote),
        take(field, r),
    ]
}
/// `/name`: the mirror "l", the cloud "r", the base "a".
fn lra() -> [Value; 3] {
    [json!("l"), json!("r"), json!("a")]
}

/// Every case in which something changed, under one direction.
fn changed_cases(direction: Direction, way: &str) -> Vec<Case> {
    use Strategy::*;
    let Direction { pull, push: send } = direction;
    let when = |allowed: bool, actions: Vec<Action>| if allowed { actions } else { vec![] };
    let merge = |name: &str| {
        case(
            format!("{name}, {way}"),
            json!({"tags": ["a", "b"]}),
            json!({"tags": ["a", "b", "c"]}),
            json!({"tags": ["b", "d"]}),
        )
        .rule("/tags", FieldRule::MergeSet)
        .direction(direction)
    };
    let merged = json!(["b", "c", "d"]);
    let cases = vec![
        row(format!("only remote changed, {way}"), "a", "a", "r")
            .expect(when(pull, vec![take(N, json!("r"))])),
        row(format!("remote added it, {way}"), "-", "-", "r")
            .expect(when(pull, vec![take(N, json!("r"))])),
        row(format!("remote removed it, {way}"), "a", "a", "-")
            .expect(when(pull, vec![take(N, json!(null))])),
        row(format!("only local changed, {way}"), "a", "l", "a")
            .expect(when(send, vec![push(N, json!("l"))])),
        row(format!("local added it, {way}"), "-", "l", "-")
            .expect(when(send, vec![push(N, json!("l"))])),
        row(format!("local removed it, {way}"), "a", "-", "a")
            .expect(when(send, vec![push(N, json!(null))])),
        row(
            format!("both changed it the same way, {way}"),
            "a",
            "c",
            "c",
        )
        .strategy(LocalWins)
        .expect([agree(N, json!("c"))]),
    ];
    // Both changed, differently: a conflict on a two-way spoke; on a one-way spoke a replica,
    // the side it copies from winning with no record.
    let one_way = match (pull, send) {
        (true, false) => Some(vec![take(N, json!("r"))]),
        (false, true) => Some(vec![push(N, json!("l"))]),
        _ => None,
    };
    let both = |strategy: Strategy, two_way: Vec<Action>| {
        row(
            format!("both changed, {}, {way}", strategy.as_str()),
            "a",
            "l",
            "r",
        )
        .strategy(strategy)
        .direction(direction)
        .expect(match (pull, send) {
            (true, true) => two_way,
            _ => one_way.clone().unwrap_or_default(),
        })
    };
    let merge_expect = match (pull, send) {
        (true, true) => vec![take("/tags", merged.clone()), push("/tags", merged)],
        (true, false) => vec![take("/tags", json!(["b", "d"]))],
        (false, true) => vec![push("/tags", json!(["a", "b", "c"]))],
        (false, false) => vec![],
    };
    cases
        .into_iter()
        .map(|c| c.direction(direction))
        .chain([
            both(LocalWins, local_wins(N, lra())),
            both(RemoteWins, remote_wins(N, lra())),
            both(Manual, vec![conflict(N, lra(), Settled::Held)]),
            both(NewestWins, local_wins(N, lra())),
            merge("both changed a merged set").expect(merge_expect),
        ])
        .collect()
}

fn cases() -> Vec<Case> {
    use Strategy::*;
    let merge = |name, base, local, remote| {
        case(name, base, local, remote).rule("/tags", FieldRule::MergeSet)
    };
    let mut cases = vec![
        // In sync.
        row("all three equal: nothing", "a", "a", "a"),
        case("all three empty: nothing", json!({}), json!({}), json!({})),
        case(
            "null is absent",
            json!({"name": null}),
            json!({}),
            json!({"desired": {}}),
        ),
        row("equal but the base is old: agree", "a", "c", "c").expect([agree(N, json!("c"))]),
        row("equal and never agreed: agree", "-", "c", "c").expect([agree(N, json!("c"))]),
        row("both removed it: agree on absent", "a", "-", "-").expect([agree(N, json!(null))]),
        row("agree needs no direction", "a", "c", "c")
            .direction(Direction::NONE)
            .expect([agree(N, json!("c"))]),
        case(
            "nested fields are fields",
            json!({"desired": {"config": {"interval": 1}, "led": "on"}}),
            json!({"desired": {"config": {"interval": 1}, "led": "on"}}),
            json!({"desired": {"config": {"interval": 2}, "led": "on"}}),
        )
        .expect([take("/desired/config/interval", json!(2))]),
        // Both changed, differently: each strategy.
        row("conflict, newest_wins, local newer: local", "a", "l", "r")
            .strategy(NewestWins)
            .times(Some(20), Some(10))
            .expect(local_wins(N, lra())),
        row("conflict, newest_wins, remote newer: remote", "a", "l", "r")
            .strategy(NewestWins)
            .times(Some(10), Some(20))
            .expect(remote_wins(N, lra())),
        row("conflict, newest_wins, a tie goes to local", "a", "l", "r")
            .strategy(NewestWins)
            .times(Some(10), Some(10))
            .expect(local_wins(N, lra())),
        row(
            "conflict, newest_wins, no local time is older",
            "a",
            "l",
            "r",
        )
        .strategy(NewestWins)
        .times(None, Some(1))
        .expect(remote_wins(N, lra())),
        row(
            "conflict, newest_wins, no remote time is older",
            "a",
            "l",
            "r",
        )
        .strategy(NewestWins)
        .times(Some(1), None)
        .expect(local_wins(N, lra())),
        row(
            "conflict: local removed it, remote changed it",
            "a",
            "-",
            "r",
        )
        .strategy(LocalWins)
        .expect(local_wins(N, [json!(null), json!("r"), json!("a")])),
        row(
            "conflict: remote removed it, local changed it",
            "a",
            "l",
            "-",
        )
        .strategy(RemoteWins)
        .expect(remote_wins(N, [json!("l"), json!(null), json!("a")])),
        row("conflict: both added it, differently", "-", "l", "r").expect([conflict(
            N,
            [json!("l"), json!("r"), json!(null)],
            Settled::Held,
        )]),
        // Sets.
        merge(
            "merge: the result equals the remote: take only",
            json!({"tags": ["a"]}),
            json!({"tags": ["a", "b"]}),
            json!({"tags": ["a", "b", "c"]}),
        )
        .expect([take("/tags", json!(["a", "b", "c"]))]),
        merge(
            "merge: the result equals the local: push only",
            json!({"tags": ["a", "b"]}),
            json!({"tags": ["b", "c"]}),
            json!({"tags": ["b"]}),
        )
        .expect([push("/tags", json!(["b", "c"]))]),
        merge(
            "merge: a removal on one side wins over keeping",
            json!({"tags": ["a", "b"]}),
            json!({"tags": ["a"]}),
            json!({"tags": ["a", "b", "c"]}),
        )
        .expect([
            take("/tags", json!(["a", "c"])),
            push("/tags", json!(["a", "c"])),
        ]),
        merge(
            "merge: local cleared the set, remote added",
            json!({"tags": ["a"]}),
            json!({}),
            json!({"tags": ["a", "c"]}),
        )
        .expect([take("/tags", json!(["c"])), push("/tags", json!(["c"]))]),
        merge(
            "merge: each removed one, nothing left: absent",
            json!({"tags": ["a", "b"]}),
            json!({"tags": ["b"]}),
            json!({"tags": ["a"]}),
        )
        .expect([take("/tags", json!(null)), push("/tags", json!(null))]),
        case(
            "merge: other arrays come out sorted",
            json!({"desired": {"list": ["x"]}}),
            json!({"desired": {"list": ["x", "y"]}}),
            json!({"desired": {"list": ["z", "x"]}}),
        )
        .rule("/desired/list", FieldRule::MergeSet)
        .expect([
            take("/desired/list", json!(["x", "y", "z"])),
            push("/desired/list", json!(["x", "y", "z"])),
        ]),
        row(
            "merge on a non-array falls back to the global strategy",
            "a",
            "l",
            "r",
        )
        .strategy(RemoteWins)
        .rule(N, FieldRule::MergeSet)
        .expect(remote_wins(N, lra())),
        merge(
            "merge with an array on one side only falls back",
            json!({"tags": ["a"]}),
            json!({"tags": ["b"]}),
            json!({"tags": "r"}),
        )
        .strategy(LocalWins)
        .expect(local_wins(
            "/tags",
            [json!(["b"]), json!("r"), json!(["a"])],
        )),
        case(
            "merge is opt-in: without a rule the global strategy settles the tags",
            json!({"tags": ["a"]}),
            json!({"tags": ["a", "l"]}),
            json!({"tags": ["a", "r"]}),
        )
        .strategy(LocalWins)
        .expect(local_wins(
            "/tags",
            [json!(["a", "l"]), json!(["a", "r"]), json!(["a"])],
        )),
        // Field policies.
        row("a field rule overrides the global strategy", "a", "l", "r")
            .strategy(LocalWins)
            .rule(N, FieldRule::Strategy(RemoteWins))
            .expect(remote_wins(N, lra())),
        case(
            "the longest covering pointer decides",
            json!({"desired": {"config": {"interval": 1}}}),
            json!({"desired": {"config": {"interval": 2}}}),
            json!({"desired": {"config": {"interval": 3}}}),
        )
        .strategy(LocalWins)
        .rule("/desired/config", FieldRule::Strategy(Manual))
        .rule("/desired", FieldRule::Strategy(RemoteWins))
        .expect([conflict(
            "/desired/config/interval",
            [json!(2), json!(3), json!(1)],
            Settled::Held,
        )]),
        case(
            "a pointer covers only on a segment boundary",
            json!({"desired": {"configx": 1}}),
            json!({"desired": {"configx": 2}}),
            json!({"desired": {"configx": 3}}),
        )
        .strategy(LocalWins)
        .rule("/desired/config", FieldRule::Strategy(Manual))
        .rule("/desired", FieldRule::Strategy(RemoteWins))
        .expect(remote_wins(
            "/desired/configx",
            [json!(2), json!(3), json!(1)],
        )),
        row(
            "no field rule covers it: the global strategy",
            "a",
            "l",
            "r",
        )
        .strategy(LocalWins)
        .rule("/desired", FieldRule::Strategy(RemoteWins))
        .expect(local_wins(N, lra())),
        // Held fields.
        row("held: no take", "a", "a", "r").held(&[N]),
        row("held: no push", "a", "l", "a").held(&[N]),
        row("held: no second conflict", "a", "l", "r")
            .strategy(LocalWins)
            .held(&[N]),
        row("held: no agree", "a", "c", "c").held(&[N]),
        case(
            "held: other fields go on",
            json!({"name": "a", "enabled": true}),
            json!({"name": "l", "enabled": true}),
            json!({"name": "r", "enabled": false}),
        )
        .held(&[N])
        .expect([take("/enabled", json!(false))]),
        // Several fields at once: sorted by pointer.
        case(
            "several fields: one action each, in pointer order",
            json!({"name": "a", "enabled": true, "desired": {"led": "off", "cf": {"i": 1}}}),
            json!({"name": "l", "enabled": true, "desired": {"led": "on", "cf": {"i": 1}}}),
            json!({"name": "a", "desired": {"led": "on", "cf": {"i": 2}}, "tags": ["x"]}),
        )
        .expect([
            take("/desired/cf/i", json!(2)),
            agree("/desired/led", json!("on")),
            take("/enabled", json!(null)),
            push(N, json!("l")),
            take("/tags", json!(["x"])),
        ]),
    ];
    for (direction, way) in [
        (Direction::BOTH, "both ways"),
        (Direction::PULL_ONLY, "pull only"),
        (Direction::PUSH_ONLY, "push only"),
        (Direction::NONE, "no direction"),
    ] {
        cases.extend(changed_cases(direction, way));
    }
    cases
}

#[test]
fn plan_follows_the_rule_in_every_case() {
    let mut failures = Vec::new();
    let cases = cases();
    for case in &cases {
        let base = flatten(&case.base);
        let local = flatten(&case.local);
        let remote = flatten(&case.remote);
        let held: BTreeSet<String> = case.held.iter().map(|f| (*f).to_owned()).collect();
        let input = PlanInput {
            base: &base,
            local: Side {
                fields: &local,
                changed_at: case.local_at.map(UnixMillis),
            },
            remote: Side {
                fields: &remote,
                changed_at: case.remote_at.map(UnixMillis),
            },
            direction: case.direction,
            held: &held,
        };
        let got = plan(&input, &case.policy);
        if got != case.expect {
            failures.push(format!(
                "{}:\n  expected {:?}\n  got      {:?}",
                case.name, case.expect, got
            ));
        }
    }
    let names: BTreeSet<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), cases.len(), "case names must be unique");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn strategies_and_rules_parse_from_what_they_print() {
    for strategy in Strategy::ALL {
        assert_eq!(Strategy::parse(strategy.as_str()), Ok(strategy));
        let rule = FieldRule::Strategy(strategy);
        assert_eq!(FieldRule::parse(rule.as_str()), Ok(rule));
    }
    assert_eq!(FieldRule::parse("merge"), Ok(FieldRule::MergeSet));
    assert_eq!(FieldRule::MergeSet.to_string(), "merge");
}

#[test]
fn an_unknown_strategy_is_refused_with_the_allowed_ones() {
    let err = Strategy::parse("merge").unwrap_err();
    assert!(err.contains("\"merge\""), "{err}");
    assert!(
        err.contains("local_wins, remote_wins, newest_wins, manual"),
        "{err}"
    );
    let err = FieldRule::parse("LocalWins").unwrap_err();
    assert!(err.contains("manual, merge"), "{err}");
}

#[test]
fn rule_for_takes_the_longest_pointer_on_a_segment_boundary() {
    let policy = Policy {
        strategy: Strategy::NewestWins,
        fields: vec![
            ("/desired".into(), FieldRule::Strategy(Strategy::RemoteWins)),
            (
                "/desired/config".into(),
                FieldRule::Strategy(Strategy::Manual),
            ),
            ("/tags".into(), FieldRule::MergeSet),
        ],
    };
    let rule = |f| policy.rule_for(f);
    assert_eq!(
        rule("/desired/config/interval"),
        FieldRule::Strategy(Strategy::Manual)
    );
    assert_eq!(
        rule("/desired/config"),
        FieldRule::Strategy(Strategy::Manual)
    );
    assert_eq!(
        rule("/desired/configx"),
        FieldRule::Strategy(Strategy::RemoteWins)
    );
    assert_eq!(
        rule("/desired/led"),
        FieldRule::Strategy(Strategy::RemoteWins)
    );
    assert_eq!(rule("/tags"), FieldRule::MergeSet);
    assert_eq!(rule("/tagsx"), FieldRule::Strategy(Strategy::NewestWins));
    assert_eq!(rule("/name"), FieldRule::Strategy(Strategy::NewestWins));
}
