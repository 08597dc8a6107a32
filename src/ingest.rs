//! From raw message to [`crate::model::Inbound`]: the checks every transport shares.
//!
//! Pure. MQTT and CoAP each find the device and the kind of message in their own address
//! (topic or path), then call [`decode_reading`]; whatever it refuses becomes a
//! [`crate::model::Rejection`] with the cause and reason it returns ([`Refused`]).

use serde_json::{Map, Value};

use crate::codec::{self, FormatChoice};
use crate::model::{Format, Point, Reading, RejectCause, UnixMillis};

/// Most telemetry points accepted in one message. Bounds the work one message can cause in a
/// single transaction.
pub const MAX_POINTS_PER_MESSAGE: usize = 1000;

/// Which kind of message an address names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    State,
    Telemetry,
}

/// A payload [`decode_reading`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// [`RejectCause::Decode`] (not JSON or CBOR) or [`RejectCause::Invalid`] (not the shape
    /// its kind needs).
    pub cause: RejectCause,
    /// A sentence saying what is wrong with the payload, fit for the rejected table and a log
    /// line.
    pub reason: String,
}

/// Decodes and checks a payload of the given kind.
///
/// # Errors
/// [`Refused`]: why the payload cannot be used.
pub fn decode_reading(
    kind: Kind,
    payload: &[u8],
    choice: FormatChoice,
) -> Result<(Format, Reading), Refused> {
    let (format, value) = codec::decode(payload, choice).map_err(|e| Refused {
        cause: RejectCause::Decode,
        reason: e.to_string(),
    })?;
    let invalid = |reason| Refused {
        cause: RejectCause::Invalid,
        reason,
    };
    let reading = match kind {
        Kind::State => match value {
            Value::Object(patch) => Reading::State(patch),
            other => {
                return Err(invalid(format!(
                    "state must be an object (a JSON Merge Patch), got {}",
                    type_name(&other)
                )));
            }
        },
        Kind::Telemetry => Reading::Telemetry(points(value).map_err(invalid)?),
    };
    Ok((format, reading))
}

fn points(value: Value) -> Result<Vec<Point>, String> {
    let items = match value {
        Value::Array(items) => items,
        single @ Value::Object(_) => vec![single],
        other => {
            return Err(format!(
                "telemetry must be an object or an array of objects, got {}",
                type_name(&other)
            ));
        }
    };
    if items.is_empty() {
        return Err("telemetry array is empty".into());
    }
    if items.len() > MAX_POINTS_PER_MESSAGE {
        return Err(format!(
            "telemetry array has {} points, the limit is {MAX_POINTS_PER_MESSAGE}",
            items.len()
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(data) => point(data).map_err(|e| format!("point {i}: {e}")),
            other => Err(format!("point {i} is {}, not an object", type_name(&other))),
        })
        .collect()
}

fn point(mut data: Map<String, Value>) -> Result<Point, String> {
    let device_ts = match data.remove("ts") {
        None | Some(Value::Null) => None,
        Some(ts) => Some(parse_ts(&ts)?),
    };
    Ok(Point { device_ts, data })
}

/// A device timestamp: unix milliseconds (integer) or an RFC 3339 string.
pub fn parse_ts(ts: &Value) -> Result<UnixMillis, String> {
    match ts {
        Value::Number(n) => n
            .as_i64()
            .filter(|ms| *ms >= 0)
            .map(UnixMillis)
            .ok_or_else(|| format!("ts {n} is not a non-negative integer of unix milliseconds")),
        Value::String(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("ts {s:?} is not RFC 3339: {e}"))?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
                .map(UnixMillis)
                .map_err(|_| format!("ts {s:?} is out of range"))
        }
        other => Err(format!(
            "ts must be unix milliseconds or an RFC 3339 string, got {}",
            type_name(other)
        )),
    }
}

/// Applies a JSON Merge Patch (RFC 7386) to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => merge_object_patch(target, patch),
        other => *target = other.clone(),
    }
}

/// [`merge_patch`] with a patch that is an object (every state message), taken as the map
/// itself so the caller need not copy it into a [`Value`] first.
pub fn merge_object_patch(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386_examples() {
        // Rows from RFC 7386 appendix A: (original, patch, result).
        let rows = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut doc, patch, want) in rows {
            merge_patch(&mut doc, &patch);
            assert_eq!(doc, want, "patch {patch}");
        }
    }

    #[test]
    fn telemetry_takes_one_point_or_many_with_optional_timestamps() {
        let (_, r) = decode_reading(Kind::Telemetry, br#"{"t":1}"#, FormatChoice::Auto).unwrap();
        assert_eq!(
            r,
            Reading::Telemetry(vec![Point {
                device_ts: None,
                data: json!({"t":1}).as_object().unwrap().clone()
            }])
        );
        let (_, r) = decode_reading(
            Kind::Telemetry,
            br#"[{"t":1,"ts":1700000000000},{"t":2,"ts":"2023-11-14T22:13:20.5+01:00"}]"#,
            FormatChoice::Auto,
        )
        .unwrap();
        let Reading::Telemetry(points) = r else {
            panic!("not telemetry")
        };
        assert_eq!(points[0].device_ts, Some(UnixMillis(1_700_000_000_000)));
        assert_eq!(points[1].device_ts, Some(UnixMillis(1_699_996_400_500)));
        assert!(!points[1].data.contains_key("ts"));
    }

    #[test]
    fn bad_payloads_get_reasons_that_name_the_problem() {
        let cases: [(Kind, &[u8], &str); 6] = [
            (Kind::State, b"[1]", "state must be an object"),
            (Kind::Telemetry, b"[]", "telemetry array is empty"),
            (Kind::Telemetry, b"[1]", "point 0 is a number"),
            (
                Kind::Telemetry,
                br#"{"ts":"yesterday"}"#,
                "point 0: ts \"yesterday\" is not RFC 3339",
            ),
            (
                Kind::Telemetry,
                br#"{"ts":-5}"#,
                "not a non-negative integer",
            ),
            (
                Kind::State,
                b"not json",
                "neither a JSON object/array nor a CBOR map/array",
            ),
        ];
        for (kind, payload, want) in cases {
            let err = decode_reading(kind, payload, FormatChoice::Auto).unwrap_err();
            assert!(err.reason.contains(want), "{err:?} should contain {want:?}");
            let cause = if want.starts_with("neither") {
                RejectCause::Decode
            } else {
                RejectCause::Invalid
            };
            assert_eq!(err.cause, cause, "{err:?}");
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-100i64..100).prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop::collection::btree_map("[a-d]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    proptest! {
        /// Applying the same patch twice gives what applying it once gives: a redelivered state
        /// message cannot change the document a second time.
        #[test]
        fn merge_patch_is_idempotent(mut doc in json_value(), patch in json_value()) {
            merge_patch(&mut doc, &patch);
            let once = doc.clone();
            merge_patch(&mut doc, &patch);
            prop_assert_eq!(doc, once);
        }
    }
}
