//! The retention task: every [`RETENTION_EVERY`] it has the store delete telemetry past its age
//! or beyond the size ceiling ([`crate::store::retention`] holds the policy's SQL), and logs
//! what went.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::StorageConfig;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::retention::{CHUNK, Policy, RETENTION_EVERY, Report};

/// What the retention task is connected to inside the daemon.
pub struct Links {
    pub store: Store,
    /// Counts what each pass deleted.
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

/// Starts the retention task on `tracker`: a pass at once, then every [`RETENTION_EVERY`],
/// until `links.shutdown` fires. Nothing talks to it once it runs, so it has no handle.
pub fn spawn(cfg: &StorageConfig, links: Links, tracker: &TaskTracker) {
    let policy = Policy {
        max_bytes: cfg.max_size_mib.saturating_mul(1024 * 1024),
        max_age: Some(cfg.telemetry_max_age).filter(|age| !age.is_zero()),
        chunk: CHUNK,
    };
    let span = tracing::info_span!("retention");
    tracker.spawn(run(policy, links).instrument(span));
}

async fn run(policy: Policy, links: Links) {
    let mut ticker = tokio::time::interval(RETENTION_EVERY);
    loop {
        tokio::select! {
            () = links.shutdown.cancelled() => return,
            _ = ticker.tick() => enforce_retention(&links.store, &links.metrics, policy).await,
        }
    }
}

/// Deletes telemetry past its age or beyond the size ceiling, and says what went. A pass is
/// bounded; while work is left, the next one follows once the writes queued meanwhile are in.
async fn enforce_retention(store: &Store, metrics: &Metrics, policy: Policy) {
    let mut total = Report::default();
    loop {
        match store.call(move |db| db.enforce_retention(&policy)).await {
            Ok(r) => {
                metrics.retention_deleted(&r);
                total.aged_out += r.aged_out;
                total.dropped_delivered += r.dropped_delivered;
                total.dropped_undelivered += r.dropped_undelivered;
                if !r.more {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention pass failed; trying again at the next one");
                break;
            }
        }
    }
    if total.dropped_undelivered > 0 {
        tracing::warn!(
            undelivered = total.dropped_undelivered,
            delivered = total.dropped_delivered,
            aged_out = total.aged_out,
            "database at its size ceiling (storage.max_size_mib): deleted telemetry no cloud has received"
        );
    } else if total != Report::default() {
        tracing::info!(
            delivered = total.dropped_delivered,
            aged_out = total.aged_out,
            "retention deleted old telemetry"
        );
    }
}
