//! One sync run, step by step (see the module above for the order and its guarantees).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Cursors, Pull, RunReport, Syncer, link, netneural, report};
use crate::cloud::CloudError;
use crate::model::{Target, UnixMillis};
use crate::reconcile::{self, Fields, Spoke};
use crate::store::StoreError;
use crate::store::sync::{DeviceCommit, LogEntry, RemoteCopy, SyncCommit, SyncDevice};

/// One device's merge, between the writes and the commit.
struct Work {
    index: usize,
    local: Fields,
    plan: reconcile::DevicePlan,
    /// Per spoke merged: its base before, stored copy, copy this run (as read).
    spokes: Vec<link::SpokeOutcome>,
}

/// What a run accumulates: its report, its log rows, the devices' commits.
#[derive(Default)]
struct Tally {
    report: RunReport,
    log: Vec<LogEntry>,
    commits: Vec<DeviceCommit>,
}

type PushResult = (usize, Target, Result<Option<RemoteCopy>, CloudError>);

impl Syncer {
    /// One run. Cloud failures are in the report; only a store failure is an error.
    ///
    /// # Errors
    /// The store's; nothing of the run is then committed.
    pub async fn run_once(&self) -> Result<RunReport, StoreError> {
        self.run(None).await
    }

    /// A run over just these Golioth devices (a webhook said they changed): each is read by
    /// id and merged against NetNeural's last copy (NetNeural is not read: its cursor and
    /// the other devices wait for the next full run, so nothing it sent is skipped).
    ///
    /// # Errors
    /// As [`Syncer::run_once`].
    pub async fn run_focused(&self, golioth_ids: &[String]) -> Result<RunReport, StoreError> {
        self.run(Some(golioth_ids)).await
    }

    async fn run(&self, focus: Option<&[String]>) -> Result<RunReport, StoreError> {
        let _one_at_a_time = self.running.lock().await;
        let started = Instant::now();
        let started_at = UnixMillis::now();
        let mut tally = Tally::default();
        let pulls = self.read(focus, &mut tally.report).await?;
        let netneural_read =
            focus.is_none() && pulls.iter().any(|p| p.target == Some(Target::NetNeural));
        if netneural_read && let Some(nn) = &self.netneural {
            report::apply_remote_resolutions(&self.store, nn, &mut tally.report).await?;
        }
        let (devices, linked) = self.devices_linked(&pulls, &mut tally.report).await?;
        let directions: HashMap<&str, &'static str> = pulls
            .iter()
            .flat_map(|p| p.directions.iter().map(|(id, d)| (id.as_str(), *d)))
            .collect();
        // A focused run merges only the devices Golioth just sent: the others' copies may be
        // stale, and a merge against a stale copy could overwrite an edit made there.
        let in_focus = |i: usize| {
            focus.is_none()
                || linked.iter().any(|(t, l)| {
                    *t == Target::Golioth && l.seen.get(&i).is_some_and(|s| s.doc.is_some())
                })
        };
        let work: Vec<Work> = devices
            .iter()
            .enumerate()
            .filter(|(i, _)| in_focus(*i))
            .filter_map(|(i, device)| self.merge(i, device, &linked, &directions, &mut tally))
            .collect();
        let pushed = self.push_all(&devices, &work).await;
        for w in &work {
            let results: Vec<&PushResult> =
                pushed.iter().filter(|(i, _, _)| *i == w.index).collect();
            self.settle(w, &devices[w.index], &results, &mut tally);
        }
        tally.report.duration_ms = started.elapsed().as_millis() as u64;
        let commit = finish(&mut tally, &pulls, started_at);
        let mut report = tally.report;
        let done = self.store.call(move |db| db.sync_commit(&commit)).await?;
        report.run_id = done.run_id;
        report.desired_changed = done.desired_changed;
        if netneural_read && let Some(nn) = &self.netneural {
            report::tell_netneural(&self.store, nn, &devices, &report).await;
        }
        Ok(report)
    }

