//! The policy: strategies and rules by name, and which rule covers a field.

use crate::reconcile::{FieldRule, Policy, Strategy};

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
    use FieldRule::{MergeSet, Strategy as S};
    use Strategy::{Manual, NewestWins, RemoteWins};
    let policy = Policy {
        strategy: NewestWins,
        fields: vec![
            ("/desired".into(), S(RemoteWins)),
            ("/desired/config".into(), S(Manual)),
            ("/tags".into(), MergeSet),
        ],
    };
    for (field, expected) in [
        ("/desired/config/interval", S(Manual)),
        ("/desired/config", S(Manual)),
        ("/desired/configx", S(RemoteWins)),
        ("/desired/led", S(RemoteWins)),
        ("/desired", S(RemoteWins)),
        ("/tags", MergeSet),
        ("/tagsx", S(NewestWins)),
        ("/name", S(NewestWins)),
    ] {
        assert_eq!(policy.rule_for(field), expected, "{field}");
    }
    assert_eq!(
        Policy::new(Manual).rule_for("/tags"),
        S(Manual),
        "rules are opt-in"
    );
}
