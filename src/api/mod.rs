//! The local HTTP API, the console, `/metrics`, the health probes and the Golioth webhook,
//! served by the daemon itself on `api.bind` (default `127.0.0.1:8080`), axum on the daemon's
//! runtime.
//!
//! Routes (JSON; every error is [`ApiError`]'s one shape):
//! - `GET /healthz` (the process and the store thread answer), `GET /readyz` (the store takes
//!   writes; names what is not ready) — no token;
//! - `/` and `/console/*` — the console's embedded files, no token (the console asks for it);
//! - under `/api/v1`, each needing `Authorization: Bearer <token>` ([`auth`]):
//!   `GET status` ([`crate::view::StatusView`] with `live`), `GET devices?q=&limit=&offset=`,
//!   `GET devices/{key}`, `PUT devices/{key}/desired[?create=true]`,
//!   `GET devices/{key}/telemetry?since=&limit=`, `GET queue?cloud=&state=&limit=`,
//!   `POST queue/{id}/retry`, `POST queue/retry-dead`, `GET conflicts?all=&limit=`,
//!   `GET conflicts/{id}`, `POST conflicts/{id}/resolve` (`{"use":"local"|"remote"}` or
//!   `{"value": …}`; 409 to all but the first), `GET sync-log?cloud=&outcome=&before=&limit=`,
//!   `POST sync` (202), `POST clouds/{golioth|netneural}/test` (one read request: latency,
//!   status, the exact error), `GET config` (the effective configuration, secrets left out);
//! - `GET /metrics` (token) — Prometheus text ([`crate::metrics`]; the gauges read from the
//!   database and the lanes at each scrape);
//! - `POST /api/v1/webhooks/golioth` — its own secret, not the token ([`webhook`]).
//!
//! The views are [`crate::view`]'s, the CLI's: `status --json` and `GET /api/v1/status` say
//! the same. Reads go through a few read-only connections of their own (WAL: they never wait
//! for the store thread's group commits, nor hold them up); writes go through the store thread
//! as every other write does, and then ring the part that carries them on (the sync run, the
//! outbox lanes; the downlink polls).

mod auth;
pub mod console;
mod error;
mod routes;
mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{GENERATED_NAME as TOKEN_FILE_NAME, TokenError};
pub use error::ApiError;
pub use webhook::SIGNATURE_HEADER;

use crate::cloud::golioth::Golioth;
use crate::cloud::netneural::NetNeural;
use crate::config::Config;
use crate::health::Health;
use crate::store::{Db, Store, StoreError};

/// Read-only connections kept for the next request.
const READERS_KEPT: usize = 4;

/// What the API is connected to.
pub struct ApiLinks {
    pub store: Store,
    pub health: Health,
    /// Rung for a sync run now; `None` when sync is off.
    pub sync_now: Option<Arc<Notify>>,
    /// The clients for the connection tests (with the lanes' keys, so SIGHUP reaches them).
    pub golioth: Option<Golioth>,
    pub netneural: Option<NetNeural>,
    /// Where the Golioth webhook's pulls go (`None`: no Golioth sync runs).
    pub pulls: Option<crate::cloud::sync::PullRequests>,
    pub metrics: crate::metrics::Metrics,
}

/// The API's state, cheap to clone into every handler.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    path: PathBuf,
    readers: Mutex<Vec<Db>>,
    health: Health,
    token: crate::config::Secret,
    sync_now: Option<Arc<Notify>>,
    golioth: Option<Golioth>,
    netneural: Option<NetNeural>,
    /// `check-config`'s rendering of the effective configuration.
    config_toml: String,
    max_body: usize,
    /// `None` when no webhook secret is configured.
    webhook: Option<webhook::Webhook>,
    metrics: crate::metrics::Metrics,
    /// (when, messages stored so far), one a second for the last [`RATE_WINDOW`].
    ingest_samples: Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

