//! A fake NetNeural backend: the PostgREST subset at `/rest/v1/<table>` a client uses, over
//! the tables of DESIGN.md §5 plus `device_telemetry_history.idempotency_key` (UNIQUE, from
//! the gateway's migration).
//!
//! Like PostgREST over Postgres: ids are `gen_random_uuid()`, `created_at`/`updated_at` are
//! set by the server (`updated_at` by an update trigger, strictly increasing in microseconds),
//! values are checked against column types (uuid, timestamptz, integer, boolean, text[],
//! jsonb), and the NOT NULL, CHECK (the enum-like text columns), FOREIGN KEY and UNIQUE
//! constraints answer the Postgres error codes with PostgREST's statuses (23505/23503 → 409,
//! 23502/23514/22P02/22007 → 400). A statement is all or nothing.
//!
//! Statuses: GET 200; POST 201 (body only with `Prefer: return=representation`); PATCH and
//! DELETE 200 with representation, else 204. PATCH and DELETE without a filter are refused
//! (Supabase's safeupdate). A bulk insert's objects must all have the same keys (PGRST102).
//! Keys: `apikey` must be the key; an `Authorization` header, if sent, must be `Bearer <key>`.
//! A deleted device takes its assignments, telemetry and conflicts with it (ON DELETE
//! CASCADE); sync log rows keep the row with `device_id` NULL.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::faults::Faults;
use super::postgrest::{
    Filter, Kind, Op, PgError, Prefer, Query, array_literal, coerce, format_timestamp,
};
use super::server::{Api, Request, Response, Server};
use super::uuid_v4;

/// The key a fake accepts until [`FakeNetNeural::set_key`].
pub const DEFAULT_KEY: &str = "netneural-test-key";

type Row = Map<String, Value>;

#[derive(Clone, Copy, Debug)]
enum Default {
    Null,
    Uuid,
    Now,
    Bool(bool),
    Int(i64),
    Text(&'static str),
    EmptyObject,
}

#[derive(Debug)]
struct Column {
    name: &'static str,
    kind: Kind,
    default: Default,
    not_null: bool,
    /// Allowed values (a CHECK constraint), empty for any.
    one_of: &'static [&'static str],
    /// The referenced table (its `id`), and whether deleting the parent cascades (else SET NULL).
    references: Option<(&'static str, bool)>,
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        default: Default::Null,
        not_null: false,
        one_of: &[],
        references: None,
    }
}

impl Column {
    const fn default(mut self, d: Default) -> Column {
        self.default = d;
        self
    }
    const fn not_null(mut self) -> Column {
        self.not_null = true;
        self
    }
    const fn one_of(mut self, values: &'static [&'static str]) -> Column {
        self.one_of = values;
        self
    }
    const fn references(mut self, table: &'static str, cascade: bool) -> Column {
        self.references = Some((table, cascade));
        self
    }
}

#[derive(Debug)]
struct Table {
    name: &'static str,
    columns: Vec<Column>,
    /// The primary key first, then the UNIQUE constraints.
    unique: Vec<&'static [&'static str]>,
}

impl Table {
    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    fn kind(&self, name: &str) -> Kind {
        self.column(name).map_or(Kind::Text, |c| c.kind)
    }

    fn has_updated_at(&self) -> bool {
        self.column("updated_at").is_some()
    }

    fn constraint_name(&self, cols: &[&str]) -> String {
        if cols == ["id"] {
            format!("{}_pkey", self.name)
        } else {
            format!("{}_{}_key", self.name, cols.join("_"))
        }
    }
}

fn id() -> Column {
    col("id", Kind::Uuid).default(Default::Uuid).not_null()
}
fn created_at() -> Column {
    col("created_at", Kind::Timestamp)
        .default(Default::Now)
        .not_null()
}
fn updated_at() -> Column {
    col("updated_at", Kind::Timestamp)
        .default(Default::Now)
        .not_null()
}

const SYNC_DIRECTIONS: &[&str] = &["import", "export", "bidirectional", "none"];

