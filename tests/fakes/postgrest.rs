//! The PostgREST query language the NetNeural fake understands, pure: parsing the query string
//! and `Prefer`, evaluating filters on a row with SQL's NULL semantics, ordering, and typed
//! coercion of values into columns (uuid, timestamptz, integer, boolean, text, text[], jsonb).
//!
//! Errors are PostgREST's: `{code, message, details, hint}` with its HTTP status.

use std::cmp::Ordering;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A column's Postgres type, as far as comparisons and input checks differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Uuid,
    Text,
    Timestamp,
    Int,
    Bool,
    Json,
    TextArray,
}

/// A PostgREST error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PgError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub details: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> PgError {
        PgError {
            status,
            code: code.to_owned(),
            message: message.into(),
            details: None,
            hint: None,
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> PgError {
        self.details = Some(details.into());
        self
    }

    pub fn body(&self) -> Value {
        json!({"code": self.code, "message": self.message, "details": self.details, "hint": self.hint})
    }

    fn parse(message: impl Into<String>) -> PgError {
        PgError::new(400, "PGRST100", message)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    In(Vec<String>),
    /// `is.null`, `is.true`, `is.false`.
    Is(Option<bool>),
    Cs,
    Like {
        case: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Filter {
    Cond {
        col: String,
        negate: bool,
        op: Op,
        value: String,
    },
    Or(Vec<Filter>),
    And(Vec<Filter>),
}

/// A parsed query string.
#[derive(Clone, Debug, Default)]
pub(super) struct Query {
    pub filters: Vec<Filter>,
    /// `None` is `*`; otherwise `(output name, column)`.
    pub select: Option<Vec<(String, String)>>,
    /// `(column, descending, nulls first)`.
    pub order: Vec<(String, bool, bool)>,
    pub limit: Option<usize>,
    pub offset: usize,
    pub on_conflict: Option<Vec<String>>,
    pub columns: Option<Vec<String>>,
}

/// The `Prefer` options a client uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Prefer {
    pub representation: bool,
    pub merge_duplicates: bool,
    pub ignore_duplicates: bool,
    pub missing_default: bool,
    pub count_exact: bool,
}

impl Prefer {
    pub fn parse<'a>(headers: impl Iterator<Item = &'a str>) -> Prefer {
        let mut p = Prefer::default();
        for item in headers.flat_map(|h| h.split(',')).map(str::trim) {
            match item {
                "return=representation" => p.representation = true,
                "return=minimal" | "return=headers-only" => p.representation = false,
                "resolution=merge-duplicates" => p.merge_duplicates = true,
                "resolution=ignore-duplicates" => p.ignore_duplicates = true,
                "missing=default" => p.missing_default = true,
                "count=exact" => p.count_exact = true,
                _ => {} // handling=lenient: unknown preferences are ignored
            }
        }
        p
    }

    /// A textual `Preference-Applied` value for what was honoured.
    pub fn applied(&self) -> String {
        let mut v = Vec::new();
        if self.merge_duplicates {
            v.push("resolution=merge-duplicates");
        } else if self.ignore_duplicates {
            v.push("resolution=ignore-duplicates");
        }
        if self.representation {
            v.push("return=representation");
        }
        v.join(", ")
    }
}

/// Splits at commas outside parentheses, braces and double quotes.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quoted) = (Vec::new(), String::new(), 0i32, false);
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '(' | '{' if !quoted => depth += 1,
            ')' | '}' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() || !out.is_empty() {
        out.push(cur);
    }
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
        .to_owned()
}

