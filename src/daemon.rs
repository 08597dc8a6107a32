//! The daemon: start-up, the main loop and shutdown, in the order they happen.
//!
//! [`run`] takes its sockets and its shutdown signal from the caller, so tests run a whole
//! gateway on port 0 and stop it with their own token.
//!
//! Start-up: open the store (migrations) → start CoAP on the bound socket → start MQTT →
//! start the downlink → READY=1.
//! Main loop: every tick (and on every link change) the heartbeat is written to the database
//! for operator commands, WATCHDOG=1 is sent if the store thread answered, and STATUS= gets a
//! one-line summary; every minute, telemetry retention runs.
//! Shutdown (the token fires, e.g. on SIGTERM): STOPPING=1 → CoAP stops reading, MQTT stops
//! storing and acknowledges what is committed → all tasks end within
//! `gateway.shutdown_timeout` → the store finishes its queue, checkpoints and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::downlink::Downlink;
use crate::health::{Health, LinkState};
use crate::model::Target;
use crate::notify::Notifier;
use crate::store::retention::{CHUNK, Policy, RETENTION_EVERY, Report};
use crate::store::{DaemonBeat, OpenOptions, Store, StoreError};

/// Status line and watchdog period when systemd asks for no watchdog.
const DEFAULT_TICK: Duration = Duration::from_secs(10);

/// How long the store may take to answer the watchdog's ping before the daemon counts as
/// unhealthy (and systemd, seeing no WATCHDOG=1, restarts it).
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Capacity of the broker-acknowledgement channel to the downlink. A dropped confirmation only
/// causes a harmless republish.
const PUBLISHED_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot bind CoAP socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MQTT settings: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The sockets the daemon serves on, bound by the caller.
pub struct Sockets {
    pub coap: Option<UdpSocket>,
}

impl Sockets {
    /// Binds what the configuration asks for.
    ///
    /// # Errors
    /// [`DaemonError::Bind`] naming the address.
    pub async fn bind(cfg: &Config) -> Result<Sockets, DaemonError> {
        let coap = if cfg.coap.enabled {
            let addr = cfg.coap.bind;
            Some(
                UdpSocket::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Bind { addr, source })?,
            )
        } else {
            None
        };
        Ok(Sockets { coap })
    }
}

/// Runs the gateway until `shutdown` fires, then shuts down in order.
///
/// # Errors
/// When the store cannot be opened or the MQTT settings are unusable; once running, failures
/// are retried and logged, not returned.
pub async fn run(
    config: Config,
    sockets: Sockets,
    shutdown: CancellationToken,
    notifier: Notifier,
) -> Result<(), DaemonError> {
    let store = open_store(&config).await?;
    let health = Health::default();
    let tracker = TaskTracker::new();

    let coap = sockets.coap.map(|socket| {
        if let Ok(addr) = socket.local_addr() {
            tracing::info!(%addr, "CoAP listening");
        }
        crate::coap::spawn(
            socket,
            &config.coap,
            store.clone(),
            &tracker,
            shutdown.clone(),
        )
    });

    let (published_tx, published_rx) = mpsc::channel(PUBLISHED_QUEUE);
    let mqtt = if config.mqtt.enabled {
        health.set_mqtt(LinkState::Down);
        Some(
            crate::mqtt::spawn(
                &config.mqtt,
                crate::mqtt::Links {
                    store: store.clone(),
                    health: health.clone(),
                    published: published_tx,
                    shutdown: shutdown.clone(),
                    drain: config.gateway.shutdown_timeout,
                },
                &tracker,
            )
            .map_err(DaemonError::Mqtt)?,
        )
    } else {
        None
    };

    let bell = Arc::new(Notify::new());
    let downlink = Downlink {
        store: store.clone(),
        mqtt,
        coap,
        bell: bell.clone(),
        poll: config.gateway.downlink_poll,
        published: published_rx,
    };
    tracker.spawn(downlink.run(shutdown.clone()));
    tracker.close();

    notifier.ready();
    tracing::info!(database = %config.storage.path.display(), "gateway ready");

    let tick = notifier.watchdog_interval().unwrap_or(DEFAULT_TICK);
    let mut ticker = tokio::time::interval(tick);
    let retention = Policy {
        max_bytes: config.storage.max_size_mib.saturating_mul(1024 * 1024),
        max_age: Some(config.storage.telemetry_max_age).filter(|age| !age.is_zero()),
        chunk: CHUNK,
    };
    let mut retention_ticker = tokio::time::interval(RETENTION_EVERY);
    let mut condition = StoreCondition::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => heartbeat(&store, &health, &notifier, tick, &mut condition).await,
            () = health.changed() => heartbeat(&store, &health, &notifier, tick, &mut condition).await,
            _ = retention_ticker.tick() => enforce_retention(&store, retention).await,
        }
    }

    notifier.stopping();
    tracing::info!(deadline = ?config.gateway.shutdown_timeout, "shutting down");
    // The tasks have their own drain deadline; this one covers a task that ignores it.
    let grace = config.gateway.shutdown_timeout + Duration::from_secs(2);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("tasks still running at the shutdown deadline; closing the store anyway");
    }
    let last = beat(&health, tick, true);
    if let Err(e) = store.call(move |db| db.record_heartbeat(&last)).await {
        tracing::warn!(error = %e, "cannot record the clean stop");
    }
    store.close().await;
    tracing::info!("store closed; bye");
    Ok(())
}

