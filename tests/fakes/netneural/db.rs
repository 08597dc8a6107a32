//! The fake NetNeural's tables in memory, with Postgres's constraints and PostgREST's
//! semantics for select, insert (upsert), update and delete.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::super::postgrest::{
    Filter, Kind, Op, PgError, Prefer, Query, array_literal, coerce, format_timestamp,
};
use super::super::uuid_v4;

use super::Row;
use super::schema::*;

#[derive(Debug)]
pub(super) struct Db {
    pub(super) tables: Vec<Table>,
    pub(super) rows: BTreeMap<&'static str, Vec<Row>>,
    /// The last server timestamp handed out: each is at least a microsecond later.
    pub(super) last_now: OffsetDateTime,
    /// Per (table, unique constraint index): the key of every stored row → its position. Built
    /// when an insert first needs it, kept up to date by inserts, dropped for a table whenever
    /// anything else changes it (so a bulk insert into a large table costs its own rows, not
    /// the table's).
    pub(super) index: HashMap<(&'static str, usize), HashMap<String, usize>>,
    /// Per (table, text[] column): each element → the rows holding it, kept like `index`, so
    /// that `hardware_ids=cs.{X}` reads the rows that hold X, not the whole table.
    pub(super) elements: HashMap<(&'static str, &'static str), HashMap<String, Vec<usize>>>,
}

/// How conflicts on the target constraint are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Resolution {
    Error,
    Merge,
    Ignore,
}

pub(super) fn unknown_table(name: &str) -> PgError {
    PgError::new(
        404,
        "PGRST205",
        format!("Could not find the table 'public.{name}' in the schema cache"),
    )
}

pub(super) fn unknown_column(table: &str, col: &str) -> PgError {
    PgError::new(
        400,
        "PGRST204",
        format!("Could not find the '{col}' column of '{table}' in the schema cache"),
    )
}

impl Db {
    pub(super) fn new() -> Db {
        let tables = schema();
        let rows = tables.iter().map(|t| (t.name, Vec::new())).collect();
        Db {
            tables,
            rows,
            last_now: OffsetDateTime::UNIX_EPOCH,
            index: HashMap::new(),
            elements: HashMap::new(),
        }
    }