/// `op.value` (after `col=`), with `not.` allowed in front.
fn parse_cond(col: &str, expr: &str) -> Result<Filter, PgError> {
    let (negate, expr) = match expr.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, expr),
    };
    let (op, value) = expr
        .split_once('.')
        .ok_or_else(|| PgError::parse(format!("\"failed to parse filter ({expr})\"")))?;
    let op = match op {
        "eq" => Op::Eq,
        "neq" => Op::Neq,
        "gt" => Op::Gt,
        "gte" => Op::Gte,
        "lt" => Op::Lt,
        "lte" => Op::Lte,
        "cs" => Op::Cs,
        "like" => Op::Like { case: true },
        "ilike" => Op::Like { case: false },
        "in" => {
            let inner = value
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| {
                    PgError::parse(format!("\"failed to parse filter (in.{value})\""))
                })?;
            Op::In(split_top(inner).iter().map(|v| unquote(v)).collect())
        }
        "is" => Op::Is(match value {
            "null" => None,
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                return Err(PgError::parse(format!(
                    "\"failed to parse filter (is.{value})\""
                )));
            }
        }),
        _ => {
            return Err(PgError::parse(format!(
                "\"failed to parse filter ({op}.{value})\""
            )));
        }
    };
    Ok(Filter::Cond {
        col: col.to_owned(),
        negate,
        op,
        value: value.to_owned(),
    })
}

