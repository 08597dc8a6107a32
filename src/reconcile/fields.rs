//! A syncable document as fields: its leaves, named by JSON Pointer (RFC 6901).
//!
//! Objects recurse; arrays and scalars are leaves; `null` and empty objects contribute
//! nothing, so a field that is null and one that is absent are the same field: absent.
//! `/tags` holds a set and is normalised to a sorted array without duplicates, an empty set
//! being absent, so that two documents that hold the same tags in another order agree.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A document's leaves: JSON Pointer → value, never `Value::Null`.
///
/// A `BTreeMap` so that iterating it (and so every plan built from it) is in pointer order.
pub type Fields = BTreeMap<String, Value>;

/// The field that holds the device's tags, normalised as a set.
pub const TAGS: &str = "/tags";

/// Escapes one object key as a JSON Pointer segment: `~` → `~0`, then `/` → `~1`.
pub fn pointer_escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The inverse of [`pointer_escape`]; `~1` goes first so that `~01` decodes to `~1`.
fn pointer_unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// The fields of a document. A document that is not an object has none.
pub fn flatten(doc: &Value) -> Fields {
    let mut fields = Fields::new();
    if let Value::Object(map) = doc {
        flatten_into(&mut fields, "", map);
    }
    if let Some(tags) = fields.remove(TAGS)
        && let Some(tags) = normalise_tags(tags)
    {
        fields.insert(TAGS.to_owned(), tags);
    }
    fields
}

fn flatten_into(fields: &mut Fields, prefix: &str, map: &Map<String, Value>) {
    for (key, value) in map {
        let pointer = format!("{prefix}/{}", pointer_escape(key));
        match value {
            Value::Null => {}
            Value::Object(inner) => flatten_into(fields, &pointer, inner),
            leaf => {
                fields.insert(pointer, leaf.clone());
            }
        }
    }
}

/// `/tags` as a set: an array is sorted and de-duplicated, and absent when empty. Anything
/// else is kept as it is (a leaf like any other), so that nothing a cloud holds is dropped.
fn normalise_tags(tags: Value) -> Option<Value> {
    match tags {
        Value::Array(items) => {
            let set = normalise_set(items);
            (!set.is_empty()).then_some(Value::Array(set))
        }
        other => Some(other),
    }
}

/// A set's canonical order: strings by their text first, then any other value by its JSON
/// text; equal elements collapse into one.
pub(super) fn normalise_set(mut items: Vec<Value>) -> Vec<Value> {
    items.sort_by(set_order);
    items.dedup();
    items
}

fn set_order(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.cmp(b),
        (Value::String(_), _) => Ordering::Less,
        (_, Value::String(_)) => Ordering::Greater,
        (a, b) => a.to_string().cmp(&b.to_string()),
    }
}

/// The document whose fields these are (always an object).
///
/// `flatten(&unflatten(f)) == f` for fields that [`flatten`] could have produced. Fields that
/// no document can hold at once are resolved in pointer order, the shallower winning: when
/// `/a` holds a scalar, `/a/b` is dropped (a three-way merge can produce this when one side
/// turns a value into an object and the other edits the value). A key that is not a pointer
/// (not starting with `/`) is ignored.
pub fn unflatten(fields: &Fields) -> Value {
    let mut root = Map::new();
    for (pointer, value) in fields {
        insert(&mut root, pointer, value);
    }
    Value::Object(root)
}

fn insert(root: &mut Map<String, Value>, pointer: &str, value: &Value) {
    let Some(rest) = pointer.strip_prefix('/') else {
        return;
    };
    let segments: Vec<String> = rest.split('/').map(pointer_unescape).collect();
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut map = root;
    for segment in parents {
        let slot = map
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        match slot {
            Value::Object(inner) => map = inner,
            // The pointer runs through a leaf: the leaf, inserted first, stays.
            _ => return,
        }
    }
    map.entry(last.clone()).or_insert_with(|| value.clone());
}

/// The part of the document under `prefix`, as a value: `subtree(f, "/desired")` is the
/// desired object, `{}` when there is none. A leaf at `prefix` itself is returned as it is.
pub fn subtree(fields: &Fields, prefix: &str) -> Value {
    if let Some(leaf) = fields.get(prefix) {
        return leaf.clone();
    }
    let inner: Fields = fields
        .iter()
        .filter_map(|(pointer, value)| {
            let rest = pointer.strip_prefix(prefix)?;
            rest.starts_with('/')
                .then(|| (rest.to_owned(), value.clone()))
        })
        .collect();
    unflatten(&inner)
}
