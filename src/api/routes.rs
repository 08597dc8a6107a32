//! The handlers: each reads a view ([`crate::view`], the store's views) or makes the same
//! write an operator command makes, and rings what carries it on.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{Body, Path, Query};
use super::{Api, ApiError};
use crate::model::{DeviceKey, Origin, Target, UnixMillis};
use crate::store::Requeue;
use crate::store::sync::{Resolution, ResolveError};
use crate::view;

/// Longest the health probes wait for the store thread.
const STORE_ANSWER: Duration = Duration::from_secs(2);

type Answer<T> = Result<Json<T>, ApiError>;

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Whether the store thread answers within [`STORE_ANSWER`].
async fn store_answers(api: &Api) -> Result<(), String> {
    match tokio::time::timeout(STORE_ANSWER, api.inner.store.call(|_| Ok(()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("store: {e}")),
        Err(_) => Err(format!(
            "store: its thread did not answer within {STORE_ANSWER:?}"
        )),
    }
}

pub async fn healthz(State(api): State<Api>) -> Answer<Value> {
    store_answers(&api).await.map_err(ApiError::unavailable)?;
    Ok(Json(json!({"status": "ok"})))
}

pub async fn readyz(State(api): State<Api>) -> Response {
    let mut not_ready = Vec::new();
    if let Err(e) = store_answers(&api).await {
        not_ready.push(e);
    } else if !api.inner.store.is_healthy() {
        not_ready.push(
            "store: the last commit failed and none has succeeded since (disk full? see the journal)"
                .to_owned(),
        );
    }
    if not_ready.is_empty() {
        return Json(json!({"ready": true})).into_response();
    }
    let message = format!("not ready: {}", not_ready.join("; "));
    let body = json!({
        "ready": false,
        "not_ready": not_ready,
        "error": {"status": 503, "code": "unavailable", "message": message},
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

pub async fn status(State(api): State<Api>) -> Answer<view::StatusView> {
    let mut status = api.read(|db| view::status(db, true)).await?;
    status.live = Some(view::Live::of(
        &api.inner.health,
        api.ingest_rate(),
        api.inner.sync_now.is_some(),
    ));
    Ok(Json(status))
}

fn key(raw: &str) -> Result<DeviceKey, ApiError> {
    DeviceKey::parse(raw).map_err(ApiError::bad_request)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceQuery {
    q: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// Devices on one page at most.
const MAX_PAGE: usize = 500;

pub async fn devices(
    State(api): State<Api>,
    Query(q): Query<DeviceQuery>,
) -> Answer<view::DevicePage> {
    let limit = q.limit.unwrap_or(50).min(MAX_PAGE);
    let offset = q.offset.unwrap_or(0);
    let page = api
        .read(move |db| view::device_page(db, q.q.as_deref(), limit, offset))
        .await?;
    Ok(Json(page))
}

pub async fn device(State(api): State<Api>, Path(raw): Path<String>) -> Answer<view::DeviceDetail> {
    let key = key(&raw)?;
    let shown = key.to_string();
    api.read(move |db| view::device(db, &key))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no device {shown}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    #[serde(default)]
    create: bool,
}

/// The operator's edit of a device's whole desired document, as `nn-gateway desired set`.
pub async fn set_desired(
    State(api): State<Api>,
    Path(raw): Path<String>,
    Query(q): Query<CreateQuery>,
    Body(doc): Body<Value>,
) -> Answer<Value> {
    let key = key(&raw)?;
    if !doc.is_object() {
        return Err(ApiError::bad_request(format!(
            "a desired document must be a JSON object, got {doc}"
        )));
    }
    let stored = api
        .write(move |db| {
            if !q.create && !db.device_exists(&key)? {
                return Ok(None);
            }
            db.set_desired(&key, &doc, Origin::Local).map(Some)
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no device {raw}; check the key, or add ?create=true to make a new one"
            ))
        })?;
    api.sync_soon();
    Ok(Json(json!({
        "device": stored.device.to_string(),
        "version": stored.version,
        "doc": stored.doc,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryQuery {
    since: Option<String>,
    limit: Option<usize>,
}

pub async fn telemetry(
    State(api): State<Api>,
    Path(raw): Path<String>,
    Query(q): Query<TelemetryQuery>,
) -> Answer<Vec<crate::store::TelemetryView>> {
    let key = key(&raw)?;
    let since = q
        .since
        .as_deref()
        .map(|s| crate::cli::parse_since(s, UnixMillis::now()))
        .transpose()
        .map_err(ApiError::bad_request)?;
    let limit = q.limit.unwrap_or(50).min(MAX_PAGE);
    let points = api
        .read(move |db| {
            if !db.device_exists(&key)? {
                return Ok(None);
            }
            db.telemetry_of(&key, since, limit).map(Some)
        })
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {raw}")))?;
    Ok(Json(points))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueQuery {
    cloud: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

pub async fn queue(
    State(api): State<Api>,
    Query(q): Query<QueueQuery>,
) -> Answer<crate::store::QueueView> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    if let Some(s) = q.state.as_deref()
        && !["pending", "in_flight", "dead"].contains(&s)
    {
        return Err(ApiError::bad_request(format!(
            "state {s:?}: pending, in_flight or dead"
        )));
    }
    Ok(Json(
        api.read(move |db| db.queue_of(q.cloud.as_deref(), q.state.as_deref(), limit))
            .await?,
    ))
}

pub async fn retry_row(State(api): State<Api>, Path(id): Path<i64>) -> Answer<Value> {
    let n = api.write(move |db| db.requeue(Requeue::Row(id))).await?;
    if n == 0 {
        return Err(ApiError::not_found(format!(
            "no dead or pending outbox row {id}"
        )));
    }
    api.ring_lanes();
    Ok(Json(json!({"requeued": n})))
}

pub async fn retry_dead(State(api): State<Api>) -> Answer<Value> {
    let n = api.write(|db| db.requeue(Requeue::AllDead)).await?;
    api.ring_lanes();
    Ok(Json(json!({"requeued": n})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictQuery {
    #[serde(default)]
    all: bool,
    limit: Option<usize>,
}

pub async fn conflicts(
    State(api): State<Api>,
    Query(q): Query<ConflictQuery>,
) -> Answer<Vec<crate::store::sync::ConflictView>> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    Ok(Json(api.read(move |db| db.conflicts(q.all, limit)).await?))
}

pub async fn conflict(
    State(api): State<Api>,
    Path(id): Path<i64>,
) -> Answer<crate::store::sync::ConflictView> {
    api.read(move |db| db.conflict(id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no conflict {id}")))
}

/// `{"use": "local"}`, `{"use": "remote"}` or `{"value": …}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    #[serde(rename = "use")]
    side: Option<String>,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
}

/// A `value` that is present, even as `null` (a field resolved to "absent").
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

pub async fn resolve(
    State(api): State<Api>,
    Path(id): Path<i64>,
    Body(body): Body<ResolveBody>,
) -> Answer<Value> {
    let choice = match (body.side.as_deref(), body.value) {
        (None, Some(v)) => Resolution::Value(v),
        (Some("local"), None) => Resolution::Local,
        (Some("remote"), None) => Resolution::Remote,
        (Some(other), None) => {
            return Err(ApiError::bad_request(format!(
                "\"use\" is {other:?}: say \"local\" or \"remote\", or give a \"value\""
            )));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either \"use\" or \"value\", not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "say which value wins: {\"use\": \"local\"}, {\"use\": \"remote\"} or {\"value\": …}",
            ));
        }
    };
    let done = api
        .write(move |db| db.resolve_conflict(id, &choice, "api"))
        .await?
        .map_err(|e| match e {
            ResolveError::Unknown(_) => ApiError::not_found(e.to_string()),
            ResolveError::NotPending { .. } => ApiError::conflict(e.to_string()),
        })?;
    api.sync_soon();
    Ok(Json(
        json!({"conflict": done.conflict, "value": done.value}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncLogQuery {
    cloud: Option<String>,
    outcome: Option<String>,
    before: Option<i64>,
    limit: Option<usize>,
}

pub async fn sync_log(
    State(api): State<Api>,
    Query(q): Query<SyncLogQuery>,
) -> Answer<Vec<crate::store::sync::SyncLogView>> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    let rows = api
        .read(move |db| db.sync_log(q.cloud.as_deref(), q.outcome.as_deref(), q.before, limit))
        .await?;
    Ok(Json(rows))
}

pub async fn sync_now(State(api): State<Api>) -> Result<Response, ApiError> {
    let Some(now) = &api.inner.sync_now else {
        return Err(ApiError::conflict(
            "sync is off (no cloud enabled, or sync.enabled = false)",
        ));
    };
    now.notify_one();
    Ok((StatusCode::ACCEPTED, Json(json!({"scheduled": true}))).into_response())
}

/// One read request to a cloud, timed; the outcome in words an operator can act on.
pub async fn test_cloud(State(api): State<Api>, Path(cloud): Path<String>) -> Answer<Value> {
    let target = match cloud.as_str() {
        "golioth" => Target::Golioth,
        "netneural" => Target::NetNeural,
        _ => {
            return Err(ApiError::not_found(format!(
                "no cloud {cloud:?}: golioth or netneural"
            )));
        }
    };
    let started = Instant::now();
    let (request, outcome) = match target {
        Target::Golioth => match &api.inner.golioth {
            Some(c) => (crate::cloud::golioth::client::PROBE, c.probe().await),
            None => return Err(disabled(target)),
        },
        Target::NetNeural => match &api.inner.netneural {
            Some(c) => (crate::cloud::netneural::client::PROBE, c.probe().await),
            None => return Err(disabled(target)),
        },
    };
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(Json(match outcome {
        Ok(()) => json!({
            "cloud": target.as_str(), "ok": true, "latency_ms": latency_ms,
            "request": request, "status": 200, "error": null,
        }),
        Err(e) => json!({
            "cloud": target.as_str(), "ok": false, "latency_ms": latency_ms,
            "request": e.request, "status": e.status(), "error": e.to_string(),
            "retryable": e.is_retryable(),
        }),
    }))
}

fn disabled(target: Target) -> ApiError {
    ApiError::conflict(format!(
        "{} is not enabled ([{}] enabled = false)",
        target.as_str(),
        target.as_str()
    ))
}

/// Prometheus text: the counters as they are, the gauges read now.
pub async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let metrics = api.inner.metrics.clone();
    api.read(move |db| metrics.refresh_from(db)).await?;
    api.inner.metrics.refresh_health(&api.inner.health);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        api.inner.metrics.encode(),
    )
        .into_response())
}

pub async fn config(State(api): State<Api>) -> Answer<Value> {
    Ok(Json(json!({"toml": api.inner.config_toml})))
}

impl Api {
    /// Asks for a sync run now, so an edit reaches the clouds (when sync runs).
    fn sync_soon(&self) {
        if let Some(now) = &self.inner.sync_now {
            now.notify_one();
        }
    }

    /// Wakes the outbox lanes for re-queued rows.
    fn ring_lanes(&self) {
        for target in Target::ALL {
            self.inner.store.bells().of(target).notify_one();
        }
    }
}
