//! The daemon: start-up as a list of spawns, then shutdown, in the order they happen.
//!
//! [`run`] takes its sockets and its shutdown signal from the caller, so tests run a whole
//! gateway on port 0 and stop it with their own token.
//!
//! Start-up is a list of spawns, each part `X::spawn(config, links, &tracker)`: open the store
//! (migrations) → CoAP on the bound socket → MQTT → one outbox lane per enabled cloud (and the
//! SIGHUP key reloads) → SIGUSR1, the HTTP API on its bound listener (with the webhook's
//! focused pulls) and the sync runs (reconciliation, sharing the lanes' keys) → the downlink → retention → READY=1 → the heartbeat (its first WATCHDOG=1 must follow
//! READY=1). Then the daemon only waits for the shutdown token.
//! Shutdown (the token fires, e.g. on SIGTERM): STOPPING=1 → the API finishes the requests in
//! progress and stops, CoAP stops reading, MQTT stops
//! storing and acknowledges what is committed, the lanes abandon their sends in the air (the
//! rows stay in flight and are pending again at the next start; telemetry resends its batch,
//! which the cloud's idempotency key makes harmless), the downlink, retention and heartbeat
//! stop → all tasks end within `gateway.shutdown_timeout` → the last heartbeat, marked
//! stopped → the store finishes its queue, checkpoints and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloud::ApiKey;
use crate::cloud::golioth::Golioth;
use crate::cloud::netneural::NetNeural;
use crate::cloud::uplink::{GoliothUplink, Identity, NetNeuralUplink};
use crate::config::Config;
use crate::health::LaneState;
use crate::health::{Health, LinkState};
use crate::metrics::Metrics;
use crate::model::Target;
use crate::notify::Notifier;
use crate::outbox::policy::RetrySchedule;
use crate::outbox::{LaneConfig, LaneLinks};
use crate::store::{OpenOptions, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] crate::api::TokenError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Cloud(#[from] crate::cloud::CloudError),
}

/// A cloud's key, and the bell that tells its lane a new one arrived.
struct LaneKey {
    target: Target,
    key: ApiKey,
    changed: Arc<Notify>,
}

/// Starts one outbox lane per enabled cloud. Returns their keys, for SIGHUP.
async fn spawn_lanes(
    config: &Config,
    store: &Store,
    health: &Health,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Vec<LaneKey>, DaemonError> {
    let install_id = store.call(|db| Ok(db.install_id().to_owned())).await?;
    let identity = Identity {
        template: config.gateway.cloud_id.clone(),
        site: config.gateway.site_id.clone(),
    };
    let mut keys = Vec::new();
    let mut links = |target: Target, key: &Option<crate::config::Secret>| {
        let key = ApiKey::new(
            key.clone()
                .unwrap_or_else(|| crate::config::Secret::new("")),
        );
        let changed = Arc::new(Notify::new());
        keys.push(LaneKey {
            target,
            key: key.clone(),
            changed: changed.clone(),
        });
        let links = LaneLinks {
            store: store.clone(),
            health: health.clone(),
            bell: store.bells().of(target),
            key_changed: changed,
            shutdown: shutdown.clone(),
        };
        (key, links)
    };
    for target in Target::ALL {
        health.set_lane(target, LaneState::Disabled);
    }
    if config.golioth.enabled {
        let g = &config.golioth;
        let (key, links) = links(Target::Golioth, &g.api_key);
        let uplink = GoliothUplink {
            client: Golioth::new(g, key)?.with_metrics(metrics.clone()),
            identity: identity.clone(),
            reported_path: g.reported_path.clone(),
        };
        let lane = LaneConfig {
            concurrency: g.concurrency,
            batch: 1,
            schedule: RetrySchedule {
                min: g.retry_min,
                max: g.retry_max,
            },
            install_id: install_id.clone(),
        };
        crate::outbox::spawn(uplink, lane, links, tracker);
    }
    if config.netneural.enabled {
        let n = &config.netneural;
        let (key, links) = links(Target::NetNeural, &n.api_key);
        let client = NetNeural::new(n, key)?.with_metrics(metrics.clone());
        let uplink = NetNeuralUplink::new(client, identity);
        let lane = LaneConfig {
            concurrency: n.concurrency,
            batch: n.telemetry_batch,
            schedule: RetrySchedule {
                min: n.retry_min,
                max: n.retry_max,
            },
            install_id,
        };
        crate::outbox::spawn(uplink, lane, links, tracker);
    }
    Ok(keys)
}

/// Applies what SIGHUP re-read and can change while running: the clouds' API keys. A lane
/// whose key changed rechecks it at once (so a fixed key file ends "auth failed").
async fn apply_reloads(
    keys: Vec<LaneKey>,
    mut reloads: watch::Receiver<Config>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = reloads.changed() => if changed.is_err() { return },
        }
        let config = reloads.borrow_and_update().clone();
        for k in &keys {
            let new = match k.target {
                Target::Golioth => config.golioth.api_key.clone(),
                Target::NetNeural => config.netneural.api_key.clone(),
            };
            if let Some(new) = new
                && k.key.replace(new)
            {
                tracing::info!(cloud = k.target.as_str(), "API key re-read from its file");
                k.changed.notify_one();
            }
        }
    }
}

