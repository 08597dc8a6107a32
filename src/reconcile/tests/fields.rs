//! Documents as fields: pointers and their escaping, what flatten drops and normalises,
//! and the round trip through unflatten.

use proptest::prelude::{Just, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
use proptest::strategy::Strategy as _;
use serde_json::{Value, json};

use crate::reconcile::{Fields, TAGS, flatten, pointer_escape, subtree, unflatten};

#[test]
fn flatten_names_leaves_by_escaped_pointer() {
    let doc = json!({
        "name": "n",
        "enabled": false,
        "desired": {"led": "on", "config": {"interval": 5}, "a/b": 1, "m~n": 2, "list": [3, 1]},
    });
    let fields = flatten(&doc);
    let expected: Fields = [
        ("/desired/a~1b", json!(1)),
        ("/desired/config/interval", json!(5)),
        ("/desired/led", json!("on")),
        ("/desired/list", json!([3, 1])),
        ("/desired/m~0n", json!(2)),
        ("/enabled", json!(false)),
        ("/name", json!("n")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(fields, expected);
    assert_eq!(unflatten(&fields), doc);
    assert_eq!(pointer_escape("~/x~1"), "~0~1x~01");
}

#[test]
fn flatten_drops_nulls_and_empty_objects() {
    let doc = json!({"name": null, "desired": {"a": {}, "b": {"c": null}}, "enabled": true});
    assert_eq!(flatten(&doc), flatten(&json!({"enabled": true})));
    assert_eq!(flatten(&json!({"desired": {}})), Fields::new());
    assert_eq!(flatten(&json!("not an object")), Fields::new());
    assert_eq!(unflatten(&Fields::new()), json!({}));
}

#[test]
fn tags_are_a_sorted_set_and_empty_is_absent() {
    let fields = flatten(&json!({"tags": ["b", "a", "b", "c"]}));
    assert_eq!(fields.get(TAGS), Some(&json!(["a", "b", "c"])));
    assert_eq!(flatten(&json!({"tags": []})), Fields::new());
    // Only /tags is a set: other arrays keep their order and their duplicates.
    let other = flatten(&json!({"desired": {"tags": ["b", "a", "b"]}}));
    assert_eq!(other.get("/desired/tags"), Some(&json!(["b", "a", "b"])));
}

#[test]
fn subtree_gives_the_object_under_a_pointer() {
    let fields = flatten(&json!({"name": "n", "desired": {"led": "on", "config": {"i": 5}}}));
    assert_eq!(
        subtree(&fields, "/desired"),
        json!({"led": "on", "config": {"i": 5}})
    );
    assert_eq!(subtree(&fields, "/desired/config"), json!({"i": 5}));
    assert_eq!(subtree(&fields, "/desired/led"), json!("on"));
    assert_eq!(subtree(&fields, "/des"), json!({}));
    assert_eq!(subtree(&fields, "/missing"), json!({}));
}

#[test]
fn unflatten_keeps_the_shallower_of_two_clashing_fields() {
    let fields: Fields = [("/desired/a", json!(7)), ("/desired/a/b", json!(2))]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(unflatten(&fields), json!({"desired": {"a": 7}}));
}

/// Documents with keys that need escaping, nested objects, nulls and tags.
fn doc() -> impl proptest::strategy::Strategy<Value = Value> {
    let key = prop::sample::select(vec!["a", "b/c", "d~e", "~1", "", "tags"]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0i64..4).prop_map(Value::from),
        "[a-c]{0,2}".prop_map(Value::from),
        prop::collection::vec("[a-c]", 0..3).prop_map(|v| json!(v)),
    ];
    let tree = leaf.prop_recursive(3, 24, 4, move |inner| {
        prop::collection::btree_map(key.clone(), inner, 0..4)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    });
    let tags = prop::option::of(prop::collection::vec("[a-c]", 0..4));
    (tree, tags).prop_map(|(tree, tags)| {
        let mut doc = match tree {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        if let Some(tags) = tags {
            doc.insert("tags".into(), json!(tags));
        }
        Value::Object(doc)
    })
}

proptest! {
    #[test]
    fn flatten_and_unflatten_round_trip(doc in doc()) {
        let fields = flatten(&doc);
        prop_assert!(fields.values().all(|v| !v.is_null()));
        prop_assert_eq!(&flatten(&unflatten(&fields)), &fields);
    }
}
