//! The heartbeat: how the daemon shows it is alive, to systemd and to operator commands.
//!
//! Every tick (half of `WatchdogSec=`, or [`DEFAULT_TICK`] without a watchdog) and on every
//! link change ([`Health::changed`]) it writes a [`DaemonBeat`] to the database, so that
//! `nn-gateway status` (another process) can tell whether the daemon runs and how its links
//! are; sends WATCHDOG=1 if the store thread answered in time; and refreshes STATUS= with a
//! one-line summary. At a clean stop the daemon writes one last beat, marked stopped
//! ([`record_stop`]), after every other part has ended.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::health::Health;
use crate::notify::Notifier;
use crate::store::{DaemonBeat, Store};

/// Status line and watchdog period when systemd asks for no watchdog.
pub const DEFAULT_TICK: Duration = Duration::from_secs(10);

/// How long the store may take to answer the heartbeat (a write and a status read) before the
/// daemon counts as unhealthy (and systemd, seeing no WATCHDOG=1, restarts it).
const STORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the heartbeat is connected to inside the daemon.
pub struct Links {
    pub store: Store,
    pub health: Health,
    pub notifier: Notifier,
    pub shutdown: CancellationToken,
}

/// The tick: half of `WatchdogSec=` when systemd asks for a watchdog, [`DEFAULT_TICK`]
/// otherwise.
pub fn tick(notifier: &Notifier) -> Duration {
    notifier.watchdog_interval().unwrap_or(DEFAULT_TICK)
}

/// Starts the heartbeat on `tracker`, beating every `every` and on every link change until
/// `links.shutdown` fires. Nothing talks to it once it runs, so it has no handle.
pub fn spawn(every: Duration, links: Links, tracker: &TaskTracker) {
    let span = tracing::info_span!("heartbeat");
    tracker.spawn(run(every, links).instrument(span));
}

async fn run(every: Duration, links: Links) {
    let Links {
        store,
        health,
        notifier,
        shutdown,
    } = links;
    let mut ticker = tokio::time::interval(every);
    let mut condition = StoreCondition::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            () = health.changed() => {}
        }
        heartbeat(&store, &health, &notifier, every, &mut condition).await;
    }
}

/// The last beat, marked stopped: written by the daemon once every other part has ended, just
/// before the store closes, so `status` tells a clean stop from a crash.
pub async fn record_stop(store: &Store, health: &Health, every: Duration) {
    let last = beat(health, every, true);
    if let Err(e) = store.call(move |db| db.record_heartbeat(&last)).await {
        tracing::warn!(error = %e, "cannot record the clean stop");
    }
}

/// Whether the store's commits were failing at the last heartbeat, to log only changes.
#[derive(Default)]
struct StoreCondition {
    failing: bool,
}

/// Writes the heartbeat and refreshes STATUS=. WATCHDOG=1 is sent whenever the store thread
/// answers in time: it proves the runtime (this task) and the store thread are alive. A store
/// that answers but cannot commit (a full disk) is reported in STATUS= and the log, not by
/// withholding the watchdog: a restart cannot free the disk, and each restart would make the
/// broker resend everything unacknowledged again.
async fn heartbeat(
    store: &Store,
    health: &Health,
    notifier: &Notifier,
    every: Duration,
    condition: &mut StoreCondition,
) {
    let beat = beat(health, every, false);
    let status = store.call(move |db| {
        let wrote = db.record_heartbeat(&beat);
        Ok((db.status()?, wrote))
    });
    match tokio::time::timeout(STORE_ANSWER_TIMEOUT, status).await {
        Ok(Ok((s, wrote))) => {
            notifier.watchdog();
            let failing = wrote.is_err() || !store.is_healthy();
            if failing != condition.failing {
                match &wrote {
                    Err(e) if e.is_transient() => {
                        tracing::error!(error = %e, "the store cannot commit for now (disk full, busy or I/O); nothing new is acknowledged until it can")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the store cannot commit, and waiting will not fix it: see the error; nothing new is acknowledged")
                    }
                    Ok(()) if failing => tracing::error!(
                        "the store's last commit failed (disk full?); nothing new is acknowledged until it can"
                    ),
                    Ok(()) => tracing::info!("the store commits again"),
                }
                condition.failing = failing;
            }
            let clouds: String = health
                .clouds()
                .iter()
                .filter(|(_, c)| c.state != crate::health::LaneState::Disabled)
                .map(|(t, c)| format!(" | {} {}", t.as_str(), c.state.as_str()))
                .collect();
            let owed: i64 = s.telemetry_backlog.iter().map(|(_, n)| n).sum();
            notifier.status(&format!(
                "devices {} | outbox pending {} | telemetry owed {owed} | rejected {} | mqtt {}{clouds} | store {}",
                s.devices,
                s.outbox_pending(),
                s.rejected_total,
                health.mqtt().as_str(),
                if failing {
                    "cannot commit (disk full?)"
                } else {
                    "ok"
                }
            ));
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store cannot read its status; withholding watchdog");
            notifier.status(&format!("store error: {e}"));
        }
        Err(_) => {
            tracing::error!(
                "store did not answer within {STORE_ANSWER_TIMEOUT:?}; withholding watchdog"
            );
            notifier.status("store not answering");
        }
    }
}

fn beat(health: &Health, every: Duration, stopped: bool) -> DaemonBeat {
    DaemonBeat {
        pid: std::process::id(),
        at: crate::model::UnixMillis::now().0,
        every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        mqtt: health.mqtt(),
        mqtt_error: health.mqtt_error(),
        stopped,
        clouds: health.clouds(),
    }
}