async fn open_store(config: &Config) -> Result<Store, StoreError> {
    let mut targets = Vec::new();
    if config.golioth.enabled {
        targets.push(Target::Golioth);
    }
    if config.netneural.enabled {
        targets.push(Target::NetNeural);
    }
    let opts = OpenOptions {
        synchronous: config.storage.synchronous,
        targets,
        rejected_keep: config.storage.rejected_keep,
    };
    let path = config.storage.path.clone();
    tokio::task::spawn_blocking(move || Store::open(&path, &opts))
        .await
        .map_err(|e| StoreError::Open {
            path: config.storage.path.clone(),
            reason: format!("opening task failed: {e}"),
        })?
}

/// Whether the store's commits were failing at the last heartbeat, to log only changes.
#[derive(Default)]
struct StoreCondition {
    failing: bool,
}

/// Writes the heartbeat and refreshes STATUS=. WATCHDOG=1 is sent whenever the store thread
/// answers in time: it proves the main loop and the store thread are alive. A store that
/// answers but cannot commit (a full disk) is reported in STATUS= and the log, not by
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
    match tokio::time::timeout(STORE_PING_TIMEOUT, status).await {
        Ok(Ok((s, wrote))) => {
            notifier.watchdog();
            let failing = wrote.is_err() || !store.is_healthy();
            if failing != condition.failing {
                match &wrote {
                    Err(e) => {
                        tracing::error!(error = %e, "the store cannot commit (disk full?); nothing new is acknowledged until it can")
                    }
                    Ok(()) if failing => tracing::error!(
                        "the store's last commit failed (disk full?); nothing new is acknowledged until it can"
                    ),
                    Ok(()) => tracing::info!("the store commits again"),
                }
                condition.failing = failing;
            }
            notifier.status(&format!(
                "devices {} | outbox pending {} | rejected {} | mqtt {} | store {}",
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
                "store did not answer within {STORE_PING_TIMEOUT:?}; withholding watchdog"
            );
            notifier.status("store not answering");
        }
    }
}

/// Deletes telemetry past its age or beyond the size ceiling, and says what went. A pass is
/// bounded; while work is left, the next one follows once the writes queued meanwhile are in.
async fn enforce_retention(store: &Store, policy: Policy) {
    let mut total = Report::default();
    loop {
        match store.call(move |db| db.enforce_retention(&policy)).await {
            Ok(r) => {
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

fn beat(health: &Health, every: Duration, stopped: bool) -> DaemonBeat {
    DaemonBeat {
        pid: std::process::id(),
        at: crate::model::UnixMillis::now().0,
        every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        mqtt: health.mqtt().as_str().to_owned(),
        stopped,
        clouds: health.clouds(),
    }
}