fn schema() -> Vec<Table> {
    use Kind::*;
    vec![
        Table {
            name: "devices",
            columns: vec![
                id(),
                col("organization_id", Uuid).not_null(),
                col("integration_id", Uuid),
                col("external_device_id", Text),
                col("name", Text).not_null(),
                col("serial_number", Text),
                col("hardware_ids", TextArray),
                col("status", Text)
                    .default(Default::Text("offline"))
                    .one_of(&["online", "offline", "warning", "error"]),
                col("last_seen", Timestamp),
                col("last_seen_online", Timestamp),
                col("firmware_version", Text),
                col("metadata", Json).default(Default::EmptyObject),
                created_at(),
                updated_at(),
                col("deleted_at", Timestamp),
            ],
            unique: vec![&["id"]],
        },
        Table {
            name: "device_service_assignments",
            columns: vec![
                id(),
                col("device_id", Uuid)
                    .not_null()
                    .references("devices", true),
                col("integration_id", Uuid).not_null(),
                col("external_device_id", Text),
                col("sync_enabled", Bool)
                    .default(Default::Bool(true))
                    .not_null(),
                col("sync_direction", Text)
                    .default(Default::Text("bidirectional"))
                    .one_of(SYNC_DIRECTIONS),
                col("sync_status", Text).default(Default::Text("pending")),
                col("last_sync_at", Timestamp),
                col("sync_error", Text),
                created_at(),
                updated_at(),
            ],
            unique: vec![
                &["id"],
                &["device_id", "integration_id"],
                &["integration_id", "external_device_id"],
            ],
        },
        Table {
            name: "integration_sync_log",
            columns: vec![
                id(),
                col("organization_id", Uuid).not_null(),
                col("integration_id", Uuid),
                col("operation", Text).not_null().one_of(&[
                    "import",
                    "export",
                    "bidirectional",
                    "webhook",
                ]),
                col("status", Text).not_null().one_of(&[
                    "started",
                    "processing",
                    "completed",
                    "failed",
                    "partial",
                ]),
                col("device_id", Uuid).references("devices", false),
                col("devices_processed", Int).default(Default::Int(0)),
                col("devices_succeeded", Int).default(Default::Int(0)),
                col("devices_failed", Int).default(Default::Int(0)),
                col("conflicts_detected", Int).default(Default::Int(0)),
                col("error_message", Text),
                col("details", Json).default(Default::EmptyObject),
                col("started_at", Timestamp).default(Default::Now),
                col("completed_at", Timestamp),
                col("duration_ms", Int),
                created_at(),
            ],
            unique: vec![&["id"]],
        },
        Table {
            name: "device_telemetry_history",
            columns: vec![
                id(),
                col("device_id", Uuid)
                    .not_null()
                    .references("devices", true),
                col("organization_id", Uuid).not_null(),
                col("telemetry", Json).not_null(),
                col("device_timestamp", Timestamp),
                col("received_at", Timestamp)
                    .default(Default::Now)
                    .not_null(),
                col("activity_log_id", Uuid),
                col("idempotency_key", Text),
                created_at(),
            ],
            unique: vec![&["id"], &["idempotency_key"]],
        },
        Table {
            name: "device_conflicts",
            columns: vec![
                id(),
                col("device_id", Uuid)
                    .not_null()
                    .references("devices", true),
                col("conflict_type", Text).not_null().one_of(&[
                    "data_mismatch",
                    "timestamp_conflict",
                    "status_conflict",
                ]),
                col("field_name", Text),
                col("local_value", Json),
                col("remote_value", Json),
                col("local_updated_at", Timestamp),
                col("remote_updated_at", Timestamp),
                col("resolution_status", Text)
                    .default(Default::Text("pending"))
                    .not_null()
                    .one_of(&["pending", "resolved", "ignored", "auto_resolved"]),
                col("resolution_strategy", Text).one_of(&[
                    "local_wins",
                    "remote_wins",
                    "merge",
                    "manual",
                ]),
                col("resolved_value", Json),
                col("resolved_at", Timestamp),
                col("resolved_by", Text),
                created_at(),
                updated_at(),
            ],
            unique: vec![&["id"]],
        },
    ]
}

