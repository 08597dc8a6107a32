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
//!    (a row for the run, one per device operation);
//! 7. tells NetNeural about new and resolved conflicts (`device_conflicts`) and, for a run that
//!    did anything, writes an `integration_sync_log` row.
//!
//! A run with nothing new makes read requests only. A crash anywhere is safe: every write is
//! of a value the next run would compute again, bases move only after the cloud took the
//! write, and a value written but not committed is found equal next time.

mod golioth;
mod link;
mod netneural;
mod report;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cloud::CloudError;
use crate::cloud::uplink::Identity;
use crate::config::Config;
use crate::model::{Target, UnixMillis};
use crate::reconcile::{self, Fields, Policy, Spoke};
use crate::store::sync::{LogEntry, RemoteCopy, Resolution, SyncCommit, SyncDevice};
use crate::store::{Store, StoreError};
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

/// One device's merge, between the writes and the commit.
struct Work {
    index: usize,
    local: Fields,
    plan: reconcile::DevicePlan,
    /// Per spoke merged: its base before, stored copy, copy this run (as read).
    spokes: Vec<link::SpokeOutcome>,
}

type PushResult = (usize, Target, Result<Option<RemoteCopy>, CloudError>);

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

    /// One run. Cloud failures are in the report; only a store failure is an error.
    ///
    /// # Errors
    /// The store's; nothing of the run is then committed.
    pub async fn run_once(&self) -> Result<RunReport, StoreError> {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let started_at = UnixMillis::now();
        let mut report = RunReport::default();
        let cursors = self
            .store
            .call(|db| {
                Ok(Cursors {
                    devices: db.sync_cursor(Target::NetNeural, netneural::DEVICES_CURSOR)?,
                    assignments: db
                        .sync_cursor(Target::NetNeural, netneural::ASSIGNMENTS_CURSOR)?,
                })
            })
            .await?;
        let (g, n) = tokio::join!(
            async {
                match &self.golioth {
                    Some(s) => Some(s.pull().await),
                    None => None,
                }
            },
            async {
                match &self.netneural {
                    Some(s) => Some(s.pull(&cursors).await),
                    None => None,
                }
            }
        );
        let mut pulls = Vec::new();
        for pulled in [g, n].into_iter().flatten() {
            match pulled {
                Ok(p) => pulls.push(p),
                Err(e) => report.errors.push(format!("{e} (will be retried)")),
            }
        }
        let netneural_read = pulls.iter().any(|p| p.target == Some(Target::NetNeural));
        if netneural_read && let Some(nn) = &self.netneural {
            report::apply_remote_resolutions(&self.store, nn, &mut report).await?;
        }

        let mut devices = self.store.call(|db| db.sync_devices()).await?;
        let mut linked = self.link_all(&devices, &pulls);
        let imports: Vec<link::Import> =
            linked.iter().flat_map(|(_, l)| l.imports.clone()).collect();
        if !imports.is_empty() {
            report.imported = imports.len();
            let imports_for_store = imports.clone();
            self.store
                .call(move |db| {
                    for i in &imports_for_store {
                        db.sync_import(&i.key, link::origin_of(i.target), i.target, &i.remote_id)?;
                    }
                    Ok(())
                })
                .await?;
            devices = self.store.call(|db| db.sync_devices()).await?;
            linked = self.link_all(&devices, &pulls);
        }
        let directions: HashMap<&str, &'static str> = pulls
            .iter()
            .flat_map(|p| p.directions.iter().map(|(id, d)| (id.as_str(), *d)))
            .collect();

        let mut commits: Vec<crate::store::sync::DeviceCommit> = Vec::new();
        let mut log: Vec<LogEntry> = Vec::new();
        let mut work: Vec<Work> = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let mut commit = crate::store::sync::DeviceCommit {
                id: device.id,
                ..Default::default()
            };
            let mut direction_word = device.netneural_direction.clone();
            if let Some(id) = device.netneural_id.as_deref()
                && let Some(d) = directions.get(id)
                && direction_word.as_deref() != Some(*d)
            {
                direction_word = Some((*d).to_owned());
                commit.netneural_direction = Some(direction_word.clone());
            }
            let mut spokes = Vec::new();
            let mut spoke_info = Vec::new();
            for (target, l) in &linked {
                let seen = l.seen.get(&i);
                let state = device.spoke(*target);
                if let Some(seen) = seen {
                    if let (Some(id), Some(_)) = (&seen.relink, &seen.doc) {
                        commit.links.push((*target, id.clone()));
                    }
                    let was_removed = device.removed_at(*target).is_some();
                    if seen.removed != was_removed {
                        commit
                            .removed
                            .push((*target, seen.removed.then(UnixMillis::now)));
                        if seen.removed {
                            report.removed += 1;
                            log.push(device_log(*target, "removed", device.id, "completed", None));
                        }
                    }
                    if seen.removed {
                        continue;
                    }
                }
                // NetNeural sends only what changed: the rest merges against its last copy.
                let copy_now = match seen.and_then(|s| s.doc.as_ref()) {
                    Some(doc) => Some(link::copy_of(doc)),
                    None if *target == Target::NetNeural
                        && device.netneural_id.is_some()
                        && device.netneural_removed_at.is_none() =>
                    {
                        state.copy.clone()
                    }
                    None => None,
                };
                let Some(copy) = copy_now else { continue };
                let direction = match target {
                    Target::NetNeural => link::direction(direction_word.as_deref()),
                    Target::Golioth => reconcile::Direction::BOTH,
                };
                spokes.push(Spoke {
                    target: *target,
                    base: state.base.clone(),
                    remote: copy.fields.clone(),
                    remote_at: copy.remote_at,
                    direction,
                    held: state.held.clone(),
                });
                spoke_info.push(link::SpokeOutcome {
                    target: *target,
                    base_before: state.base.clone(),
                    copy_before: state.copy.clone(),
                    remote_at: copy.remote_at,
                    copy_now: Some(copy),
                });
            }
            let local = link::local_fields(device);
            let plan = reconcile::reconcile_device(&local, device.local_at, &spokes, &self.policy);
            if !link::is_empty(&commit) {
                commits.push(commit);
            }
            if spokes.is_empty() {
                continue;
            }
            report.devices += 1;
            work.push(Work {
                index: i,
                local,
                plan,
                spokes: spoke_info,
            });
        }

        let pushed = self.push_all(&devices, &work).await;
        for w in &work {
            let device = &devices[w.index];
            let results: Vec<&PushResult> =
                pushed.iter().filter(|(i, _, _)| *i == w.index).collect();
            let ok = |t: Target| {
                results
                    .iter()
                    .find(|(_, target, _)| *target == t)
                    .is_none_or(|(_, _, r)| matches!(r, Ok(Some(_))))
            };
            let settlement = w.plan.settle(ok);
            let spokes: Vec<link::SpokeOutcome> = w
                .spokes
                .iter()
                .map(|s| {
                    let written = results
                        .iter()
                        .find(|(_, t, _)| *t == s.target)
                        .and_then(|(_, _, r)| r.as_ref().ok().cloned().flatten());
                    link::SpokeOutcome {
                        copy_now: written.or_else(|| s.copy_now.clone()),
                        ..s.clone()
                    }
                })
                .collect();
            let commit = link::device_commit(device, &w.local, &settlement, &spokes, &self.policy);
            if commit.meta.is_some() || commit.desired.is_some() {
                report.taken += 1;
                log.push(LogEntry {
                    details: Some(json!({"fields": changed_fields(&w.local, &settlement.local)})),
                    ..device_log_entry("mirror", "take", device.id, "completed", None)
                });
            }
            for (_, target, r) in &results {
                let fields: Vec<String> = w
                    .plan
                    .pushed_fields(*target)
                    .into_iter()
                    .map(|(f, _)| f)
                    .collect();
                let (outcome, error) = match r {
                    Ok(Some(_)) => {
                        report.pushed += 1;
                        ("completed", None)
                    }
                    Ok(None) => {
                        report.push_failed += 1;
                        (
                            "failed",
                            Some(format!(
                                "{target}: the device changed there since it was read; written at the next run",
                                target = target.as_str()
                            )),
                        )
                    }
                    Err(e) => {
                        report.push_failed += 1;
                        ("failed", Some(format!("{e} (will be retried)")))
                    }
                };
                if let Some(e) = &error {
                    report.errors.push(e.clone());
                }
                log.push(LogEntry {
                    details: Some(json!({ "fields": fields })),
                    ..device_log_entry(target.as_str(), "push", device.id, outcome, error)
                });
            }
            for c in &commit.conflicts {
                report.conflicts += 1;
                log.push(LogEntry {
                    conflicts: 1,
                    details: Some(
                        json!({"field": c.field, "status": c.status, "strategy": c.strategy}),
                    ),
                    ..device_log_entry(c.target.as_str(), "conflict", device.id, "completed", None)
                });
            }
            if !link::is_empty(&commit) {
                commits.push(commit);
            }
        }

        let mut cursors = Vec::new();
        for p in &pulls {
            if let Some(target) = p.target {
                cursors.extend(p.cursors.iter().map(|(k, v)| (target, *k, v.clone())));
            }
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        let outcome = match (report.errors.is_empty(), pulls.is_empty()) {
            (true, _) => "completed",
            (false, true) => "failed",
            (false, false) => "partial",
        };
        // A quiet run leaves no row: the log holds what happened, not every look.
        let mut rows = Vec::with_capacity(log.len() + 1);
        if !report.is_quiet() {
            rows.push(LogEntry {
                target: pulls
                    .iter()
                    .filter_map(|p| p.target.map(Target::as_str))
                    .collect::<Vec<_>>()
                    .join(","),
                direction: "both",
                operation: "run".into(),
                count: report.devices as i64,
                conflicts: report.conflicts as i64,
                outcome,
                error: (!report.errors.is_empty()).then(|| report.errors.join("; ")),
                duration_ms: report.duration_ms as i64,
                details: Some(json!({
                    "imported": report.imported, "taken": report.taken, "pushed": report.pushed,
                    "push_failed": report.push_failed, "removed": report.removed,
                })),
                device_id: None,
            });
            rows.extend(log);
        }
        let summary = json!({
            "at": UnixMillis::now().to_rfc3339(),
            "started_ms": started_at.0,
            "devices": report.devices, "imported": report.imported, "taken": report.taken,
            "pushed": report.pushed, "push_failed": report.push_failed,
            "conflicts": report.conflicts, "removed": report.removed,
            "errors": report.errors, "duration_ms": report.duration_ms,
        });
        let commit = SyncCommit {
            devices: commits,
            cursors,
            log: rows,
            summary: Some(summary),
        };
        let done = self.store.call(move |db| db.sync_commit(&commit)).await?;
        report.run_id = done.run_id;
        report.desired_changed = done.desired_changed;
        if netneural_read && let Some(nn) = &self.netneural {
            report::tell_netneural(&self.store, nn, &devices, &report).await;
        }
        Ok(report)
    }

    fn link_all(&self, devices: &[SyncDevice], pulls: &[Pull]) -> Vec<(Target, link::Linked)> {
        pulls
            .iter()
            .filter_map(|p| {
                let target = p.target?;
                Some((
                    target,
                    link::link(target, devices, &p.docs, p.complete, &self.identity),
                ))
            })
            .collect()
    }

    /// Every push of the run, `concurrency` at a time.
    async fn push_all(&self, devices: &[SyncDevice], work: &[Work]) -> Vec<PushResult> {
        let gate = Arc::new(Semaphore::new(self.concurrency));
        let mut set: JoinSet<PushResult> = JoinSet::new();
        for w in work {
            for s in &w.spokes {
                let Some(after) = w.plan.pushes(s.target) else {
                    continue;
                };
                let Some(remote_id) = devices[w.index].remote_id(s.target).map(str::to_owned)
                else {
                    continue;
                };
                let after = after.clone();
                let pushed = w.plan.pushed_fields(s.target);
                let copy = s.copy_now.clone().unwrap_or_default();
                let (index, target, gate) = (w.index, s.target, gate.clone());
                let golioth = self.golioth.clone();
                let netneural = self.netneural.clone();
                set.spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    let result = match (target, golioth, netneural) {
                        (Target::Golioth, Some(g), _) => {
                            g.push(&remote_id, &after, &pushed).await.map(|()| {
                                Some(RemoteCopy {
                                    fields: after,
                                    ..copy
                                })
                            })
                        }
                        (Target::NetNeural, _, Some(n)) => {
                            n.push(&remote_id, &copy, &after, &pushed).await
                        }
                        _ => Ok(None),
                    };
                    (index, target, result)
                });
            }
        }
        let mut out = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok(r) = joined {
                out.push(r);
            }
        }
        out
    }
}

