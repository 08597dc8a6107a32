//! Evaluating PostgREST filters over rows: literals read by column type, coercion of JSON
//! values to a column's type, comparison, `like`, JSON containment.

use std::cmp::Ordering;

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::*;

/// Filters prepared by [`Query::matcher`].
#[derive(Clone, Debug)]
pub(crate) struct Matcher(pub(crate) Vec<Pred>);

impl Matcher {
    /// Whether `row` passes every filter (SQL: NULL is not true).
    pub fn matches(&self, row: &Map<String, Value>) -> bool {
        self.0.iter().all(|p| eval(p, row) == Some(true))
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Pred {
    Cond {
        col: String,
        negate: bool,
        test: Test,
    },
    Or(Vec<Pred>),
    And(Vec<Pred>),
}

#[derive(Clone, Debug)]
pub(crate) enum Test {
    Is(Option<bool>),
    In(Kind, Vec<Value>),
    ContainsArray(Vec<String>),
    ContainsJson(Value),
    Like {
        case: bool,
        pattern: String,
    },
    /// The stored value compared with the literal must give one of these orderings.
    Compare(Kind, Value, &'static [Ordering]),
}

pub(crate) fn prepare(f: &Filter, kind: &dyn Fn(&str) -> Kind) -> Result<Pred, PgError> {
    Ok(match f {
        Filter::Or(fs) => Pred::Or(
            fs.iter()
                .map(|f| prepare(f, kind))
                .collect::<Result<_, _>>()?,
        ),
        Filter::And(fs) => Pred::And(
            fs.iter()
                .map(|f| prepare(f, kind))
                .collect::<Result<_, _>>()?,
        ),
        Filter::Cond {
            col,
            negate,
            op,
            value,
        } => {
            use Ordering::{Equal, Greater, Less};
            let k = kind(col);
            let cmp = |want: &'static [Ordering]| -> Result<Test, PgError> {
                Ok(Test::Compare(k, literal_value(k, value)?, want))
            };
            let test = match op {
                Op::Is(want) => Test::Is(*want),
                Op::In(items) => Test::In(
                    k,
                    items
                        .iter()
                        .map(|i| literal_value(k, i))
                        .collect::<Result<_, _>>()?,
                ),
                Op::Cs => match k {
                    Kind::TextArray => Test::ContainsArray(array_literal(value)?),
                    Kind::Json => {
                        Test::ContainsJson(serde_json::from_str(value).map_err(|_| {
                            PgError::new(400, "22P02", "invalid input syntax for type json")
                        })?)
                    }
                    _ => return Err(PgError::new(400, "42883", "operator does not exist: @>")),
                },
                Op::Like { case } => Test::Like {
                    case: *case,
                    pattern: value.clone(),
                },
                Op::Eq => cmp(&[Equal])?,
                Op::Neq => cmp(&[Less, Greater])?,
                Op::Gt => cmp(&[Greater])?,
                Op::Gte => cmp(&[Equal, Greater])?,
                Op::Lt => cmp(&[Less])?,
                Op::Lte => cmp(&[Less, Equal])?,
            };
            Pred::Cond {
                col: col.clone(),
                negate: *negate,
                test,
            }
        }
    })
}

pub(crate) fn eval(p: &Pred, row: &Map<String, Value>) -> Option<bool> {
    match p {
        Pred::Or(ps) => {
            let mut any_null = false;
            for p in ps {
                match eval(p, row) {
                    Some(true) => return Some(true),
                    None => any_null = true,
                    Some(false) => {}
                }
            }
            if any_null { None } else { Some(false) }
        }
        Pred::And(ps) => {
            let mut any_null = false;
            for p in ps {
                match eval(p, row) {
                    Some(false) => return Some(false),
                    None => any_null = true,
                    Some(true) => {}
                }
            }
            if any_null { None } else { Some(true) }
        }
        Pred::Cond { col, negate, test } => {
            let v = row.get(col).unwrap_or(&Value::Null);
            let r = match test {
                Test::Is(want) => Some(match want {
                    None => v.is_null(),
                    Some(b) => v.as_bool() == Some(*b),
                }),
                _ if v.is_null() => None,
                Test::In(k, items) => Some(
                    items
                        .iter()
                        .any(|item| compare_values(*k, v, item) == Ordering::Equal),
                ),
                Test::ContainsArray(want) => {
                    let have = v.as_array();
                    Some(want.iter().all(|w| {
                        have.is_some_and(|h| h.iter().any(|x| x.as_str() == Some(w.as_str())))
                    }))
                }
                Test::ContainsJson(want) => Some(json_contains(v, want)),
                Test::Like { case, pattern } => {
                    let s = v
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string());
                    Some(like(&s, pattern, *case))
                }
                Test::Compare(k, lit, want) => Some(want.contains(&compare_values(*k, v, lit))),
            };
            if *negate { r.map(|b| !b) } else { r }
        }
    }
}

/// `*` (PostgREST's URL-safe `%`) matches any run of characters.
pub(crate) fn like(s: &str, pattern: &str, case: bool) -> bool {
    let (s, p) = if case {
        (s.to_owned(), pattern.to_owned())
    } else {
        (s.to_lowercase(), pattern.to_lowercase())
    };
    let parts: Vec<&str> = p.split(['*', '%']).collect();
    if parts.len() == 1 {
        return s == p;
    }
    let mut rest = s.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// `{a,b,"c d"}` as Postgres reads an array literal.
pub(crate) fn array_literal(s: &str) -> Result<Vec<String>, PgError> {
    let inner = s
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .ok_or_else(|| PgError::new(400, "22P02", format!("malformed array literal: \"{s}\"")))?;
    Ok(split_top(inner)
        .iter()
        .map(|v| unquote(v))
        .filter(|v| !v.is_empty())
        .collect())
}

pub(crate) fn json_contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| json_contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            w.iter().all(|wv| h.iter().any(|hv| json_contains(hv, wv)))
        }
        (h, w) => h == w,
    }
}

