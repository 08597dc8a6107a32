//! What one send does: register the device if the cloud does not know it yet (once per device
//! per lane), deliver a row, or deliver a telemetry batch (bisecting one the cloud refuses).
//! These run as tasks beside the lane; the lane settles their outcomes.

use super::*;

/// Registrations of this lane in progress (or done and not yet committed), per local device
/// id: concurrent sends for one new device wait for one registration.
#[derive(Default)]
pub(super) struct Registrar {
    pub(super) cells: Mutex<HashMap<i64, Arc<OnceCell<String>>>>,
}

/// A device's id as [`Registrar::resolve`] found it.
pub(super) struct Resolved {
    pub(super) id: String,
    /// This call registered it (rather than waiting for another's registration).
    pub(super) fresh: bool,
    /// The create carried the row given.
    pub(super) delivered: bool,
}

impl Registrar {
    pub(super) async fn resolve<U: Uplink>(
        &self,
        uplink: &U,
        device: &DeviceIdent,
        row: Option<&OutboxRow>,
    ) -> Result<Resolved, CloudError> {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(device.id)
            .or_default()
            .clone();
        let mut mine = None;
        let id = cell
            .get_or_try_init(|| async {
                let r = uplink.register(device, row).await?;
                mine = Some(r.delivered);
                Ok::<_, CloudError>(r.id)
            })
            .await?
            .clone();
        Ok(Resolved {
            id,
            fresh: mine.is_some(),
            delivered: mine.unwrap_or(false),
        })
    }

    /// The device's id (or its absence) is committed to the store: rows read from now on
    /// carry it, so the registration need not be remembered.
    pub(super) fn settled(&self, device: i64) {
        self.cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&device);
    }
}

/// What the lane's send tasks share.
pub(super) struct Shared<U> {
    pub(super) uplink: U,
    pub(super) store: Store,
    pub(super) registrar: Registrar,
    pub(super) install_id: String,
    pub(super) concurrency: usize,
}

/// A row send's outcome: the id to store with the row (found or created, even when the send
/// then failed), whether this send registered it, and the send's result.
pub(super) struct RowOutcome {
    pub(super) remote_id: Option<String>,
    pub(super) fresh: bool,
    pub(super) result: Result<(), CloudError>,
}

/// A telemetry batch's outcome.
pub(super) struct BatchOutcome {
    /// The points refused for good.
    pub(super) result: Result<Vec<DeadPoint>, CloudError>,
    pub(super) sent: u64,
    pub(super) registered: u64,
    /// Each device's newest reception time among the points delivered.
    pub(super) seen: Vec<(String, UnixMillis)>,
}

/// A finished task: a panic is the lane's own bug and is passed on; tasks are never aborted.
pub(super) fn joined<T>(r: Result<T, JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => unreachable!("lane tasks are never cancelled: {e}"),
    }
}

/// 409 with PostgREST's foreign-key code: the device row the points refer to is gone.
pub(super) fn is_missing_parent(e: &CloudError) -> bool {
    matches!(&e.failure, Failure::Status { status: 409, code: Some(code), .. } if code == "23503")
}