/// `(a.eq.1,b.eq.2,and(c.gt.3,d.lt.4))` of `or=` / `and=`.
fn parse_logic(expr: &str) -> Result<Vec<Filter>, PgError> {
    let inner = expr
        .strip_prefix('(')
        .and_then(|e| e.strip_suffix(')'))
        .ok_or_else(|| PgError::parse(format!("\"failed to parse logic tree ({expr})\"")))?;
    split_top(inner)
        .iter()
        .map(|part| {
            let part = part.trim();
            if let Some(rest) = part.strip_prefix("or(") {
                return Ok(Filter::Or(parse_logic(&format!("({rest}"))?));
            }
            if let Some(rest) = part.strip_prefix("and(") {
                return Ok(Filter::And(parse_logic(&format!("({rest}"))?));
            }
            let (col, cond) = part.split_once('.').ok_or_else(|| {
                PgError::parse(format!("\"failed to parse logic tree ({expr})\""))
            })?;
            // In a logic tree a value holding reserved characters is double-quoted; the
            // quotes are not part of it.
            Ok(match parse_cond(col, cond)? {
                Filter::Cond {
                    col,
                    negate,
                    op,
                    value,
                } if !matches!(op, Op::In(_)) => Filter::Cond {
                    col,
                    negate,
                    op,
                    value: unquote(&value),
                },
                other => other,
            })
        })
        .collect()
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Query {
    pub fn parse(pairs: &[(String, String)]) -> Result<Query, PgError> {
        let mut q = Query::default();
        for (k, v) in pairs {
            match k.as_str() {
                "select" => {
                    let cols = list(v);
                    if !cols.iter().any(|c| c == "*") {
                        q.select = Some(
                            cols.iter()
                                .map(|c| match c.split_once(':') {
                                    Some((alias, col)) => (alias.to_owned(), col.to_owned()),
                                    None => (c.clone(), c.clone()),
                                })
                                .collect(),
                        );
                    }
                }
                "order" => {
                    for item in list(v) {
                        let mut parts = item.split('.');
                        let col = parts.next().unwrap_or_default().to_owned();
                        let (mut desc, mut nulls_first) = (false, None);
                        for p in parts {
                            match p {
                                "asc" => desc = false,
                                "desc" => desc = true,
                                "nullsfirst" => nulls_first = Some(true),
                                "nullslast" => nulls_first = Some(false),
                                _ => {
                                    return Err(PgError::parse(format!(
                                        "\"failed to parse order ({item})\""
                                    )));
                                }
                            }
                        }
                        // Postgres: NULLS LAST ascending, NULLS FIRST descending.
                        q.order.push((col, desc, nulls_first.unwrap_or(desc)));
                    }
                }
                "limit" => {
                    q.limit =
                        Some(v.parse().map_err(|_| {
                            PgError::parse(format!("\"failed to parse limit ({v})\""))
                        })?)
                }
                "offset" => {
                    q.offset = v
                        .parse()
                        .map_err(|_| PgError::parse(format!("\"failed to parse offset ({v})\"")))?
                }
                "on_conflict" => q.on_conflict = Some(list(v)),
                "columns" => q.columns = Some(list(v)),
                "or" => q.filters.push(Filter::Or(parse_logic(v)?)),
                "and" => q.filters.push(Filter::And(parse_logic(v)?)),
                col => q.filters.push(parse_cond(col, v)?),
            }
        }
        Ok(q)
    }

    /// Every column a filter or the order names, to check they exist.
    pub fn columns_named(&self) -> Vec<&str> {
        fn walk<'a>(f: &'a Filter, out: &mut Vec<&'a str>) {
            match f {
                Filter::Cond { col, .. } => out.push(col),
                Filter::Or(fs) | Filter::And(fs) => fs.iter().for_each(|f| walk(f, out)),
            }
        }
        let mut out = Vec::new();
        self.filters.iter().for_each(|f| walk(f, &mut out));
        out.extend(self.order.iter().map(|(c, _, _)| c.as_str()));
        out
    }

    /// The filters with their literals read once as their columns' types, ready to test
    /// rows (reading them per row made a lookup in a large table needlessly slow). A literal
    /// the column's type cannot read is Postgres's input error, as it is there.
    pub fn matcher(&self, kind: &dyn Fn(&str) -> Kind) -> Result<Matcher, PgError> {
        Ok(Matcher(
            self.filters
                .iter()
                .map(|f| prepare(f, kind))
                .collect::<Result<_, _>>()?,
        ))
    }

    pub fn sort(&self, rows: &mut [Map<String, Value>], kind: &dyn Fn(&str) -> Kind) {
        rows.sort_by(|a, b| {
            for (col, desc, nulls_first) in &self.order {
                let (x, y) = (
                    a.get(col).unwrap_or(&Value::Null),
                    b.get(col).unwrap_or(&Value::Null),
                );
                let o = match (x.is_null(), y.is_null()) {
                    (true, true) => Ordering::Equal,
                    (true, false) => {
                        if *nulls_first {
                            Ordering::Less
                        } else {
                            Ordering::Greater
                        }
                    }
                    (false, true) => {
                        if *nulls_first {
                            Ordering::Greater
                        } else {
                            Ordering::Less
                        }
                    }
                    (false, false) => {
                        let o = compare_values(kind(col), x, y);
                        if *desc { o.reverse() } else { o }
                    }
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
    }
}

/// Filters prepared by [`Query::matcher`].
#[derive(Clone, Debug)]
pub(super) struct Matcher(Vec<Pred>);

impl Matcher {
    /// Whether `row` passes every filter (SQL: NULL is not true).
    pub fn matches(&self, row: &Map<String, Value>) -> bool {
        self.0.iter().all(|p| eval(p, row) == Some(true))
    }
}

#[derive(Clone, Debug)]
enum Pred {
    Cond {
        col: String,
        negate: bool,
        test: Test,
    },
    Or(Vec<Pred>),
    And(Vec<Pred>),
}

#[derive(Clone, Debug)]
enum Test {
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

fn prepare(f: &Filter, kind: &dyn Fn(&str) -> Kind) -> Result<Pred, PgError> {
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

fn eval(p: &Pred, row: &Map<String, Value>) -> Option<bool> {
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
fn like(s: &str, pattern: &str, case: bool) -> bool {
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
pub(super) fn array_literal(s: &str) -> Result<Vec<String>, PgError> {
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

fn json_contains(have: &Value, want: &Value) -> bool {
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
pub(super) fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    let mut t = s.trim().replacen(' ', "T", 1);
    if t.ends_with("+00") || t.ends_with("-00") {
        t.push_str(":00");
    }
    OffsetDateTime::parse(&t, &Rfc3339).ok()
}

/// Postgres's JSON form of a timestamptz in UTC: microseconds, trailing zeros trimmed,
/// `+00:00`.
pub(super) fn format_timestamp(t: OffsetDateTime) -> String {
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

pub(super) fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn invalid(k: Kind, s: &str) -> PgError {
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
fn literal_value(k: Kind, lit: &str) -> Result<Value, PgError> {
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
fn compare_values(k: Kind, a: &Value, b: &Value) -> Ordering {
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
pub(super) fn coerce(k: Kind, v: &Value) -> Result<Value, PgError> {
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