fn changed_fields(before: &Fields, after: &Fields) -> Vec<String> {
    before
        .keys()
        .chain(after.keys())
        .filter(|f| before.get(*f) != after.get(*f))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn device_log_entry(
    target: &str,
    operation: &str,
    device_id: i64,
    outcome: &'static str,
    error: Option<String>,
) -> LogEntry {
    LogEntry {
        target: target.to_owned(),
        direction: match operation {
            "push" => "up",
            "take" | "removed" => "down",
            _ => "both",
        },
        operation: operation.to_owned(),
        device_id: Some(device_id),
        count: 1,
        outcome,
        error,
        ..LogEntry::default()
    }
}

fn device_log(
    target: Target,
    operation: &str,
    device_id: i64,
    outcome: &'static str,
    error: Option<String>,
) -> LogEntry {
    device_log_entry(target.as_str(), operation, device_id, outcome, error)
}

/// What the sync task is connected to.
pub struct SyncLinks {
    pub store: Store,
    /// Rung to start a run at once (`nn-gateway sync now` through SIGUSR1).
    pub now: Arc<Notify>,
    pub shutdown: CancellationToken,
}

/// Builds the syncer from the configuration: `None` when sync is off or no cloud is enabled.
///
/// # Errors
/// When a cloud client cannot be built.
pub fn syncer(
    config: &Config,
    store: Store,
    golioth_key: Option<crate::cloud::ApiKey>,
    netneural_key: Option<crate::cloud::ApiKey>,
) -> Result<Option<Syncer>, CloudError> {
    if !config.sync.enabled || !(config.golioth.enabled || config.netneural.enabled) {
        return Ok(None);
    }
    let golioth = match (config.golioth.enabled, golioth_key) {
        (true, Some(key)) => Some(GoliothSpoke::new(
            crate::cloud::golioth::Golioth::new(&config.golioth, key)?,
            config.golioth.desired_path.clone(),
        )),
        _ => None,
    };
    let netneural = match (config.netneural.enabled, netneural_key) {
        (true, Some(key)) => Some(NetNeuralSpoke {
            client: crate::cloud::netneural::NetNeural::new(&config.netneural, key)?,
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

/// Starts the sync task: a run at once, then every interval (with jitter), on `links.now`,
/// and on the retry backoff after a failed one. Also listens for SIGUSR1.
pub fn spawn(
    syncer: Syncer,
    interval: Duration,
    log_retention: Duration,
    links: SyncLinks,
    tracker: &TaskTracker,
) {
    let now = links.now.clone();
    let shutdown = links.shutdown.clone();
    tracker.spawn(async move {
        let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        else {
            return;
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                got = usr1.recv() => {
                    if got.is_none() { return }
                    tracing::info!("SIGUSR1: sync now");
                    now.notify_one();
                }
            }
        }
    });
    let span = tracing::info_span!("sync");
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
                        tracing::warn!(error = %e, "sync run not committed (will be retried)");
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

/// Resolves a conflict (CLI or NetNeural): see [`crate::store::Db::resolve_conflict`].
pub fn resolution_of(choice: &str, value: Option<Value>) -> Option<Resolution> {
    match (choice, value) {
        (_, Some(v)) => Some(Resolution::Value(v)),
        ("local", None) => Some(Resolution::Local),
        ("remote", None) => Some(Resolution::Remote),
        _ => None,
    }
}