/// Parses a timestamptz as Postgres reads one (ISO 8601 with `T` or a space, offset required
/// here; `+00` is accepted for `+00:00`).
pub(crate) fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    let mut t = s.trim().replacen(' ', "T", 1);
    if t.ends_with("+00") || t.ends_with("-00") {
        t.push_str(":00");
    }
    OffsetDateTime::parse(&t, &Rfc3339).ok()
}

/// Postgres's JSON form of a timestamptz in UTC: microseconds, trailing zeros trimmed,
/// `+00:00`.
pub(crate) fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let micros = t.microsecond();
    let mut frac = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    while frac.ends_with('0') {
        frac.pop();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

pub(crate) fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

pub(crate) fn invalid(k: Kind, s: &str) -> PgError {
    let ty = match k {
        Kind::Uuid => "uuid",
        Kind::Timestamp => "timestamp with time zone",
        Kind::Int => "integer",
        Kind::Bool => "boolean",
        Kind::Json => "json",
        Kind::Text | Kind::TextArray => "text",
    };
    let code = if k == Kind::Timestamp {
        "22007"
    } else {
        "22P02"
    };
    PgError::new(
        400,
        code,
        format!("invalid input syntax for type {ty}: \"{s}\""),
    )
}

/// A literal from the URL read as the column's type (an unreadable literal is Postgres's input
/// syntax error), to compare stored values with.
pub(crate) fn literal_value(k: Kind, lit: &str) -> Result<Value, PgError> {
    Ok(match k {
        Kind::Uuid if !is_uuid(lit) => return Err(invalid(k, lit)),
        Kind::Uuid => Value::String(lit.to_ascii_lowercase()),
        Kind::Timestamp => Value::String(format_timestamp(
            parse_timestamp(lit).ok_or_else(|| invalid(k, lit))?,
        )),
        Kind::Int => Value::from(lit.parse::<i64>().map_err(|_| invalid(k, lit))?),
        Kind::Bool => Value::Bool(match lit {
            "true" | "t" => true,
            "false" | "f" => false,
            _ => return Err(invalid(k, lit)),
        }),
        Kind::Json => serde_json::from_str(lit).map_err(|_| invalid(k, lit))?,
        Kind::TextArray => Value::from(array_literal(lit)?),
        Kind::Text => Value::String(lit.to_owned()),
    })
}

/// Orders two stored (already coerced) values of one column.
pub(crate) fn compare_values(k: Kind, a: &Value, b: &Value) -> Ordering {
    match k {
        Kind::Timestamp => {
            let t = |v: &Value| v.as_str().and_then(parse_timestamp);
            t(a).cmp(&t(b))
        }
        Kind::Int => a.as_i64().cmp(&b.as_i64()),
        Kind::Bool => a.as_bool().cmp(&b.as_bool()),
        Kind::Uuid | Kind::Text => a.as_str().cmp(&b.as_str()),
        Kind::Json | Kind::TextArray => {
            if a == b {
                Ordering::Equal
            } else {
                a.to_string().cmp(&b.to_string())
            }
        }
    }
}

/// A JSON request value as the column stores it, or Postgres's input error.
pub(crate) fn coerce(k: Kind, v: &Value) -> Result<Value, PgError> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let text = || {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    Ok(match k {
        Kind::Json => v.clone(),
        Kind::Text => Value::String(text()),
        Kind::Uuid => match v.as_str() {
            Some(s) if is_uuid(s) => Value::String(s.to_ascii_lowercase()),
            _ => return Err(invalid(k, &text())),
        },
        Kind::Timestamp => match v.as_str().and_then(parse_timestamp) {
            Some(t) => Value::String(format_timestamp(t)),
            None => return Err(invalid(k, &text())),
        },
        Kind::Int => match v {
            Value::Number(n) if n.is_i64() => v.clone(),
            Value::String(s) => Value::from(s.parse::<i64>().map_err(|_| invalid(k, s))?),
            _ => return Err(invalid(k, &text())),
        },
        Kind::Bool => match v {
            Value::Bool(_) => v.clone(),
            _ => return Err(invalid(k, &text())),
        },
        Kind::TextArray => match v {
            Value::Array(items) if items.iter().all(Value::is_string) => v.clone(),
            Value::String(s) => Value::from(array_literal(s)?),
            _ => {
                return Err(PgError::new(
                    400,
                    "22P02",
                    format!("malformed array literal: \"{}\"", text()),
                ));
            }
        },
    })
}
