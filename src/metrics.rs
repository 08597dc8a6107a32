//! The daemon's Prometheus metrics: one registry that every part counts into, served by the
//! local API at `GET /metrics` in the Prometheus text exposition format (version 0.0.4,
//! [`CONTENT_TYPE`]).
//!
//! [`Metrics`] is a cheap handle (an `Arc` inside). The daemon makes one per run
//! ([`crate::daemon::run_reloadable`]) and hands clones to its parts through their links;
//! there is no global registry, so several daemons in one process (the tests) count apart.
//! A part built without one (the CLI's store, a test's client) counts into a registry of its
//! own that nobody reads.
//!
//! # Serving it
//!
//! Counters and histograms move as the work happens. What lives in the database or in
//! [`Health`] is read when scraped: the API's handler for `GET /metrics` does
//!
//! ```text
//! tokio::task::spawn_blocking(move || {
//!     let db = Db::open_readonly(&path)?;
//!     metrics.refresh_from(&db)
//! }).await??;
//! metrics.refresh_health(&health);
//! let body = metrics.encode(); // Content-Type: metrics::CONTENT_TYPE
//! ```
//!
//! # The metrics
//!
//! Ingest (counted by the store thread at each group commit, so "ingested" means committed):
//! - `nngw_messages_ingested_total{transport,kind}` — messages stored; `transport` is `mqtt`
//!   or `coap`, `kind` is `state` or `telemetry`.
//! - `nngw_messages_rejected_total{transport,reason}` — messages refused and kept in the
//!   rejected table; `reason` is one word of [`RejectCause`]: `topic`, `device_key`,
//!   `too_large`, `decode`, `invalid`, `unstorable`.
//! - `nngw_messages_duplicate_total{transport}` — MQTT redeliveries recognised as already
//!   stored (acknowledged, not stored again).
//! - `nngw_store_commit_duration_seconds` — histogram of one group commit's transaction.
//! - `nngw_store_commit_group_size` — histogram of the writes in one group commit (at most
//!   [`crate::store::MAX_BATCH`]).
//!
//! The clouds (counted where both clients send, `cloud::send_dated`):
//! - `nngw_cloud_requests_total{cloud,operation,status}` — requests answered or failed;
//!   `cloud` is `golioth` or `netneural`, `operation` the request's method and path template
//!   as errors name it (`GET /rest/v1/devices`; never ids or query values), `status` the HTTP
//!   status code or `error` when no answer came (connect, TLS, reset, timeout).
//! - `nngw_cloud_request_duration_seconds{cloud,operation}` — histogram of their latency,
//!   from sending to the whole body read.
//! - `nngw_cloud_lane_state{cloud,state}` — 1 for the lane's current state, 0 for the others:
//!   `disabled`, `online`, `backing_off`, `offline`, `auth_failed` (read from [`Health`]).
//! - `nngw_outbox_rows{cloud,state}` — outbox rows per state: `pending`, `in_flight`, `done`,
//!   `dead` (from the database).
//! - `nngw_outbox_oldest_pending_age_seconds{cloud}` — age of the oldest row not yet delivered
//!   (pending or in flight); 0 when there is none (from the database).
//! - `nngw_telemetry_backlog_points{cloud}` — telemetry points above the cloud's delivery
//!   cursor, not yet settled there (telemetry is owed through the cursor, not outbox rows); only
//!   for clouds that take telemetry (`netneural`) (from the database).
//! - `nngw_telemetry_oldest_undelivered_age_seconds{cloud}` — age (since reception) of the
//!   oldest of those points; 0 when there is none (from the database).
//!
//! The rest:
//! - `nngw_mqtt_connected` — 1 while the link to the site broker is up (from [`Health`]).
//! - `nngw_conflicts_pending` — reconciliation conflicts waiting for a decision.
//! - `nngw_telemetry_deleted_total{reason}` — telemetry points deleted by retention: `age`
//!   (past `storage.telemetry_max_age`), `size_delivered` and `size_undelivered` (by the size
//!   ceiling `storage.max_size_mib`; the second kind no cloud had received).
//! - `nngw_database_bytes`, `nngw_database_wal_bytes` — the database file and its WAL.
//! - `nngw_build_info{version}` — always 1.
//!
//! # Cost
//!
//! Ingest runs at over 100k messages/s through one store thread, so the ingest families are
//! resolved once, at start, into plain counters indexed by transport, kind and cause; a group
//! commit adds its counts with one atomic add per series it touched, not a label lookup per
//! message. Cloud requests (at most a few hundred a second) look their labels up per request.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::health::{Health, LaneState, LinkState};
use crate::model::{Outcome, Reading, RejectCause, Target, WriteOp};
use crate::store::retention::Report;
use crate::store::{Db, StoreError};