#[derive(Debug)]
struct Db {
    tables: Vec<Table>,
    rows: BTreeMap<&'static str, Vec<Row>>,
    /// The last server timestamp handed out: each is at least a microsecond later.
    last_now: OffsetDateTime,
    /// Per (table, unique constraint index): the key of every stored row → its position. Built
    /// when an insert first needs it, kept up to date by inserts, dropped for a table whenever
    /// anything else changes it (so a bulk insert into a large table costs its own rows, not
    /// the table's).
    index: HashMap<(&'static str, usize), HashMap<String, usize>>,
    /// Per (table, text[] column): each element → the rows holding it, kept like `index`, so
    /// that `hardware_ids=cs.{X}` reads the rows that hold X, not the whole table.
    elements: HashMap<(&'static str, &'static str), HashMap<String, Vec<usize>>>,
}

/// How conflicts on the target constraint are settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolution {
    Error,
    Merge,
    Ignore,
}

fn unknown_table(name: &str) -> PgError {
    PgError::new(
        404,
        "PGRST205",
        format!("Could not find the table 'public.{name}' in the schema cache"),
    )
}

fn unknown_column(table: &str, col: &str) -> PgError {
    PgError::new(
        400,
        "PGRST204",
        format!("Could not find the '{col}' column of '{table}' in the schema cache"),
    )
}

impl Db {
    fn new() -> Db {
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

    fn table(&self, name: &str) -> Result<&Table, PgError> {
        self.tables
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| unknown_table(name))
    }

    /// A row's key on `cols`, or `None` when one is NULL (NULLs are never equal).
    fn key(row: &Row, cols: &[&str]) -> Option<String> {
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

    /// Builds the unique indexes of `table` that are missing.
    fn ensure_index(&mut self, table: &'static str) {
        let t = self
            .tables
            .iter()
            .find(|t| t.name == table)
            .expect("a table");
        for (u, cols) in t.unique.iter().enumerate() {
            if self.index.contains_key(&(table, u)) {
                continue;
            }
            let map = self.rows[table]
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Db::key(r, cols).map(|k| (k, i)))
                .collect();
            self.index.insert((table, u), map);
        }
    }

    /// Replaces a table's rows (after an update, a delete, a merge): its indexes go.
    fn replace_rows(&mut self, table: &'static str, rows: Vec<Row>) {
        self.rows.insert(table, rows);
        self.forget_indexes(table);
    }

    fn forget_indexes(&mut self, table: &str) {
        self.index.retain(|(t, _), _| *t != table);
        self.elements.retain(|(t, _), _| *t != table);
    }

