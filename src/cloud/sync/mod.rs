//! Reconciliation runs: the gateway as the hub that keeps the mirror, Golioth and NetNeural
//! agreeing on each device's name, tags, enabled flag and desired document, and carries
//! desired state down to the devices.
//!
//! A run (every `sync.interval`, shortened at random by up to a fifth; at once on
//! `nn-gateway sync now`, which sends SIGUSR1; never two at once):
//! 1. **reads** both clouds at the same time: Golioth's every device with its desired
//!    document in the list's pages ([`golioth`]), NetNeural's devices and assignments changed
//!    since the cursors ([`netneural`]); a cloud whose read fails sits the run out (nothing of
//!    it is committed, its cursors stay) and the next run comes on the retry backoff;
//! 2. applies conflicts an operator **resolved in NetNeural** (the run then merges them);
//! 3. **links** what the clouds sent to the mirror's devices and imports the new ones
//!    ([`link`]);
//! 4. **merges** each device over both clouds ([`crate::reconcile::reconcile_device`]): the
//!    mirror is the hub, so a change taken from one cloud is pushed to the other in the same
//!    run;
//! 5. **writes** the pushes, `concurrency` devices at a time;
//! 6. **commits** in one transaction what the outcome allows ([`crate::reconcile::DevicePlan::settle`]):
//!    the mirror's new values (a changed desired document gets a new change number, so the
//!    downlink publishes it to the device once), the bases of the clouds that took their
//!    writes, the clouds' copies, links, removal marks, conflicts, cursors, and the sync log
//!    (a row for every run, one per device operation);
//! 7. tells NetNeural about new and resolved conflicts (`device_conflicts`) and, for a run that
//!    did anything, writes an `integration_sync_log` row.
//!
//! A run with nothing new makes read requests only. A crash anywhere is safe: every write is
//! of a value the next run would compute again, bases move only after the cloud took the
//! write, and a value written but not committed is found equal next time.

mod focus;
mod golioth;
mod link;
mod netneural;
mod report;
mod run;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cloud::CloudError;
use crate::cloud::uplink::Identity;
use crate::config::Config;
use crate::model::{Target, UnixMillis};
use crate::reconcile::{Fields, Policy};
use crate::store::Store;
pub use focus::{PullRequests, Requested};
pub use golioth::GoliothSpoke;
pub use netneural::{Cursors, NetNeuralSpoke};

/// The first run after a failed one waits at least this long, doubling to `sync.interval`.
pub const RETRY_MIN: Duration = Duration::from_secs(5);

/// A cloud's device as a run reads it.
#[derive(Clone, Debug, Default)]
pub struct RemoteDoc {
    pub id: String,
    pub hardware_ids: Vec<String>,
    /// NetNeural's `external_device_id` (the Golioth id), to link across the clouds.
    pub golioth_id: Option<String>,
    pub fields: Fields,
    pub remote_at: Option<UnixMillis>,
    pub version: Option<String>,
    pub extra: Option<Value>,
    pub deleted: bool,
}

