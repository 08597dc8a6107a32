//! MQTT: the gateway as a client of the site broker (rumqttc).
//!
//! Two tasks share one connection:
//! - the **driver** owns rumqttc's event loop: it polls it, reconnects with [`Backoff`]
//!   (rumqttc has no delay of its own), subscribes on every CONNACK, and hands each PUBLISH
//!   to the store in arrival order;
//! - the **acker** waits for each message's commit, in the same order, and only then sends its
//!   PUBACK (`manual_acks`). A crash before the commit means no PUBACK, so the broker keeps
//!   the message in our persistent session (`clean_session = false`) and sends it again.
//!
//! Redeliveries carry DUP and their original packet id; the store recognises one whose
//! content it already holds ([`crate::store::DEDUP_WINDOW`]) and it is acknowledged without
//! being stored twice.
//!
//! If a commit fails (a full disk), that message is not acknowledged and the connection is
//! dropped, so the broker resends it after the reconnect backoff instead of the gateway
//! losing it.
//!
//! Downlink: [`MqttHandle::publish_desired`] publishes a desired document retained at QoS 1;
//! the driver matches the broker's PUBACK to it and reports it on the `published` channel so
//! the store can record that the broker holds it.

pub mod router;
pub mod topics;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{MqttConfig, Secret};
use crate::health::{Health, LinkState};
use crate::model::{DeviceKey, UnixMillis};
use crate::store::{DesiredDoc, PendingWrite, Store};
use router::Router;
use topics::Template;

/// Largest packet rumqttc will read. A larger one would make rumqttc drop the connection and
/// the broker resend it forever, so this is far above `mqtt.max_message_size`: such messages
/// are read, acknowledged and rejected by the router instead. Set the broker's
/// `message_size_limit` below it.
pub const MAX_WIRE_PACKET: usize = 16 * 1024 * 1024;

/// Messages received but not yet acknowledged. The broker cannot have more QoS 1 messages in
/// flight to us than there are packet ids, so this queue never fills in practice; it bounds
/// memory if a broker misbehaves.
const MAX_UNACKED: usize = 65_536;

/// Requests (PUBACKs, publishes, subscribes) waiting for the event loop. Larger than
/// [`MAX_UNACKED`] so the acker never waits on the driver for room.
const REQUEST_QUEUE: usize = MAX_UNACKED + 1024;

/// A desired document acknowledged by the broker.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub device: DeviceKey,
    pub seq: i64,
}

/// Cheap cloneable handle for publishing to the broker.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    desired: Template,
    /// Desired publishes handed to rumqttc, oldest first, not yet given a packet id.
    awaiting_pkid: Arc<Mutex<VecDeque<Published>>>,
}

impl MqttHandle {
    /// Publishes a desired document retained at QoS 1 on the device's desired topic. The
    /// broker's acknowledgement arrives later on the `published` channel given to [`spawn`].
    ///
    /// # Errors
    /// When the MQTT task has stopped.
    pub async fn publish_desired(&self, doc: &DesiredDoc) -> Result<(), rumqttc::ClientError> {
        let topic = self.desired.topic(doc.device.as_str());
        let payload = serde_json::to_vec(&doc.doc).unwrap_or_default();
        // Registered before the request so the driver sees it when rumqttc assigns the id.
        self.awaiting_pkid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Published {
                device: doc.device.clone(),
                seq: doc.seq,
            });
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
    }
}

/// What the MQTT tasks are connected to inside the daemon.
pub struct Links {
    pub store: Store,
    pub health: Health,
    /// Broker acknowledgements of desired publishes, for the downlink.
    pub published: mpsc::Sender<Published>,
    pub shutdown: CancellationToken,
    /// How long shutdown may spend acknowledging what is already committed.
    pub drain: Duration,
}

/// Starts the MQTT driver and acker on `tracker`. They stop when `links.shutdown` fires, after
/// acknowledging (within `links.drain`) everything already committed.
///
/// # Errors
/// When a topic template is unusable (configuration validation refuses those first).
pub fn spawn(
    cfg: &MqttConfig,
    password: Option<Secret>,
    links: Links,
    tracker: &TaskTracker,
) -> Result<MqttHandle, String> {
    let Links {
        store,
        health,
        published,
        shutdown,
        drain,
    } = links;
    let router = Router::new(&cfg.topics, cfg.max_message_size)?;
    let desired = Template::parse(&cfg.topics.desired)?;
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_WIRE_PACKET, MAX_WIRE_PACKET)
        .set_inflight(100);
    if let Some(user) = &cfg.username {
        opts.set_credentials(
            user.clone(),
            password.map(|p| p.expose().to_owned()).unwrap_or_default(),
        );
    }
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let handle = MqttHandle {
        client: client.clone(),
        desired,
        awaiting_pkid: Arc::default(),
    };
    let (acks_tx, acks_rx) = mpsc::channel(MAX_UNACKED);
    let acker_done = CancellationToken::new();
    let reconnect = Arc::new(tokio::sync::Notify::new());
    let span = tracing::info_span!("mqtt", broker = %format!("{}:{}", cfg.host, cfg.port));
    tracker.spawn(
        acker(
            client.clone(),
            acks_rx,
            reconnect.clone(),
            acker_done.clone(),
        )
        .instrument(span.clone()),
    );
    let driver = Driver {
        eventloop,
        client,
        router,
        store,
        health,
        acks: Some(acks_tx),
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        awaiting_pkid: handle.awaiting_pkid.clone(),
        in_flight: HashMap::new(),
        published,
        reconnect,
    };
    tracker.spawn(driver.run(shutdown, acker_done, drain).instrument(span));
    Ok(handle)
}

struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    router: Router,
    store: Store,
    health: Health,
    /// To the acker; dropped at shutdown so the acker finishes.
    acks: Option<mpsc::Sender<(rumqttc::Publish, PendingWrite)>>,
    backoff: Backoff,
    awaiting_pkid: Arc<Mutex<VecDeque<Published>>>,
    /// Our desired publishes the broker has not acknowledged, by packet id.
    in_flight: HashMap<u16, Published>,
    published: mpsc::Sender<Published>,
    /// Rung by the acker when a commit failed: drop the connection so the broker resends.
    reconnect: Arc<tokio::sync::Notify>,
}

impl Driver {
    async fn run(
        mut self,
        shutdown: CancellationToken,
        acker_done: CancellationToken,
        drain: Duration,
    ) {
        let filters = self.router.filters();
        let mut connected = false;
        let mut failures: u32 = 0;
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = self.reconnect.notified() => {
                    tracing::warn!("dropping the broker connection so unacknowledged messages are sent again");
                    let _ = self.client.try_disconnect();
                    continue;
                }
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    failures = 0;
                    self.backoff.reset();
                    self.health.set_mqtt(LinkState::Connected);
                    tracing::info!(session_present = ack.session_present, "connected to broker");
                    for filter in &filters {
                        if let Err(e) = self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce)
                        {
                            tracing::error!(%filter, error = %e, "cannot queue subscription");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.on_publish(publish).await,
                Ok(Event::Incoming(Packet::PubAck(ack))) => self.on_puback(ack.pkid),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(
                            pkid = ack.pkid,
                            "broker refused a subscription; check its ACL for this client"
                        );
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.on_outgoing_publish(pkid),
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(error = %e, "lost broker connection; reconnecting with backoff");
                    } else if failures == 0 {
                        tracing::warn!(error = %e, "cannot reach broker; retrying with backoff (logged again on change)");
                    }
                    connected = false;
                    failures = failures.saturating_add(1);
                    self.health.set_mqtt(LinkState::Down);
                    let delay = self.backoff.next_delay();
                    tracing::debug!(?delay, attempt = failures, "reconnect delay");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.drain(acker_done, drain).await;
    }

    async fn on_publish(&mut self, publish: rumqttc::Publish) {
        let op = self.router.route(
            &publish.topic,
            &publish.payload,
            publish.pkid,
            publish.dup,
            UnixMillis::now(),
        );
        if let crate::store::WriteOp::Reject(r) = &op {
            tracing::warn!(topic = %r.locator, device = r.device.as_deref().unwrap_or("-"), reason = %r.reason, "rejected message");
        }
        let pending = match self.store.enqueue(op).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable; message left unacknowledged");
                return;
            }
        };
        if publish.qos == QoS::AtMostOnce {
            return; // Nothing to acknowledge.
        }
        if let Some(acks) = &self.acks
            && acks.send((publish, pending)).await.is_err()
        {
            tracing::error!("acker stopped; message left unacknowledged");
        }
    }

    fn on_outgoing_publish(&mut self, pkid: u16) {
        if self.in_flight.contains_key(&pkid) {
            return; // A resend after reconnect.
        }
        let next = self
            .awaiting_pkid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        if let Some(p) = next {
            self.in_flight.insert(pkid, p);
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        if let Some(p) = self.in_flight.remove(&pkid)
            && self.published.try_send(p).is_err()
        {
            // The downlink republishes anything not recorded as published; retained QoS 1
            // makes that harmless.
            tracing::debug!(pkid, "publish confirmation dropped; it will be republished");
        }
    }

    /// Shutdown: stop storing, let the acker acknowledge what is committed, disconnect.
    async fn drain(mut self, acker_done: CancellationToken, deadline: Duration) {
        self.acks = None;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            tokio::select! {
                () = acker_done.cancelled() => break,
                () = tokio::time::sleep_until(until) => {
                    tracing::warn!("shutdown deadline reached; unacknowledged messages will be redelivered");
                    break;
                }
                event = self.eventloop.poll() => {
                    // New messages are neither stored nor acknowledged: the broker keeps them.
                    if event.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = self.client.try_disconnect();
        let flush = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < flush {
            match tokio::time::timeout_at(flush, self.eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
        self.health.set_mqtt(LinkState::Down);
        tracing::info!("disconnected from broker");
    }
}

/// Acknowledges each message after its commit, in arrival order.
async fn acker(
    client: AsyncClient,
    mut rx: mpsc::Receiver<(rumqttc::Publish, PendingWrite)>,
    reconnect: Arc<tokio::sync::Notify>,
    done: CancellationToken,
) {
    while let Some((publish, pending)) = rx.recv().await {
        match pending.committed().await {
            Ok(outcome) => {
                if outcome == crate::store::Outcome::Duplicate {
                    tracing::debug!(topic = %publish.topic, pkid = publish.pkid, "redelivery of a stored message; acknowledged again");
                }
                if client.ack(&publish).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(topic = %publish.topic, pkid = publish.pkid, error = %e,
                    "message not stored, not acknowledged; the broker will resend it");
                reconnect.notify_one();
            }
        }
    }
    done.cancel();
}