mod labels;
use labels::*;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The registry and every metric in it. Cheap to clone: clones count into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    /// `[transport][kind]`, resolved at start (see the module doc's "Cost").
    ingested: [[Counter; KINDS.len()]; TRANSPORTS.len()],
    /// `[transport][cause]`, in [`RejectCause::ALL`]'s order.
    rejected: [[Counter; RejectCause::ALL.len()]; TRANSPORTS.len()],
    duplicates: [Counter; TRANSPORTS.len()],
    commit_seconds: Histogram,
    group_size: Histogram,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<OperationLabels>,
    lane_state: Family<CloudStateLabels, Gauge>,
    outbox_rows: Family<CloudStateLabels, Gauge>,
    oldest_pending: Family<CloudLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    telemetry_backlog: Family<CloudLabels, Gauge>,
    telemetry_oldest: Family<CloudLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Aged out, dropped delivered, dropped undelivered.
    retention_deleted: [Counter; 3],
    mqtt_connected: Gauge,
    conflicts_pending: Gauge,
    database_bytes: Gauge,
    wal_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, counters at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();

        let ingested_family = Family::<IngestLabels, Counter>::default();
        registry.register(
            "nngw_messages_ingested",
            "Messages stored, per transport and kind",
            ingested_family.clone(),
        );
        let ingested = TRANSPORTS.map(|transport| {
            KINDS.map(|kind| ingested_family.get_or_create_owned(&IngestLabels { transport, kind }))
        });

        let rejected_family = Family::<RejectLabels, Counter>::default();
        registry.register(
            "nngw_messages_rejected",
            "Messages refused and kept in the rejected table, per transport and reason",
            rejected_family.clone(),
        );
        let rejected = TRANSPORTS.map(|transport| {
            RejectCause::ALL.map(|cause| {
                rejected_family.get_or_create_owned(&RejectLabels {
                    transport,
                    reason: cause.as_str(),
                })
            })
        });

        let duplicates_family = Family::<TransportLabels, Counter>::default();
        registry.register(
            "nngw_messages_duplicate",
            "Broker redeliveries recognised as already stored and not stored again",
            duplicates_family.clone(),
        );
        let duplicates = TRANSPORTS
            .map(|transport| duplicates_family.get_or_create_owned(&TransportLabels { transport }));

        let commit_seconds = Histogram::new(commit_buckets());
        registry.register(
            "nngw_store_commit_duration_seconds",
            "Time one group commit of ingest writes took",
            commit_seconds.clone(),
        );
        let group_size = Histogram::new(group_buckets());
        registry.register(
            "nngw_store_commit_group_size",
            "Writes committed together in one group commit",
            group_size.clone(),
        );

        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "nngw_cloud_requests",
            "Requests to the clouds, per cloud, operation and HTTP status (error: no answer)",
            requests.clone(),
        );
        let request_seconds: Histograms<OperationLabels> =
            Family::new_with_constructor(|| Histogram::new(request_buckets()));
        registry.register(
            "nngw_cloud_request_duration_seconds",
            "Latency of requests to the clouds, per cloud and operation",
            request_seconds.clone(),
        );

        let lane_state = Family::<CloudStateLabels, Gauge>::default();
        registry.register(
            "nngw_cloud_lane_state",
            "1 for the current state of each cloud's outbox lane, 0 for the others",
            lane_state.clone(),
        );
        let outbox_rows = Family::<CloudStateLabels, Gauge>::default();
        registry.register(
            "nngw_outbox_rows",
            "Outbox rows per cloud and state",
            outbox_rows.clone(),
        );
        let oldest_pending = Family::<CloudLabels, Gauge<f64, _>>::default();
        registry.register(
            "nngw_outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox row not yet delivered (pending or in flight), 0 if none",
            oldest_pending.clone(),
        );

        let telemetry_backlog = Family::<CloudLabels, Gauge>::default();
        registry.register(
            "nngw_telemetry_backlog_points",
            "Telemetry points above a cloud's delivery cursor, not yet settled there",
            telemetry_backlog.clone(),
        );
        let telemetry_oldest = Family::<CloudLabels, Gauge<f64, _>>::default();
        registry.register(
            "nngw_telemetry_oldest_undelivered_age_seconds",
            "Age of the oldest telemetry point a cloud has not settled, 0 if none",
            telemetry_oldest.clone(),
        );

        let retention_family = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "nngw_telemetry_deleted",
            "Telemetry points deleted by retention: past their age, or by the size ceiling",
            retention_family.clone(),
        );
        let retention_deleted = ["age", "size_delivered", "size_undelivered"]
            .map(|reason| retention_family.get_or_create_owned(&ReasonLabels { reason }));

        let mqtt_connected = Gauge::default();
        registry.register(
            "nngw_mqtt_connected",
            "1 while the link to the site's MQTT broker is up",
            mqtt_connected.clone(),
        );
        let conflicts_pending = Gauge::default();
        registry.register(
            "nngw_conflicts_pending",
            "Reconciliation conflicts waiting for a decision",
            conflicts_pending.clone(),
        );
        let database_bytes = Gauge::default();
        registry.register(
            "nngw_database_bytes",
            "Size of the SQLite database file",
            database_bytes.clone(),
        );
        let wal_bytes = Gauge::default();
        registry.register(
            "nngw_database_wal_bytes",
            "Size of the database's write-ahead log",
            wal_bytes.clone(),
        );
        registry.register(
            "nngw_build",
            "The running build",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );

        let metrics = Metrics(Arc::new(Inner {
            registry,
            ingested,
            rejected,
            duplicates,
            commit_seconds,
            group_size,
            requests,
            request_seconds,
            lane_state,
            outbox_rows,
            oldest_pending,
            telemetry_backlog,
            telemetry_oldest,
            retention_deleted,
            mqtt_connected,
            conflicts_pending,
            database_bytes,
            wal_bytes,
        }));
        // Every series that is known up front exists from the start, at 0: a rate over a
        // series that appears only at its first event misses that event.
        metrics.refresh_health(&Health::default());
        for target in Target::ALL {
            metrics.set_outbox(target, &[], None);
            if target.takes_telemetry() {
                metrics.set_telemetry_backlog(target, 0, None);
            }
        }
        metrics
    }

    /// Counts one group commit: what was stored, rejected or recognised as a duplicate, per
    /// transport, and how long the transaction took for how many writes. Called by the store
    /// thread after each commit, with `results` in the order of `ops`.
    pub fn commit<E>(&self, ops: &[WriteOp], results: &[Result<Outcome, E>], took: Duration) {
        let m = &self.0;
        let mut ingested = [[0u64; KINDS.len()]; TRANSPORTS.len()];
        let mut rejected = [[0u64; RejectCause::ALL.len()]; TRANSPORTS.len()];
        let mut duplicates = [0u64; TRANSPORTS.len()];
        for (op, result) in ops.iter().zip(results) {
            let Ok(outcome) = result else { continue };
            let (origin, kind, cause) = match op {
                WriteOp::Ingest(msg) => {
                    let kind = match msg.reading {
                        Reading::State(_) => 0,
                        Reading::Telemetry(_) => 1,
                    };
                    (msg.origin, kind, RejectCause::Unstorable)
                }
                WriteOp::Reject(rej) => (rej.origin, 0, rej.cause),
            };
            let Some(t) = transport_index(origin) else {
                continue;
            };
            match outcome {
                Outcome::Stored { .. } => ingested[t][kind] += 1,
                Outcome::Rejected => rejected[t][cause_index(cause)] += 1,
                Outcome::Duplicate => duplicates[t] += 1,
            }
        }
        for t in 0..TRANSPORTS.len() {
            for (counter, n) in m.ingested[t].iter().zip(ingested[t]) {
                add(counter, n);
            }
            for (counter, n) in m.rejected[t].iter().zip(rejected[t]) {
                add(counter, n);
            }
            add(&m.duplicates[t], duplicates[t]);
        }
        m.commit_seconds.observe(took.as_secs_f64());
        m.group_size.observe(ops.len() as f64);
    }

    /// Counts one request to a cloud: `operation` is the request's name as its
    /// [`crate::cloud::CloudError`] would give it, `status` the HTTP status of the answer, or
    /// `None` when none came.
    pub fn cloud_request(
        &self,
        target: Target,
        operation: &str,
        status: Option<u16>,
        took: Duration,
    ) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        let m = &self.0;
        m.requests
            .get_or_create(&RequestLabels {
                cloud: target.as_str(),
                operation: operation.to_owned(),
                status,
            })
            .inc();
        m.request_seconds
            .get_or_create(&OperationLabels {
                cloud: target.as_str(),
                operation: operation.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts what one retention pass deleted.
    pub fn retention_deleted(&self, report: &Report) {
        let [age, delivered, undelivered] = &self.0.retention_deleted;
        age.inc_by(report.aged_out);
        delivered.inc_by(report.dropped_delivered);
        undelivered.inc_by(report.dropped_undelivered);
    }

    /// Reads the gauges that live in the database: outbox rows per cloud and state, the age of
    /// each cloud's oldest undelivered row, the telemetry backlog and its age, conflicts
    /// pending, the database's and WAL's sizes.
    /// Blocking (SQLite): call it off the async executor, on a connection of its own
    /// ([`Db::open_readonly`]), so a scrape never waits behind the store thread's queue.
    ///
    /// # Errors
    /// When the database cannot be read; the gauges keep their last values.
    pub fn refresh_from(&self, db: &Db) -> Result<(), StoreError> {
        let gauges = db.gauges()?;
        let now = crate::model::UnixMillis::now();
        let age = |at: crate::model::UnixMillis| {
            Duration::from_millis(u64::try_from(now.0 - at.0).unwrap_or(0))
        };
        for target in Target::ALL {
            let rows: Vec<(&str, i64)> = gauges
                .outbox
                .iter()
                .filter(|c| c.target == target.as_str())
                .map(|c| (c.state.as_str(), c.rows))
                .collect();
            let oldest = gauges
                .oldest_undelivered
                .iter()
                .find(|(t, _)| t == target.as_str())
                .map(|(_, at)| age(*at));
            self.set_outbox(target, &rows, oldest);
            if let Some(b) = gauges
                .telemetry_backlog
                .iter()
                .find(|b| b.target == target.as_str())
            {
                self.set_telemetry_backlog(target, b.points, b.oldest.map(age));
            }
        }
        let m = &self.0;
        m.conflicts_pending.set(gauges.conflicts_pending);
        m.database_bytes.set(clamp(gauges.db_bytes));
        m.wal_bytes.set(clamp(gauges.wal_bytes));
        Ok(())
    }

    fn set_outbox(&self, target: Target, rows: &[(&str, i64)], oldest: Option<Duration>) {
        let m = &self.0;
        let cloud = target.as_str();
        for state in OUTBOX_STATES {
            let n = rows
                .iter()
                .filter(|(s, _)| *s == state)
                .map(|(_, n)| n)
                .sum();
            m.outbox_rows
                .get_or_create(&CloudStateLabels { cloud, state })
                .set(n);
        }
        m.oldest_pending
            .get_or_create(&CloudLabels { cloud })
            .set(oldest.unwrap_or_default().as_secs_f64());
    }

    fn set_telemetry_backlog(&self, target: Target, points: i64, oldest: Option<Duration>) {
        let labels = CloudLabels {
            cloud: target.as_str(),
        };
        let m = &self.0;
        m.telemetry_backlog.get_or_create(&labels).set(points);
        m.telemetry_oldest
            .get_or_create(&labels)
            .set(oldest.unwrap_or_default().as_secs_f64());
    }

    /// Reads the gauges that live in [`Health`]: each lane's state and the MQTT link.
    pub fn refresh_health(&self, health: &Health) {
        let m = &self.0;
        let clouds = health.clouds();
        for target in Target::ALL {
            let current = clouds.get(&target).map_or(LaneState::Disabled, |c| c.state);
            for state in LANE_STATES {
                m.lane_state
                    .get_or_create(&CloudStateLabels {
                        cloud: target.as_str(),
                        state: lane_word(state),
                    })
                    .set(i64::from(state == current));
            }
        }
        m.mqtt_connected
            .set(i64::from(health.mqtt() == LinkState::Connected));
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4), to serve with
    /// [`CONTENT_TYPE`].
    /// Messages stored so far, every transport and kind (the API's ingest rate).
    pub fn ingested_total(&self) -> u64 {
        self.0
            .ingested
            .iter()
            .flatten()
            .map(prometheus_client::metrics::counter::Counter::get)
            .sum()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0.registry);
        out
    }
}

fn add(counter: &Counter, n: u64) {
    if n > 0 {
        counter.inc_by(n);
    }
}

fn clamp(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