/// The ingest rate in `status` is over this window.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl Api {
    /// The API over `links`, its token read or made ([`auth::token`]).
    ///
    /// # Errors
    /// A token file that cannot be made or read.
    pub fn new(config: &Config, links: ApiLinks) -> Result<Api, TokenError> {
        let token = auth::token(config.api.token.as_ref(), &config.storage.path)?;
        Ok(Api {
            inner: Arc::new(Inner {
                store: links.store,
                path: config.storage.path.clone(),
                readers: Mutex::new(Vec::new()),
                health: links.health,
                token,
                sync_now: links.sync_now,
                golioth: links.golioth,
                netneural: links.netneural,
                config_toml: config.to_toml(),
                max_body: config.api.max_body_bytes,
                webhook: webhook::Webhook::new(config, links.pulls),
                metrics: links.metrics,
                ingest_samples: Mutex::default(),
            }),
        })
    }

    /// Runs `f` on a read-only connection of the API's, off the async threads.
    async fn read<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let kept = inner
                .readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            let db = match kept {
                Some(db) => db,
                None => Db::open_readonly(&inner.path)?,
            };
            let out = f(&db);
            if out.is_ok() {
                let mut readers = inner.readers.lock().unwrap_or_else(|p| p.into_inner());
                if readers.len() < READERS_KEPT {
                    readers.push(db);
                }
            }
            out
        })
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
    }

    /// Runs `f` on the store thread (the daemon's one writer).
    async fn write<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Db) -> Result<R, StoreError> + Send + 'static,
    {
        self.inner.store.call(f).await.map_err(ApiError::from)
    }

    /// Every route, with the token, the body cap and the JSON 404/405.
    pub fn router(self) -> Router {
        let v1 = Router::new()
            .route("/status", get(routes::status))
            .route("/devices", get(routes::devices))
            .route("/devices/{key}", get(routes::device))
            .route("/devices/{key}/desired", put(routes::set_desired))
            .route("/devices/{key}/telemetry", get(routes::telemetry))
            .route("/queue", get(routes::queue))
            .route("/queue/retry-dead", post(routes::retry_dead))
            .route("/queue/{id}/retry", post(routes::retry_row))
            .route("/conflicts", get(routes::conflicts))
            .route("/conflicts/{id}", get(routes::conflict))
            .route("/conflicts/{id}/resolve", post(routes::resolve))
            .route("/sync-log", get(routes::sync_log))
            .route("/sync", post(routes::sync_now))
            .route("/clouds/{cloud}/test", post(routes::test_cloud))
            .route("/config", get(routes::config))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                auth::require_token,
            ))
            // After the token's layer: the webhook has its own secret.
            .route("/webhooks/golioth", post(webhook::golioth));
        let max_body = self.inner.max_body;
        Router::new()
            .nest("/api/v1", v1)
            .merge(console::routes())
            .route(
                "/metrics",
                get(routes::metrics).route_layer(axum::middleware::from_fn_with_state(
                    self.clone(),
                    auth::require_token,
                )),
            )
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            .layer(DefaultBodyLimit::max(max_body))
            .with_state(self)
    }
}

impl Api {
    /// Records how many messages are stored so far (once a second, [`spawn`]'s sampler).
    fn sample_ingest(&self) {
        let now = std::time::Instant::now();
        let total = self.inner.metrics.ingested_total();
        let mut samples = self
            .inner
            .ingest_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        samples.push_back((now, total));
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Messages stored per second over the last [`RATE_WINDOW`] (`None` in the first second).
    fn ingest_rate(&self) -> Option<f64> {
        let samples = self
            .inner
            .ingest_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ((t0, n0), (t1, n1)) = (samples.front()?, samples.back()?);
        let secs = t1.duration_since(*t0).as_secs_f64();
        (secs > 0.0).then(|| n1.saturating_sub(*n0) as f64 / secs)
    }
}

/// Binds the API's listener (before READY, so a port in use fails the start).
///
/// # Errors
/// The address and the reason.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

/// Serves `api` on `listener` until shutdown; requests in progress are finished.
pub fn spawn(listener: TcpListener, api: Api, shutdown: CancellationToken, tracker: &TaskTracker) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API and console listening");
    }
    let sampler = api.clone();
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => sampler.sample_ingest(),
            }
        }
    });
    let app = api.router();
    tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
}