    /// Adds row `i` of `table` to the element indexes built for it.
    fn index_elements(&mut self, table: &'static str, i: usize) {
        let row = &self.rows[table][i];
        for ((t, col), map) in self.elements.iter_mut() {
            if *t != table {
                continue;
            }
            for e in row
                .get(*col)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(e) = e.as_str() {
                    map.entry(e.to_owned()).or_default().push(i);
                }
            }
        }
    }

    /// The positions of the only rows that can match `q`, in order, when a filter allows an
    /// index to say (`id=eq.X`, `col=cs.{X,…}` on a text[] column); `None` to read them all.
    /// The caller still tests every filter on them.
    fn candidates(&mut self, table: &'static str, q: &Query) -> Option<Vec<usize>> {
        for f in &q.filters {
            let Filter::Cond {
                col,
                negate: false,
                op,
                value,
            } = f
            else {
                continue;
            };
            let t = self.table(table).ok()?;
            match op {
                Op::Eq if col == "id" && super::postgrest::is_uuid(value) => {
                    self.ensure_index(table);
                    let key = Db::key(
                        &Row::from_iter([(
                            "id".to_owned(),
                            Value::from(value.to_ascii_lowercase()),
                        )]),
                        &["id"],
                    )?;
                    return Some(
                        self.index[&(table, 0)]
                            .get(&key)
                            .copied()
                            .into_iter()
                            .collect(),
                    );
                }
                Op::Cs if t.kind(col) == Kind::TextArray => {
                    let first = array_literal(value).ok()?.into_iter().next()?;
                    let col: &'static str = t.column(col)?.name;
                    if !self.elements.contains_key(&(table, col)) {
                        let mut map: HashMap<String, Vec<usize>> = HashMap::new();
                        for (i, r) in self.rows[table].iter().enumerate() {
                            for e in r.get(col).and_then(Value::as_array).into_iter().flatten() {
                                if let Some(e) = e.as_str() {
                                    map.entry(e.to_owned()).or_default().push(i);
                                }
                            }
                        }
                        self.elements.insert((table, col), map);
                    }
                    let mut at = self.elements[&(table, col)]
                        .get(&first)
                        .cloned()
                        .unwrap_or_default();
                    at.dedup();
                    return Some(at);
                }
                _ => {}
            }
        }
        None
    }

    fn now(&mut self) -> String {
        let now = OffsetDateTime::now_utc();
        let now = now
            .replace_nanosecond(now.microsecond() * 1000)
            .expect("valid");
        let next = self.last_now + time::Duration::microseconds(1);
        self.last_now = now.max(next);
        format_timestamp(self.last_now)
    }

    fn default_value(&mut self, d: Default) -> Value {
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
    fn check_row(&self, table: &Table, row: &Row) -> Result<(), PgError> {
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
    fn conflicting(rows: &[Row], skip: Option<usize>, row: &Row, cols: &[&str]) -> Option<usize> {
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

    fn unique_violation(table: &Table, cols: &[&str], row: &Row) -> PgError {
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
    fn build_row(
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
    fn insert(
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
    fn insert_new(
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

    fn select(&mut self, table: &str, q: &Query) -> Result<Vec<Row>, PgError> {
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

    fn update(&mut self, table: &'static str, q: &Query, patch: &Row) -> Result<Vec<Row>, PgError> {
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

    fn delete(&mut self, table: &'static str, q: &Query) -> Result<Vec<Row>, PgError> {
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

    fn cascade(&mut self, parent: &str, ids: &[Value]) {
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

fn check_columns(t: &Table, q: &Query) -> Result<(), PgError> {
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
fn project(rows: Vec<Row>, q: &Query) -> Vec<Value> {
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

#[derive(Debug)]
struct NetNeural {
    db: Mutex<Db>,
}

fn pg_response(e: &PgError) -> Response {
    Response::json(e.status, &e.body())
}

impl NetNeural {
    fn lock(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn route(&self, req: &Request) -> Result<Response, PgError> {
        let name = match req.path.strip_prefix("/rest/v1/") {
            Some(rest) if rest.starts_with("rpc/") => {
                return Err(PgError::new(
                    404,
                    "PGRST202",
                    format!(
                        "Could not find the function public.{} without parameters in the schema cache",
                        &rest[4..]
                    ),
                ));
            }
            Some(rest) => rest.trim_end_matches('/'),
            None => {
                return Err(PgError::new(
                    404,
                    "PGRST125",
                    "Invalid path specified in request URL",
                ));
            }
        };
        // Read outside the lock: a bulk insert's body is the largest part of its work.
        let mut body = match req.method.as_str() {
            "POST" | "PATCH" => Some(serde_json::from_slice::<Value>(&req.body)),
            _ => None,
        };
        let mut db = self.lock();
        let table = db.table(name)?.name;
        let q = Query::parse(&req.query_pairs())?;
        let prefer = Prefer::parse(req.headers_named("prefer"));
        let single = req
            .header("accept")
            .is_some_and(|a| a.contains("application/vnd.pgrst.object+json"));
        let (status, rows) = match req.method.as_str() {
            "GET" | "HEAD" => {
                let all = db.select(table, &q)?;
                let total = all.len();
                let rows: Vec<Row> = all
                    .into_iter()
                    .skip(q.offset)
                    .take(q.limit.unwrap_or(usize::MAX))
                    .collect();
                let range = if rows.is_empty() {
                    "*".to_owned()
                } else {
                    format!("{}-{}", q.offset, q.offset + rows.len() - 1)
                };
                let total = if prefer.count_exact {
                    total.to_string()
                } else {
                    "*".into()
                };
                let body = output(project(rows, &q), single)?;
                let status = if prefer.count_exact && q.limit.is_some_and(|l| l < body_len(&body)) {
                    206
                } else {
                    200
                };
                return Ok(Response::json(status, &body)
                    .with_header("content-range", &format!("{range}/{total}")));
            }
            "POST" => {
                let body: Value = body.take().expect("read above").map_err(|e| {
                    PgError::new(400, "PGRST102", "Empty or invalid json").details(e.to_string())
                })?;
                let objs: Vec<Row> = match body {
                    Value::Object(o) => vec![o],
                    Value::Array(items) => items
                        .into_iter()
                        .map(|v| match v {
                            Value::Object(o) => Ok(o),
                            _ => Err(PgError::new(400, "PGRST102", "All object keys must match")),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(PgError::new(400, "PGRST102", "Empty or invalid json")),
                };
                check_columns(db.table(table)?, &q)?;
                (201, db.insert(table, &objs, &q, &prefer)?)
            }
            "PATCH" => {
                let patch = match body.take().expect("read above") {
                    Ok(Value::Object(o)) => o,
                    _ => return Err(PgError::new(400, "PGRST102", "Empty or invalid json")),
                };
                (200, db.update(table, &q, &patch)?)
            }
            "DELETE" => (200, db.delete(table, &q)?),
            _ => {
                return Err(PgError::new(
                    405,
                    "PGRST117",
                    format!("Unsupported HTTP method: {}", req.method),
                ));
            }
        };
        let applied = prefer.applied();
        let resp = if prefer.representation {
            Response::json(status, &output(project(rows, &q), single)?)
        } else if status == 201 {
            Response::empty(201)
        } else {
            Response::empty(204)
        };
        Ok(if applied.is_empty() {
            resp
        } else {
            resp.with_header("preference-applied", &applied)
        })
    }
}

fn body_len(v: &Value) -> usize {
    v.as_array().map_or(1, Vec::len)
}

/// An array, or with `Accept: application/vnd.pgrst.object+json` exactly one object.
fn output(rows: Vec<Value>, single: bool) -> Result<Value, PgError> {
    if !single {
        return Ok(Value::Array(rows));
    }
    match <[Value; 1]>::try_from(rows) {
        Ok([one]) => Ok(one),
        Err(rows) => Err(PgError::new(
            406,
            "PGRST116",
            "JSON object requested, multiple (or no) rows returned",
        )
        .details(format!("The result contains {} rows", rows.len()))),
    }
}

impl Api for NetNeural {
    fn check_key(&self, req: &Request, key: &str) -> Result<(), Response> {
        match req.header("apikey") {
            None => {
                return Err(Response::json(
                    401,
                    &json!({"message": "No API key found in request", "hint": "No `apikey` request header or url param was found."}),
                ));
            }
            Some(k) if k != key => {
                return Err(Response::json(
                    401,
                    &json!({"message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key."}),
                ));
            }
            Some(_) => {}
        }
        match req.header("authorization") {
            Some(a) if a.strip_prefix("Bearer ") != Some(key) => Err(pg_response(&PgError::new(
                401,
                "PGRST301",
                "JWSError JWSInvalidSignature",
            ))),
            _ => Ok(()),
        }
    }

    fn error(&self, status: u16, message: &str) -> Response {
        let code = match status {
            400 => "PGRST100",
            401 => "PGRST301",
            500 => "XX000",
            503 => "PGRST002",
            504 => "PGRST003",
            _ => "PGRST000",
        };
        pg_response(&PgError::new(status, code, message))
    }

    fn handle(&self, req: &Request) -> Response {
        self.route(req).unwrap_or_else(|e| pg_response(&e))
    }
}

/// A running fake NetNeural backend. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeNetNeural {
    server: Server,
    faults: Faults,
    api: Arc<NetNeural>,
}

impl FakeNetNeural {
    /// A fake that accepts [`DEFAULT_KEY`].
    pub async fn start() -> FakeNetNeural {
        FakeNetNeural::start_with(DEFAULT_KEY).await
    }

    pub async fn start_with(key: &str) -> FakeNetNeural {
        let faults = Faults::new(key);
        let api = Arc::new(NetNeural {
            db: Mutex::new(Db::new()),
        });
        let server = Server::start(api.clone(), faults.clone()).await;
        FakeNetNeural {
            server,
            faults,
            api,
        }
    }

    /// The project URL, `http://127.0.0.1:PORT` (tables under `/rest/v1/`).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Replaces the valid key: requests with the old one get 401 from now on.
    pub fn set_key(&self, key: &str) {
        self.faults.set_key(key);
    }

    /// Every row of `table` in insertion order. Panics on an unknown table.
    pub fn rows(&self, table: &str) -> Vec<Value> {
        let db = self.api.lock();
        let t = db.table(table).expect("a known table").name;
        db.rows[t].iter().cloned().map(Value::Object).collect()
    }

    /// Rows in `table` (without copying them: cheap on a large table).
    pub fn count(&self, table: &str) -> usize {
        let db = self.api.lock();
        let t = db.table(table).expect("a known table").name;
        db.rows[t].len()
    }

    /// Distinct non-null values of `column` in `table` (without copying the rows).
    pub fn distinct(&self, table: &str, column: &str) -> usize {
        let db = self.api.lock();
        let t = db.table(table).expect("a known table").name;
        db.rows[t]
            .iter()
            .filter_map(|r| r.get(column).filter(|v| !v.is_null()))
            .map(ToString::to_string)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// The row of `table` with this `id`.
    pub fn row(&self, table: &str, id: &str) -> Option<Value> {
        self.rows(table).into_iter().find(|r| r["id"] == id)
    }

    /// Telemetry rows of one device, in insertion order.
    pub fn telemetry_of(&self, device_id: &str) -> Vec<Value> {
        self.rows("device_telemetry_history")
            .into_iter()
            .filter(|r| r["device_id"] == device_id)
            .collect()
    }

    /// Inserts a row as another writer would (through every constraint); returns it with its
    /// server-set columns. Panics on a violation.
    pub fn insert(&self, table: &str, row: Value) -> Value {
        let obj = row.as_object().expect("a JSON object").clone();
        let mut db = self.api.lock();
        let t = db.table(table).expect("a known table").name;
        let shown = Prefer {
            representation: true,
            ..Prefer::default()
        };
        let mut out = db
            .insert(t, &[obj], &Query::default(), &shown)
            .unwrap_or_else(|e| panic!("insert into {table}: {e:?}"));
        Value::Object(out.remove(0))
    }

    /// A device row with a new id; returns the id.
    pub fn seed_device(&self, organization_id: &str, name: &str, hardware_ids: &[&str]) -> String {
        let row = self.insert(
            "devices",
            json!({"organization_id": organization_id, "name": name, "hardware_ids": hardware_ids}),
        );
        row["id"].as_str().expect("an id").to_owned()
    }

    /// A `device_service_assignments` row; returns it.
    pub fn seed_assignment(
        &self,
        device_id: &str,
        integration_id: &str,
        external_device_id: &str,
        sync_direction: &str,
    ) -> Value {
        self.insert(
            "device_service_assignments",
            json!({
                "device_id": device_id,
                "integration_id": integration_id,
                "external_device_id": external_device_id,
                "sync_direction": sync_direction,
            }),
        )
    }

    /// Updates the row of `table` with this `id` as another writer would (the update trigger
    /// bumps `updated_at`); returns the new row. Panics on a violation or a missing row.
    pub fn edit(&self, table: &str, id: &str, patch: Value) -> Value {
        let obj = patch.as_object().expect("a JSON object").clone();
        let q = Query::parse(&[("id".into(), format!("eq.{id}"))]).expect("a filter");
        let mut db = self.api.lock();
        let t = db.table(table).expect("a known table").name;
        let mut out = db
            .update(t, &q, &obj)
            .unwrap_or_else(|e| panic!("edit {table} {id}: {e:?}"));
        assert!(!out.is_empty(), "edit {table}: no row with id {id}");
        Value::Object(out.remove(0))
    }

    /// [`FakeNetNeural::edit`] on `devices`.
    pub fn edit_device(&self, id: &str, patch: Value) -> Value {
        self.edit("devices", id, patch)
    }

    /// Deletes the row with this `id` (cascading as the schema does).
    pub fn delete(&self, table: &str, id: &str) {
        let q = Query::parse(&[("id".into(), format!("eq.{id}"))]).expect("a filter");
        let mut db = self.api.lock();
        let t = db.table(table).expect("a known table").name;
        db.delete(t, &q)
            .unwrap_or_else(|e| panic!("delete from {table}: {e:?}"));
    }
}