/// The sockets the daemon serves on, bound by the caller.
pub struct Sockets {
    pub coap: Option<UdpSocket>,
    /// The HTTP API and console (`[api]`).
    pub api: Option<tokio::net::TcpListener>,
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
                    .map_err(|source| DaemonError::Bind {
                        what: "CoAP socket",
                        addr,
                        source,
                    })?,
            )
        } else {
            None
        };
        let api = if cfg.api.enabled {
            let addr = cfg.api.bind;
            Some(
                crate::api::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Bind {
                        what: "HTTP API address (api.bind)",
                        addr,
                        source,
                    })?,
            )
        } else {
            None
        };
        Ok(Sockets { coap, api })
    }
}

/// Runs the gateway until `shutdown` fires, then shuts down in order.
///
/// # Errors
/// When the store cannot be opened or a cloud client cannot be built; once running, failures
/// are retried and logged, not returned.
pub async fn run(
    config: Config,
    sockets: Sockets,
    shutdown: CancellationToken,
    notifier: Notifier,
) -> Result<(), DaemonError> {
    let (_keep, reloads) = watch::channel(config.clone());
    run_reloadable(config, sockets, shutdown, notifier, reloads).await
}

/// [`run`], taking each configuration SIGHUP re-reads from `reloads`: the cloud API keys
/// (from their files) apply at once; what else changed is named by the signal handler as
/// needing a restart. Makes the run's [`Metrics`].
///
/// # Errors
/// As [`run`].
pub async fn run_reloadable(
    config: Config,
    sockets: Sockets,
    shutdown: CancellationToken,
    notifier: Notifier,
    reloads: watch::Receiver<Config>,
) -> Result<(), DaemonError> {
    let metrics = Metrics::new();
    run_with_metrics(config, sockets, shutdown, notifier, reloads, metrics).await
}