/// Registers the row's device if needed (the create carrying the row where the cloud can),
/// then sends the row.
pub(super) async fn send_one<U: Uplink>(shared: &Shared<U>, row: &OutboxRow) -> RowOutcome {
    let uplink = &shared.uplink;
    let target = uplink.target();
    let (remote, stored, fresh) = match row.device.remote_id(target) {
        Some(id) => (id.to_owned(), None, false),
        None => match shared
            .registrar
            .resolve(uplink, &row.device, Some(row))
            .await
        {
            Ok(r) if r.delivered => {
                // Created with the row's content; nothing assigned it a direction yet.
                return RowOutcome {
                    remote_id: Some(r.id),
                    fresh: r.fresh,
                    result: Ok(()),
                };
            }
            Ok(r) => (r.id.clone(), Some(r.id), r.fresh),
            Err(e) => {
                return RowOutcome {
                    remote_id: None,
                    fresh: false,
                    result: Err(e),
                };
            }
        },
    };
    let result = match uplink.accepts(&[remote.as_str()]).await {
        Ok(ok) if ok.first().copied().unwrap_or(true) => uplink.send_row(&remote, row).await,
        // The device does not sync up to this cloud: nothing is owed.
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    RowOutcome {
        remote_id: stored,
        fresh,
        result,
    }
}

/// Registers the batch's devices that have no id in the cloud yet (at most `concurrency` at
/// once, their ids stored in one transaction), drops the points of devices that do not sync
/// up, and sends the rest; bisects a refused batch.
pub(super) async fn deliver<U: Uplink>(
    shared: Arc<Shared<U>>,
    items: Vec<TelemetryItem>,
) -> BatchOutcome {
    let mut out = BatchOutcome {
        result: Ok(Vec::new()),
        sent: 0,
        registered: 0,
        seen: Vec::new(),
    };
    let target = shared.uplink.target();
    let mut ids: HashMap<i64, String> = HashMap::new();
    let mut missing: Vec<DeviceIdent> = Vec::new();
    for item in &items {
        match item.device.remote_id(target) {
            Some(id) => {
                ids.entry(item.device.id).or_insert_with(|| id.to_owned());
            }
            None if !missing.iter().any(|d| d.id == item.device.id) => {
                missing.push(item.device.clone());
            }
            None => {}
        }
    }
    let mut failure = None;
    let mut refused: HashMap<i64, String> = HashMap::new();
    let mut found: Vec<(i64, Option<String>)> = Vec::new();
    for chunk in missing.chunks(shared.concurrency) {
        let mut set = JoinSet::new();
        for device in chunk.iter().cloned() {
            let shared = shared.clone();
            set.spawn(
                async move {
                    let r = shared
                        .registrar
                        .resolve(&shared.uplink, &device, None)
                        .await;
                    (device.id, r)
                }
                .in_current_span(),
            );
        }
        while let Some(r) = set.join_next().await {
            match joined(r) {
                (device, Ok(r)) => {
                    out.registered += u64::from(r.fresh);
                    ids.insert(device, r.id.clone());
                    found.push((device, Some(r.id)));
                }
                // A device the cloud refuses for good (a 4xx on its registration): its points
                // are dead-lettered with that error, so it cannot hold up everyone else's.
                (device, Err(e)) if !e.is_retryable() && !e.is_auth() && !is_missing_parent(&e) => {
                    tracing::warn!(device, error = %e,
                        "device refused by the cloud; its telemetry goes to the dead letters");
                    refused.insert(device, e.to_string());
                }
                (_, Err(e)) => failure = Some(e),
            }
        }
        if failure.is_some() {
            break;
        }
    }
    if !found.is_empty() {
        let devices: Vec<i64> = found.iter().map(|f| f.0).collect();
        match shared
            .store
            .call(move |db| db.set_remote_ids(target, &found))
            .await
        {
            Ok(()) => devices
                .into_iter()
                .for_each(|d| shared.registrar.settled(d)),
            Err(e) => tracing::error!(error = %e, "cannot store the devices' cloud ids"),
        }
    }
    if let Some(e) = failure {
        out.result = Err(e);
        return out;
    }
    let remotes: Vec<(i64, &str)> = ids.iter().map(|(d, r)| (*d, r.as_str())).collect();
    let names: Vec<&str> = remotes.iter().map(|r| r.1).collect();
    let accepted: HashMap<i64, bool> = match shared.uplink.accepts(&names).await {
        Ok(ok) => remotes.iter().map(|r| r.0).zip(ok).collect(),
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    };
    let mut dead: Vec<DeadPoint> = items
        .iter()
        .filter_map(|i| {
            refused
                .get(&i.device.id)
                .map(|e| (i.id, i.device.id, e.clone()))
        })
        .collect();
    let points: Vec<OutPoint<'_>> = items
        .iter()
        .filter(|i| !refused.contains_key(&i.device.id))
        .filter(|i| accepted.get(&i.device.id).copied().unwrap_or(true))
        .map(|item| OutPoint {
            remote_id: ids[&item.device.id].as_str(),
            item,
            idempotency_key: format!("tm:{}:{}", shared.install_id, item.id),
        })
        .collect();
    if points.is_empty() {
        out.result = Ok(dead);
        return out;
    }
    let refused_points = dead.len();
    match send_bisecting(&shared.uplink, &points, &mut dead).await {
        Ok(()) => {}
        Err(e) if is_missing_parent(&e) => {
            // The device's row is gone in the cloud (deleted there): forget the ids so that
            // the next try registers the devices again.
            tracing::warn!(error = %e, "a device of this batch no longer exists in the cloud; registering again");
            let forget: Vec<(i64, Option<String>)> = ids.keys().map(|d| (*d, None)).collect();
            let devices: Vec<i64> = ids.keys().copied().collect();
            let _ = shared
                .store
                .call(move |db| db.set_remote_ids(target, &forget))
                .await;
            devices
                .into_iter()
                .for_each(|d| shared.registrar.settled(d));
            out.result = Err(e);
            return out;
        }
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    }
    let mut newest: BTreeMap<&str, UnixMillis> = BTreeMap::new();
    for p in points
        .iter()
        .filter(|p| !dead.iter().any(|d: &DeadPoint| d.0 == p.item.id))
    {
        let at = newest.entry(p.remote_id).or_insert(p.item.received_at);
        *at = (*at).max(p.item.received_at);
    }
    out.sent = (points.len() + refused_points - dead.len()) as u64;
    out.seen = newest
        .into_iter()
        .map(|(id, at)| (id.to_owned(), at))
        .collect();
    out.result = Ok(dead);
    out
}

/// Sends `points`; when the cloud refuses them for what they carry, halves the batch until
/// the points at fault stand alone, and collects those in `dead`.
pub(super) async fn send_bisecting<U: Uplink>(
    uplink: &U,
    points: &[OutPoint<'_>],
    dead: &mut Vec<DeadPoint>,
) -> Result<(), CloudError> {
    // Explicit stack instead of recursion (async recursion needs boxing).
    let mut todo: Vec<&[OutPoint<'_>]> = vec![points];
    while let Some(part) = todo.pop() {
        match uplink.send_telemetry(part).await {
            Ok(()) => {}
            Err(e) if !e.is_retryable() && !e.is_auth() && !is_missing_parent(&e) => {
                if part.len() == 1 {
                    dead.push((part[0].item.id, part[0].item.device.id, e.to_string()));
                } else {
                    let (a, b) = part.split_at(part.len() / 2);
                    // Second half below the first on the stack: the first goes first.
                    todo.push(b);
                    todo.push(a);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
