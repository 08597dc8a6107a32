//! The PostgREST query language the NetNeural fake understands, pure: parsing the query string
//! and `Prefer`, evaluating filters on a row with SQL's NULL semantics, ordering, and typed
//! coercion of values into columns (uuid, timestamptz, integer, boolean, text, text[], jsonb).
//!
//! Errors are PostgREST's: `{code, message, details, hint}` with its HTTP status.

use std::cmp::Ordering;

use serde_json::{Map, Value, json};

mod eval;

pub(super) use eval::*;

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