/// What one cloud's read brought.
#[derive(Clone, Debug, Default)]
pub struct Pull {
    pub target: Option<Target>,
    pub docs: Vec<RemoteDoc>,
    /// Every device the cloud has (so a linked device missing from it was removed there).
    pub complete: bool,
    pub cursors: Vec<(&'static str, String)>,
    /// NetNeural device id → sync direction.
    pub directions: Vec<(String, &'static str)>,
}

/// What a run came to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    pub run_id: Option<i64>,
    pub devices: usize,
    pub imported: usize,
    /// Devices whose mirror entry took a cloud's change.
    pub taken: usize,
    /// Devices written to a cloud (per cloud), and those writes that failed.
    pub pushed: usize,
    pub push_failed: usize,
    pub conflicts: usize,
    pub removed: usize,
    pub desired_changed: usize,
    pub errors: Vec<String>,
    pub duration_ms: u64,
}

impl RunReport {
    pub fn is_quiet(&self) -> bool {
        self.imported + self.taken + self.pushed + self.push_failed + self.conflicts + self.removed
            == 0
            && self.errors.is_empty()
    }
}

pub struct Syncer {
    pub store: Store,
    pub golioth: Option<Arc<GoliothSpoke>>,
    pub netneural: Option<Arc<NetNeuralSpoke>>,
    pub policy: Policy,
    pub identity: Identity,
    pub concurrency: usize,
    running: tokio::sync::Mutex<()>,
}

impl Syncer {
    pub fn new(
        store: Store,
        golioth: Option<GoliothSpoke>,
        netneural: Option<NetNeuralSpoke>,
        policy: Policy,
        identity: Identity,
        concurrency: usize,
    ) -> Syncer {
        Syncer {
            store,
            golioth: golioth.map(Arc::new),
            netneural: netneural.map(Arc::new),
            policy,
            identity,
            concurrency: concurrency.max(1),
            running: tokio::sync::Mutex::new(()),
        }
    }
}

/// What the sync task is connected to.
pub struct SyncLinks {
    pub store: Store,
    /// Rung to start a run at once (`nn-gateway sync now` through SIGUSR1, see
    /// [`crate::daemon`]).
    pub now: Arc<Notify>,
    /// Single devices to pull at once (the Golioth webhook), when the API takes webhooks.
    pub pulls: Option<PullRequests>,
    pub shutdown: CancellationToken,
}

/// Builds the syncer from the configuration: `None` when sync is off or no cloud is enabled.
/// Its clients count their requests into `metrics`.
///
/// # Errors
/// When a cloud client cannot be built.
pub fn syncer(
    config: &Config,
    store: Store,
    golioth_key: Option<crate::cloud::ApiKey>,
    netneural_key: Option<crate::cloud::ApiKey>,
    metrics: &crate::metrics::Metrics,
) -> Result<Option<Syncer>, CloudError> {
    if !config.sync.enabled || !(config.golioth.enabled || config.netneural.enabled) {
        return Ok(None);
    }
    let golioth = match (config.golioth.enabled, golioth_key) {
        (true, Some(key)) => Some(GoliothSpoke::new(
            crate::cloud::golioth::Golioth::new(&config.golioth, key)?
                .with_metrics(metrics.clone()),
            config.golioth.desired_path.clone(),
        )),
        _ => None,
    };
    let netneural = match (config.netneural.enabled, netneural_key) {
        (true, Some(key)) => Some(NetNeuralSpoke {
            client: crate::cloud::netneural::NetNeural::new(&config.netneural, key)?
                .with_metrics(metrics.clone()),
        }),
        _ => None,
    };
    let identity = Identity {
        template: config.gateway.cloud_id.clone(),
        site: config.gateway.site_id.clone(),
    };
    let concurrency = config.golioth.concurrency.min(config.netneural.concurrency);
    Ok(Some(Syncer::new(
        store,
        golioth,
        netneural,
        config.sync.policy(),
        identity,
        concurrency,
    )))
}

/// Starts the sync task: a run at once, then every interval (with jitter), on `links.now`
/// (the daemon rings it on SIGUSR1), and on the retry backoff after a failed one.
pub fn spawn(
    syncer: Syncer,
    interval: Duration,
    log_retention: Duration,
    links: SyncLinks,
    tracker: &TaskTracker,
) {
    let span = tracing::info_span!("sync");
    let syncer = Arc::new(syncer);
    if let Some(pulls) = links.pulls.clone() {
        tracker.spawn(
            focus::run(syncer.clone(), pulls, links.shutdown.clone()).instrument(span.clone()),
        );
    }
    tracker.spawn(
        async move {
            let mut backoff = Backoff::new(RETRY_MIN, interval.max(RETRY_MIN));
            let mut wait = Duration::ZERO;
            let mut last_error: Option<String> = None;
            loop {
                tokio::select! {
                    () = links.shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                    () = links.now.notified() => {}
                }
                let result = tokio::select! {
                    () = links.shutdown.cancelled() => return,
                    r = syncer.run_once() => r,
                };
                let failed = match result {
                    Ok(r) => {
                        log_run(&r, &mut last_error);
                        !r.errors.is_empty()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sync run not committed (the next one tries again)");
                        true
                    }
                };
                wait = if failed {
                    backoff.next_delay().max(RETRY_MIN).min(interval)
                } else {
                    backoff.reset();
                    jittered(interval)
                };
                let cutoff = UnixMillis(UnixMillis::now().0 - log_retention.as_millis() as i64);
                if let Err(e) = syncer.store.call(move |db| db.prune_sync_log(cutoff)).await {
                    tracing::debug!(error = %e, "sync log not pruned");
                }
            }
        }
        .instrument(span),
    );
}

/// `interval` shortened by up to a fifth, at random.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(1.0 - 0.2 * fastrand::f64())
}

fn log_run(r: &RunReport, last_error: &mut Option<String>) {
    if let Some(first) = r.errors.first() {
        if last_error.as_deref() != Some(first.as_str()) {
            tracing::warn!(errors = %r.errors.join("; "), "sync run incomplete");
        }
        *last_error = Some(first.clone());
    } else if last_error.take().is_some() {
        tracing::info!("sync runs complete again");
    }
    if r.is_quiet() {
        tracing::debug!(
            devices = r.devices,
            ms = r.duration_ms,
            "sync run: nothing new"
        );
    } else {
        tracing::info!(
            devices = r.devices,
            imported = r.imported,
            taken = r.taken,
            pushed = r.pushed,
            push_failed = r.push_failed,
            conflicts = r.conflicts,
            removed = r.removed,
            desired_published = r.desired_changed,
            ms = r.duration_ms,
            "sync run"
        );
    }
}