    pub(super) fn table(&self, name: &str) -> Result<&Table, PgError> {
        self.tables
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| unknown_table(name))
    }

    /// A row's key on `cols`, or `None` when one is NULL (NULLs are never equal).
    pub(super) fn key(row: &Row, cols: &[&str]) -> Option<String> {
        let mut key = String::new();
        for c in cols {
            match row.get(*c) {
                None | Some(Value::Null) => return None,
                Some(v) => {
                    key.push_str(&v.to_string());
                    key.push('\u{1f}');
                }
            }
        }
        Some(key)
    }

    pub(super) fn now(&mut self) -> String {
        let now = OffsetDateTime::now_utc();
        let now = now
            .replace_nanosecond(now.microsecond() * 1000)
            .expect("valid");
        let next = self.last_now + time::Duration::microseconds(1);
        self.last_now = now.max(next);
        format_timestamp(self.last_now)
    }

    pub(super) fn default_value(&mut self, d: Default) -> Value {
        match d {
            Default::Null => Value::Null,
            Default::Uuid => Value::String(uuid_v4()),
            Default::Now => Value::String(self.now()),
            Default::Bool(b) => Value::Bool(b),
            Default::Int(i) => Value::from(i),
            Default::Text(s) => Value::String(s.to_owned()),
            Default::EmptyObject => json!({}),
        }
    }

    /// NOT NULL, CHECK and FOREIGN KEY of one row about to be stored in `table`.
    pub(super) fn check_row(&self, table: &Table, row: &Row) -> Result<(), PgError> {
        for c in &table.columns {
            let v = row.get(c.name).unwrap_or(&Value::Null);
            if v.is_null() {
                if c.not_null {
                    return Err(PgError::new(
                        400,
                        "23502",
                        format!(
                            "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                            c.name, table.name
                        ),
                    ));
                }
                continue;
            }
            if !c.one_of.is_empty() && !v.as_str().is_some_and(|s| c.one_of.contains(&s)) {
                return Err(PgError::new(
                    400,
                    "23514",
                    format!(
                        "new row for relation \"{}\" violates check constraint \"{}_{}_check\"",
                        table.name, table.name, c.name
                    ),
                ));
            }
            if let Some((parent, _)) = c.references {
                let exists = match self.index.get(&(parent, 0)) {
                    Some(ids) => Db::key(row, &[c.name]).is_some_and(|k| ids.contains_key(&k)),
                    None => self.rows[parent].iter().any(|r| r.get("id") == Some(v)),
                };
                if !exists {
                    let id = v.as_str().unwrap_or_default();
                    return Err(PgError::new(
                        409,
                        "23503",
                        format!(
                            "insert or update on table \"{}\" violates foreign key constraint \"{}_{}_fkey\"",
                            table.name, table.name, c.name
                        ),
                    )
                    .details(format!(
                        "Key ({})=({id}) is not present in table \"{parent}\".",
                        c.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The row of `rows` (other than `skip`) that has the same non-null values as `row` on
    /// `cols`.
    pub(super) fn conflicting(
        rows: &[Row],
        skip: Option<usize>,
        row: &Row,
        cols: &[&str],
    ) -> Option<usize> {
        let key: Vec<&Value> = cols
            .iter()
            .map(|c| row.get(*c).unwrap_or(&Value::Null))
            .collect();
        if key.iter().any(|v| v.is_null()) {
            return None; // NULLs are never equal
        }
        rows.iter().enumerate().position(|(i, r)| {
            Some(i) != skip
                && cols
                    .iter()
                    .zip(&key)
                    .all(|(c, k)| r.get(*c).unwrap_or(&Value::Null) == *k)
        })
    }

    pub(super) fn unique_violation(table: &Table, cols: &[&str], row: &Row) -> PgError {
        let values: Vec<String> = cols
            .iter()
            .map(|c| match row.get(*c) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "null".into(),
            })
            .collect();
        PgError::new(
            409,
            "23505",
            format!(
                "duplicate key value violates unique constraint \"{}\"",
                table.constraint_name(cols)
            ),
        )
        .details(format!(
            "Key ({})=({}) already exists.",
            cols.join(", "),
            values.join(", ")
        ))
    }

    /// Reads one request object into a full row: types checked, defaults filled in.
    pub(super) fn build_row(
        &mut self,
        table: &'static str,
        obj: &Row,
        keys: &[String],
        missing_default: bool,
    ) -> Result<Row, PgError> {
        let t = self.table(table)?;
        let mut plan = Vec::new();
        for c in &t.columns {
            let given = keys.iter().any(|k| k == c.name);
            match obj.get(c.name) {
                Some(v) if given => plan.push((c.name, Ok(coerce(c.kind, v)?))),
                _ if given && !missing_default => plan.push((c.name, Ok(Value::Null))),
                _ => plan.push((c.name, Err(c.default))),
            }
        }
        Ok(plan
            .into_iter()
            .map(|(name, v)| {
                let v = match v {
                    Ok(v) => v,
                    Err(d) => self.default_value(d),
                };
                (name.to_owned(), v)
            })
            .collect())
    }

    /// INSERT … [ON CONFLICT (target) DO UPDATE | DO NOTHING], all or nothing. Returns the
    /// rows inserted or updated (not those skipped).
    pub(super) fn insert(
        &mut self,
        table: &'static str,
        objs: &[Row],
        q: &Query,
        prefer: &Prefer,
    ) -> Result<Vec<Row>, PgError> {
        let t = self.table(table)?;
        let keys: Vec<String> = match &q.columns {
            Some(cols) => cols.clone(),
            None => objs
                .first()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default(),
        };
        if q.columns.is_none()
            && objs
                .iter()
                .any(|o| o.len() != keys.len() || !keys.iter().all(|k| o.contains_key(k)))
        {
            return Err(PgError::new(400, "PGRST102", "All object keys must match"));
        }
        if let Some(k) = keys.iter().find(|k| t.column(k).is_none()) {
            return Err(unknown_column(table, k));
        }
        let resolution = if prefer.merge_duplicates {
            Resolution::Merge
        } else if prefer.ignore_duplicates {
            Resolution::Ignore
        } else {
            Resolution::Error
        };
        let target: Vec<&'static str> = match &q.on_conflict {
            Some(cols) => {
                let found = t.unique.iter().find(|u| {
                    u.len() == cols.len() && u.iter().all(|c| cols.iter().any(|x| x == c))
                });
                match found {
                    Some(u) => u.to_vec(),
                    None => {
                        return Err(PgError::new(
                            400,
                            "42P10",
                            "there is no unique or exclusion constraint matching the ON CONFLICT specification",
                        ));
                    }
                }
            }
            None => t.unique[0].to_vec(),
        };
        if resolution != Resolution::Merge {
            return self.insert_new(table, objs, &keys, &target, resolution, prefer);
        }
        let mut rows = self.rows[table].clone();
        let mut touched: Vec<usize> = Vec::new();
        for obj in objs {
            let row = self.build_row(table, obj, &keys, prefer.missing_default)?;
            let t = self.table(table)?;
            let existing = match resolution {
                Resolution::Error => None,
                _ => Db::conflicting(&rows, None, &row, &target),
            };
            match (existing, resolution) {
                (Some(i), Resolution::Merge) => {
                    if touched.contains(&i) {
                        return Err(PgError::new(
                            400,
                            "21000",
                            "ON CONFLICT DO UPDATE command cannot affect row a second time",
                        ));
                    }
                    let mut updated = rows[i].clone();
                    for k in &keys {
                        updated.insert(k.clone(), row[k.as_str()].clone());
                    }
                    if t.has_updated_at() {
                        let now = self.now();
                        updated.insert("updated_at".into(), now.into());
                    }
                    let t = self.table(table)?;
                    self.check_row(t, &updated)?;
                    for u in &t.unique {
                        if Db::conflicting(&rows, Some(i), &updated, u).is_some() {
                            return Err(Db::unique_violation(t, u, &updated));
                        }
                    }
                    rows[i] = updated;
                    touched.push(i);
                }
                (Some(_), _) => {} // DO NOTHING
                (None, _) => {
                    self.check_row(t, &row)?;
                    for u in &t.unique {
                        if Db::conflicting(&rows, None, &row, u).is_some() {
                            return Err(Db::unique_violation(t, u, &row));
                        }
                    }
                    rows.push(row);
                    touched.push(rows.len() - 1);
                }
            }
        }
        let out = touched.iter().map(|i| rows[*i].clone()).collect();
        self.replace_rows(table, rows);
        Ok(out)
    }

    /// INSERT [ON CONFLICT (target) DO NOTHING]: the rows are checked against the unique
    /// indexes and appended, all or nothing, without copying the table. Returns the rows
    /// inserted when the answer is to show them.
    pub(super) fn insert_new(
        &mut self,
        table: &'static str,
        objs: &[Row],
        keys: &[String],
        target: &[&'static str],
        resolution: Resolution,
        prefer: &Prefer,
    ) -> Result<Vec<Row>, PgError> {
        self.ensure_index(table);
        let parents: Vec<&'static str> = self
            .table(table)?
            .columns
            .iter()
            .filter_map(|c| c.references.map(|r| r.0))
            .collect();
        for parent in parents {
            self.ensure_index(parent);
        }
        let uniques: Vec<&'static [&'static str]> = self.table(table)?.unique.clone();
        let target_index = uniques.iter().position(|u| *u == target);
        let base = self.rows[table].len();
        let mut added: Vec<Row> = Vec::new();
        let mut fresh: Vec<HashMap<String, usize>> = vec![HashMap::new(); uniques.len()];
        for obj in objs {
            let row = self.build_row(table, obj, keys, prefer.missing_default)?;
            let taken = |db: &Db, fresh: &[HashMap<String, usize>], u: usize, row: &Row| {
                Db::key(row, uniques[u]).is_some_and(|k| {
                    db.index[&(table, u)].contains_key(&k) || fresh[u].contains_key(&k)
                })
            };
            if resolution == Resolution::Ignore
                && target_index.is_some_and(|u| taken(self, &fresh, u, &row))
            {
                continue; // DO NOTHING
            }
            let t = self.table(table)?;
            self.check_row(t, &row)?;
            for (u, cols) in uniques.iter().enumerate() {
                if taken(self, &fresh, u, &row) {
                    return Err(Db::unique_violation(t, cols, &row));
                }
            }
            for (u, cols) in uniques.iter().enumerate() {
                if let Some(k) = Db::key(&row, cols) {
                    fresh[u].insert(k, base + added.len());
                }
            }
            added.push(row);
        }
        for (u, map) in fresh.into_iter().enumerate() {
            self.index
                .get_mut(&(table, u))
                .expect("built above")
                .extend(map);
        }
        let out = if prefer.representation {
            added.clone()
        } else {
            Vec::new()
        };
        self.rows.get_mut(table).expect("a table").extend(added);
        for i in base..self.rows[table].len() {
            self.index_elements(table, i);
        }
        Ok(out)
    }

    pub(super) fn select(&mut self, table: &str, q: &Query) -> Result<Vec<Row>, PgError> {
        let name = self.table(table)?.name;
        check_columns(self.table(name)?, q)?;
        let candidates = self.candidates(name, q);
        let t = self.table(name)?;
        let kind = |c: &str| t.kind(c);
        let m = q.matcher(&kind)?;
        let rows = &self.rows[t.name];
        let mut out: Vec<Row> = match candidates {
            Some(at) => at
                .into_iter()
                .map(|i| &rows[i])
                .filter(|r| m.matches(r))
                .cloned()
                .collect(),
            None => rows.iter().filter(|r| m.matches(r)).cloned().collect(),
        };
        q.sort(&mut out, &kind);
        Ok(out)
    }

    pub(super) fn update(
        &mut self,
        table: &'static str,
        q: &Query,
        patch: &Row,
    ) -> Result<Vec<Row>, PgError> {
        let t = self.table(table)?;
        check_columns(t, q)?;
        if q.filters.is_empty() {
            return Err(PgError::new(400, "21000", "UPDATE requires a WHERE clause"));
        }
        let mut values = Vec::new();
        for (k, v) in patch {
            let c = t.column(k).ok_or_else(|| unknown_column(table, k))?;
            values.push((k.clone(), coerce(c.kind, v)?));
        }
        let has_updated_at = t.has_updated_at();
        let m = q.matcher(&|c| t.kind(c))?;
        let hits: Vec<usize> = self.rows[table]
            .iter()
            .enumerate()
            .filter(|(_, r)| m.matches(r))
            .map(|(i, _)| i)
            .collect();
        if let [i] = hits[..] {
            // One row (the usual PATCH by id): checked against the others in place, without a
            // copy of the table.
            let mut row = self.rows[table][i].clone();
            for (k, v) in &values {
                row.insert(k.clone(), v.clone());
            }
            if has_updated_at {
                let now = self.now();
                row.insert("updated_at".into(), now.into());
            }
            let t = self.table(table)?;
            self.check_row(t, &row)?;
            for u in &t.unique {
                if Db::conflicting(&self.rows[table], Some(i), &row, u).is_some() {
                    return Err(Db::unique_violation(t, u, &row));
                }
            }
            let name = t.name;
            self.rows.get_mut(name).expect("the table")[i] = row.clone();
            self.forget_indexes(name);
            return Ok(vec![row]);
        }
        let mut rows = self.rows[table].clone();
        let mut touched = Vec::new();
        for (i, row) in rows.iter_mut().enumerate() {
            if !m.matches(row) {
                continue;
            }
            for (k, v) in &values {
                row.insert(k.clone(), v.clone());
            }
            if has_updated_at {
                let now = self.now();
                row.insert("updated_at".into(), now.into());
            }
            touched.push(i);
        }
        let t = self.table(table)?;
        for i in &touched {
            self.check_row(t, &rows[*i])?;
            for u in &t.unique {
                if Db::conflicting(&rows, Some(*i), &rows[*i], u).is_some() {
                    return Err(Db::unique_violation(t, u, &rows[*i]));
                }
            }
        }
        let out = touched.iter().map(|i| rows[*i].clone()).collect();
        self.replace_rows(table, rows);
        Ok(out)
    }

    pub(super) fn delete(&mut self, table: &'static str, q: &Query) -> Result<Vec<Row>, PgError> {
        let t = self.table(table)?;
        check_columns(t, q)?;
        if q.filters.is_empty() {
            return Err(PgError::new(400, "21000", "DELETE requires a WHERE clause"));
        }
        let m = q.matcher(&|c| t.kind(c))?;
        let (mut gone, mut kept) = (Vec::new(), Vec::new());
        for r in self.rows[table].clone() {
            if m.matches(&r) {
                gone.push(r);
            } else {
                kept.push(r);
            }
        }
        self.replace_rows(table, kept);
        let ids: Vec<Value> = gone.iter().filter_map(|r| r.get("id").cloned()).collect();
        self.cascade(table, &ids);
        Ok(gone)
    }

    pub(super) fn cascade(&mut self, parent: &str, ids: &[Value]) {
        let refs: Vec<(&'static str, &'static str, bool)> = self
            .tables
            .iter()
            .flat_map(|t| {
                t.columns.iter().filter_map(move |c| match c.references {
                    Some((p, cascade)) if p == parent => Some((t.name, c.name, cascade)),
                    _ => None,
                })
            })
            .collect();
        for (table, column, cascade) in refs {
            self.forget_indexes(table);
            let rows = self.rows.get_mut(table).expect("a table");
            if cascade {
                rows.retain(|r| !r.get(column).is_some_and(|v| ids.contains(v)));
            } else {
                for r in rows.iter_mut() {
                    if r.get(column).is_some_and(|v| ids.contains(v)) {
                        r.insert(column.to_owned(), Value::Null);
                    }
                }
            }
        }
    }
}

pub(super) fn check_columns(t: &Table, q: &Query) -> Result<(), PgError> {
    let selected = q.select.iter().flatten().map(|(_, c)| c.as_str());
    for c in q.columns_named().into_iter().chain(selected) {
        if t.column(c).is_none() {
            return Err(PgError::new(
                400,
                "42703",
                format!("column {}.{c} does not exist", t.name),
            ));
        }
    }
    Ok(())
}

/// The `select=` projection of rows.
pub(super) fn project(rows: Vec<Row>, q: &Query) -> Vec<Value> {
    rows.into_iter()
        .map(|r| match &q.select {
            None => Value::Object(r),
            Some(cols) => Value::Object(
                cols.iter()
                    .map(|(alias, c)| (alias.clone(), r.get(c).cloned().unwrap_or(Value::Null)))
                    .collect(),
            ),
        })
        .collect()
}