/// [`run_reloadable`], counting into `metrics`, which the caller keeps to read them (tests
/// do; the daemon serves them at `/metrics`).
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    config: Config,
    sockets: Sockets,
    shutdown: CancellationToken,
    notifier: Notifier,
    reloads: watch::Receiver<Config>,
    metrics: Metrics,
) -> Result<(), DaemonError> {
    let store = open_store(&config, metrics.clone()).await?;
    let health = Health::default();
    let tracker = TaskTracker::new();

    let coap = sockets.coap.map(|socket| {
        if let Ok(addr) = socket.local_addr() {
            tracing::info!(%addr, "CoAP listening");
        }
        let links = crate::coap::Links {
            socket,
            store: store.clone(),
            shutdown: shutdown.clone(),
        };
        crate::coap::spawn(&config.coap, links, &tracker)
    });

    let (published_tx, published_rx) = mpsc::channel(crate::downlink::PUBLISHED_QUEUE);
    let mqtt = if config.mqtt.enabled {
        health.set_mqtt(LinkState::Down);
        Some(crate::mqtt::spawn(
            &config.mqtt,
            crate::mqtt::Links {
                store: store.clone(),
                health: health.clone(),
                published: published_tx,
                shutdown: shutdown.clone(),
                drain: config.gateway.shutdown_timeout,
            },
            &tracker,
        ))
    } else {
        None
    };

    let keys = spawn_lanes(&config, &store, &health, &metrics, &shutdown, &tracker).await?;
    let key_of = |t: Target| keys.iter().find(|k| k.target == t).map(|k| k.key.clone());
    let syncer = crate::cloud::sync::syncer(
        &config,
        store.clone(),
        key_of(Target::Golioth),
        key_of(Target::NetNeural),
        &metrics,
    )?;
    let sync_now = Arc::new(Notify::new());
    // SIGUSR1 (`nn-gateway sync now`, `conflicts resolve`, `desired set`) is always caught,
    // sync or not: its default action would end the daemon.
    // Registered here, before READY, not in the task: a signal that came before the task
    // first ran would otherwise still meet the default action.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(usr1) => {
            tracker.spawn(sync_signal(
                usr1,
                syncer.is_some().then(|| sync_now.clone()),
                shutdown.clone(),
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGUSR1; `sync now` will not reach the daemon");
        }
    }
    // The Golioth webhook's single-device pulls: when it has a secret and Golioth syncs.
    let pulls = (config.api.enabled
        && config.api.webhook_secret.is_some()
        && syncer.as_ref().is_some_and(|s| s.golioth.is_some()))
    .then(|| crate::cloud::sync::PullRequests::new(config.api.webhook_min_interval));
    if let Some(listener) = sockets.api {
        let golioth = match key_of(Target::Golioth) {
            Some(key) if config.golioth.enabled => Some(Golioth::new(&config.golioth, key)?),
            _ => None,
        };
        let netneural = match key_of(Target::NetNeural) {
            Some(key) if config.netneural.enabled => Some(NetNeural::new(&config.netneural, key)?),
            _ => None,
        };
        let api = crate::api::Api::new(
            &config,
            crate::api::ApiLinks {
                store: store.clone(),
                health: health.clone(),
                sync_now: syncer.is_some().then(|| sync_now.clone()),
                golioth,
                netneural,
                pulls: pulls.clone(),
                metrics: metrics.clone(),
            },
        )?;
        crate::api::spawn(listener, api, shutdown.clone(), &tracker);
    }
    if let Some(syncer) = syncer {
        crate::cloud::sync::spawn(
            syncer,
            config.sync.interval,
            config.sync.log_retention,
            crate::cloud::sync::SyncLinks {
                store: store.clone(),
                now: sync_now,
                pulls,
                shutdown: shutdown.clone(),
            },
            &tracker,
        );
    }
    tracker.spawn(apply_reloads(keys, reloads, shutdown.clone()));

    crate::downlink::spawn(
        &config.gateway,
        crate::downlink::Links {
            store: store.clone(),
            mqtt,
            coap,
            published: published_rx,
            shutdown: shutdown.clone(),
        },
        &tracker,
    );
    crate::retention::spawn(
        &config.storage,
        crate::retention::Links {
            store: store.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        },
        &tracker,
    );

    notifier.ready();
    tracing::info!(database = %config.storage.path.display(), "gateway ready");
    // After READY=1, which systemd must see first.
    let tick = crate::heartbeat::tick(&notifier);
    crate::heartbeat::spawn(
        tick,
        crate::heartbeat::Links {
            store: store.clone(),
            health: health.clone(),
            notifier: notifier.clone(),
            shutdown: shutdown.clone(),
        },
        &tracker,
    );
    tracker.close();

    shutdown.cancelled().await;

    notifier.stopping();
    tracing::info!(deadline = ?config.gateway.shutdown_timeout, "shutting down");
    // The tasks have their own drain deadline; this one covers a task that ignores it.
    let grace = config.gateway.shutdown_timeout + Duration::from_secs(2);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("tasks still running at the shutdown deadline; closing the store anyway");
    }
    crate::heartbeat::record_stop(&store, &health, tick).await;
    store.close().await;
    tracing::info!("store closed; bye");
    Ok(())
}

/// Rings `now` on every SIGUSR1 until shutdown (`None`: sync is off, which is logged).
async fn sync_signal(
    mut usr1: tokio::signal::unix::Signal,
    now: Option<Arc<Notify>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = usr1.recv() => {
                if got.is_none() {
                    return;
                }
                match &now {
                    Some(now) => {
                        tracing::info!("SIGUSR1: sync now");
                        now.notify_one();
                    }
                    None => tracing::info!("SIGUSR1: sync is off (no cloud enabled, or sync.enabled = false)"),
                }
            }
        }
    }
}

async fn open_store(config: &Config, metrics: Metrics) -> Result<Store, StoreError> {
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
    tokio::task::spawn_blocking(move || Store::open_with_metrics(&path, &opts, metrics))
        .await
        .map_err(|e| StoreError::Open {
            path: config.storage.path.clone(),
            reason: format!("opening task failed: {e}"),
        })?
}
