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

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};

use super::faults::Faults;
use super::postgrest::{PgError, Prefer, Query};
use super::server::{Api, Request, Response, Server};

/// The key a fake accepts until [`FakeNetNeural::set_key`].
pub const DEFAULT_KEY: &str = "netneural-test-key";

mod db;
mod index;
mod schema;

use db::*;

type Row = Map<String, Value>;

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

    /// Every `device_conflicts` row, in insertion order.
    pub fn conflicts(&self) -> Vec<Value> {
        self.rows("device_conflicts")
    }

    /// Settles a conflict as an operator in NetNeural's UI would: `resolved` by the
    /// `manual` strategy to `value`, by `by`, now (the update trigger bumps `updated_at`).
    /// Returns the row. Panics on a missing conflict.
    pub fn resolve_conflict(&self, id: &str, value: Value, by: &str) -> Value {
        let now = self.api.lock().now();
        self.edit(
            "device_conflicts",
            id,
            json!({
                "resolution_status": "resolved",
                "resolution_strategy": "manual",
                "resolved_value": value,
                "resolved_by": by,
                "resolved_at": now,
            }),
        )
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