    /// Reads both clouds at once (focused: just those Golioth devices); a cloud whose read
    /// fails is left out (and named in the report).
    async fn read(
        &self,
        focus: Option<&[String]>,
        report: &mut RunReport,
    ) -> Result<Vec<Pull>, StoreError> {
        if let Some(ids) = focus {
            let mut pulls = Vec::new();
            if let Some(g) = &self.golioth {
                match g.pull_devices(ids).await {
                    Ok(p) => pulls.push(p),
                    Err(e) => report.errors.push(e.for_sync()),
                }
            }
            if self.netneural.is_some() {
                // Nothing read: its devices merge against their last copies.
                pulls.push(Pull {
                    target: Some(Target::NetNeural),
                    ..Pull::default()
                });
            }
            return Ok(pulls);
        }
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
                Err(e) => report.errors.push(e.for_sync()),
            }
        }
        Ok(pulls)
    }

    /// The mirror's devices and what each cloud's read says of them, after importing the
    /// devices new in a cloud.
    async fn devices_linked(
        &self,
        pulls: &[Pull],
        report: &mut RunReport,
    ) -> Result<(Vec<SyncDevice>, Vec<(Target, link::Linked)>), StoreError> {
        let devices = self.store.call(|db| db.sync_devices()).await?;
        let mut linked = self.link_all(&devices, pulls);
        self.confirm_removals(&devices, &mut linked).await;
        let imports: Vec<link::Import> =
            linked.iter().flat_map(|(_, l)| l.imports.clone()).collect();
        if imports.is_empty() {
            return Ok((devices, linked));
        }
        report.imported = imports.len();
        self.store
            .call(move |db| {
                for i in &imports {
                    db.sync_import(&i.key, link::origin_of(i.target), i.target, &i.remote_id)?;
                }
                Ok(())
            })
            .await?;
        let devices = self.store.call(|db| db.sync_devices()).await?;
        let mut linked = self.link_all(&devices, pulls);
        self.confirm_removals(&devices, &mut linked).await;
        Ok((devices, linked))
    }

    /// A device newly missing from Golioth's list is asked for by id before it is marked
    /// removed: a device created or deleted while the pages were read shifts the pages, and
    /// can hide another one from the list. One still there (or not known either way, on an
    /// error) sits this run out unmarked.
    async fn confirm_removals(
        &self,
        devices: &[SyncDevice],
        linked: &mut [(Target, link::Linked)],
    ) {
        let Some(golioth) = &self.golioth else { return };
        for (target, l) in linked.iter_mut() {
            if *target != Target::Golioth {
                continue;
            }
            let candidates: Vec<usize> = l
                .seen
                .iter()
                .filter(|(i, s)| {
                    s.removed && s.doc.is_none() && devices[**i].golioth_removed_at.is_none()
                })
                .map(|(i, _)| *i)
                .collect();
            for i in candidates {
                let Some(id) = devices[i].golioth_id.as_deref() else {
                    continue;
                };
                let id = crate::cloud::golioth::DeviceId(id.to_owned());
                if !matches!(golioth.client.device(&id).await, Ok(None)) {
                    l.seen.remove(&i);
                }
            }
        }
    }

    /// One device's merge over the clouds that sent (or, NetNeural, once sent) its
    /// document; `None` when no cloud is linked. Link, mark and direction changes go to the
    /// tally at once.
    fn merge(
        &self,
        i: usize,
        device: &SyncDevice,
        linked: &[(Target, link::Linked)],
        directions: &HashMap<&str, &'static str>,
        tally: &mut Tally,
    ) -> Option<Work> {
        let (report, log) = (&mut tally.report, &mut tally.log);
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
        for (target, l) in linked {
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
            tally.commits.push(commit);
        }
        if spokes.is_empty() {
            return None;
        }
        tally.report.devices += 1;
        Some(Work {
            index: i,
            local,
            plan,
            spokes: spoke_info,
        })
    }

    /// What a device's merge comes to once its writes are answered.
    fn settle(&self, w: &Work, device: &SyncDevice, results: &[&PushResult], tally: &mut Tally) {
        let (report, log) = (&mut tally.report, &mut tally.log);
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
        for (_, target, r) in results {
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
                    ("failed", Some(e.for_sync()))
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
            tally.commits.push(commit);
        }
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

/// The run's commit: the devices', the cursors, the log (a row for a run that did anything,
/// then its operations) and the summary every run leaves.
fn finish(tally: &mut Tally, pulls: &[Pull], started_at: UnixMillis) -> SyncCommit {
    let report = &tally.report;
    let log = std::mem::take(&mut tally.log);
    let mut cursors = Vec::new();
    for p in pulls {
        if let Some(target) = p.target {
            cursors.extend(p.cursors.iter().map(|(k, v)| (target, *k, v.clone())));
        }
    }
    let outcome = match (report.errors.is_empty(), pulls.is_empty()) {
        (true, _) => "completed",
        (false, true) => "failed",
        (false, false) => "partial",
    };
    // Every run leaves its row (a quiet one too: the log shows the runs happen), then one per
    // operation.
    let mut rows = Vec::with_capacity(log.len() + 1);
    {
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
    SyncCommit {
        devices: std::mem::take(&mut tally.commits),
        cursors,
        log: rows,
        summary: Some(summary),
    }
}
