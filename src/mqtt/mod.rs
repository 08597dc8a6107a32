//! MQTT: the gateway as a client of the site broker (rumqttc).
//!
//! One task, the **driver**, owns rumqttc's event loop. It polls it, reconnects with
//! [`Backoff`] (rumqttc has no delay of its own), subscribes on every CONNACK, and hands each
//! PUBLISH to the store in arrival order. It sends a message's PUBACK only after the store has
//! answered that the transaction holding it committed (`manual_acks`). A crash before the
//! commit means no PUBACK, so the broker keeps the message in our persistent session
//! (`clean_session = false`) and sends it again.
//!
//! **Acknowledgements are written in batches.** rumqttc sends one queued request per turn of
//! its event loop and prefers buffered incoming packets, so acknowledgements sent through
//! [`AsyncClient::ack`] fall thousands of messages behind under load (measured: 535 PUBACKs
//! sent for 9,000 messages received), and Mosquitto does not hold back (its
//! `max_inflight_messages` did not bound this). The driver therefore writes the PUBACKs of every
//! committed message straight to the connection between two polls, with one flush, and stops
//! reading once [`WINDOW`] messages are waiting for their commit. At most a window of stored
//! but unacknowledged messages is redelivered after a crash.
//!
//! Redeliveries carry DUP and their original packet id; the store recognises one whose content
//! it already holds ([`crate::store::DEDUP_SPAN`]) and it is acknowledged without being
//! stored twice.
//!
//! If a commit fails (a full disk), that message is not acknowledged and the connection is
//! dropped after a backoff, so the broker resends it instead of the gateway losing it.
//!
//! **Cancel safety.** The driver waits on the poll and on the oldest commit at once, so a commit
//! can interrupt a poll that is waiting on the network. rumqttc's read path only buffers, so
//! nothing is lost there; an interrupted write (a socket too full to take it) can drop one
//! outgoing packet, and each is recovered: a PUBACK by redelivery, a ping by reconnecting, a
//! desired publish by the downlink's republish (its rumqttc in-flight slot is freed at the next
//! reconnect).
//!
//! **Backoff** grows with each failed or short-lived connection and resets only after one that
//! lasted `STABLE_AFTER` (30 s), so a broker that keeps dropping us, or a full disk that makes us
//! drop the connection, cannot turn into a reconnect storm.
//!
//! Downlink: [`MqttHandle::publish_desired`] publishes a desired document retained at QoS 1;
//! the driver matches the broker's PUBACK to it and reports it on the `published` channel so
//! the store can record that the broker holds it.

pub mod router;
pub mod topics;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, PubAck, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::health::{Health, LinkState};
use crate::model::{DeviceKey, UnixMillis};
use crate::store::{DesiredDoc, Outcome, PendingWrite, Store, WriteOp};
use router::Router;
use topics::Template;

/// Largest packet rumqttc will read. A larger one would make rumqttc drop the connection and
/// the broker resend it forever, so this is far above `mqtt.max_message_size`: such messages
/// are read, acknowledged and rejected by the router instead. Set the broker's
/// `message_size_limit` below it.
pub const MAX_WIRE_PACKET: usize = 16 * 1024 * 1024;

/// Messages read but not yet acknowledged before the driver stops reading. Two store batches:
/// one committing while the next fills, so group commit stays full without letting the
/// acknowledgements fall far behind.
pub const WINDOW: usize = 2 * crate::store::MAX_BATCH;

/// Requests (desired publishes, subscribes, disconnect) waiting for the event loop.
const REQUEST_QUEUE: usize = 1024;

/// A connection that lasted this long counts as healthy: the next reconnect starts from
/// `reconnect_min` again. Shorter ones (a broker that drops us at once, a full disk making us
/// drop it) keep the delay growing, so a persistent fault cannot become a reconnect storm.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Longest wait for the broker to take a batch of PUBACKs before the connection is dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Desired publishes handed to rumqttc, oldest first, not yet given a packet id. The
    /// driver matches them, in order, to the ids rumqttc reports; it forgets them all whenever
    /// the connection drops, because rumqttc may then discard queued publishes and a wrong
    /// match would record the wrong document as delivered, while a forgotten one is only
    /// published again.
    awaiting_pkid: Arc<Mutex<VecDeque<Published>>>,
    health: Health,
}

impl MqttHandle {
    /// Publishes a desired document retained at QoS 1 on the device's desired topic, without
    /// waiting. The broker's acknowledgement arrives later on the `published` channel given to
    /// [`spawn`]; a publish that never gets one is simply published again by the downlink
    /// (retained, so a repeat is harmless).
    ///
    /// # Errors
    /// When rumqttc's request queue is full (try again later) or the MQTT task has stopped.
    pub fn publish_desired(&self, doc: &DesiredDoc) -> Result<(), rumqttc::ClientError> {
        let topic = self.desired.topic(doc.device.as_str());
        let payload = serde_json::to_vec(&doc.doc).unwrap_or_default();
        // Registered before the request so the driver sees it when rumqttc assigns the id.
        let mut awaiting = self.awaiting_pkid.lock().unwrap_or_else(|p| p.into_inner());
        awaiting.push_back(Published {
            device: doc.device.clone(),
            seq: doc.seq,
        });
        let sent = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload);
        if sent.is_err() {
            awaiting.pop_back();
        }
        sent
    }

    /// Whether the broker connection is up (publishing while it is down only fills a queue).
    pub fn is_connected(&self) -> bool {
        self.health.mqtt() == LinkState::Connected
    }
}

/// What the MQTT task is connected to inside the daemon.
pub struct Links {
    pub store: Store,
    pub health: Health,
    /// Broker acknowledgements of desired publishes, for the downlink.
    pub published: mpsc::Sender<Published>,
    pub shutdown: CancellationToken,
    /// How long shutdown may spend acknowledging what is already committed.
    pub drain: Duration,
}

/// Starts the MQTT driver on `tracker`. It stops when `links.shutdown` fires, after
/// acknowledging (within `links.drain`) everything already handed to the store.
///
/// # Errors
/// When a topic template is unusable (configuration validation refuses those first).
pub fn spawn(cfg: &MqttConfig, links: Links, tracker: &TaskTracker) -> Result<MqttHandle, String> {
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
            cfg.password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default(),
        );
    }
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let handle = MqttHandle {
        client: client.clone(),
        desired,
        awaiting_pkid: Arc::default(),
        health: links.health.clone(),
    };
    let driver = Driver {
        eventloop,
        client,
        router,
        store: links.store,
        health: links.health,
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        unacked: VecDeque::new(),
        ready: Vec::new(),
        generation: 0,
        awaiting_pkid: handle.awaiting_pkid.clone(),
        in_flight: HashMap::new(),
        resends: 0,
        published: links.published,
        connected_at: None,
    };
    let span = tracing::info_span!("mqtt", broker = %format!("{}:{}", cfg.host, cfg.port));
    tracker.spawn(driver.run(links.shutdown, links.drain).instrument(span));
    Ok(handle)
}

/// A message handed to the store, waiting for its commit before its PUBACK.
struct Unacked {
    pkid: u16,
    /// The connection it arrived on; its PUBACK is only valid there.
    generation: u64,
    topic: String,
    write: PendingWrite,
}

struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    router: Router,
    store: Store,
    health: Health,
    backoff: Backoff,
    /// In arrival order; the store commits in the same order.
    unacked: VecDeque<Unacked>,
    /// Packet ids committed and due a PUBACK on the current connection.
    ready: Vec<u16>,
    /// Counts connections, so a PUBACK is never sent on a later connection than its message's.
    generation: u64,
    awaiting_pkid: Arc<Mutex<VecDeque<Published>>>,
    /// Our desired publishes the broker has not acknowledged, by packet id.
    in_flight: HashMap<u16, Published>,
    /// Publishes of the last connection that rumqttc sends again before any new one.
    resends: usize,
    published: mpsc::Sender<Published>,
    /// When the current connection came up.
    connected_at: Option<tokio::time::Instant>,
}

impl Driver {
    async fn run(mut self, shutdown: CancellationToken, drain: Duration) {
        let filters = self.router.filters();
        let mut connected = false;
        let mut last_problem: Option<Problem> = None;
        loop {
            self.send_acks().await;
            let read = self.unacked.len() < WINDOW;
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                result = next_commit(&mut self.unacked) => {
                    if !self.on_committed(result) {
                        self.drop_connection("a message could not be stored; the broker will send it again");
                        self.pause(&shutdown).await;
                    }
                    continue;
                }
                event = self.eventloop.poll(), if read => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if !ack.session_present {
                        // rumqttc dropped what it had pending from the old session.
                        self.forget_desired_publishes();
                    }
                    connected = true;
                    last_problem = None;
                    self.connected_at = Some(tokio::time::Instant::now());
                    // Publishes rumqttc kept from the last connection go out first, each with
                    // an Outgoing::Publish event that belongs to no desired publish we track.
                    self.resends = self
                        .eventloop
                        .pending
                        .iter()
                        .filter(|r| matches!(r, rumqttc::Request::Publish(_)))
                        .count();
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
                    let problem = Problem::of(&e);
                    if connected {
                        tracing::warn!(error = %e, "lost broker connection; reconnecting with backoff");
                    } else if last_problem != Some(problem) {
                        // Once per kind of failure, not once per attempt.
                        tracing::warn!(error = %e, "{}; retrying with backoff (logged again on change)", problem.advice());
                    }
                    last_problem = Some(problem);
                    connected = false;
                    self.new_generation();
                    if problem == Problem::Refused {
                        self.health.set_mqtt(LinkState::Refused);
                    }
                    self.pause(&shutdown).await;
                }
            }
        }
        self.drain(drain).await;
    }

    async fn on_publish(&mut self, publish: rumqttc::Publish) {
        let op = self.router.route(
            &publish.topic,
            &publish.payload,
            publish.pkid,
            publish.dup,
            UnixMillis::now(),
        );
        if let WriteOp::Reject(r) = &op {
            tracing::warn!(topic = %r.locator, device = r.device.as_deref().unwrap_or("-"), reason = %r.reason, "rejected message");
        }
        let write = match self.store.enqueue(op).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable; message left unacknowledged");
                return;
            }
        };
        if publish.qos != QoS::AtMostOnce {
            self.unacked.push_back(Unacked {
                pkid: publish.pkid,
                generation: self.generation,
                topic: publish.topic,
                write,
            });
        }
    }

    /// Handles the oldest commit and every later one already answered. Returns false if a
    /// write failed (logged once for the lot).
    fn on_committed(&mut self, first: Result<Outcome, crate::store::StoreError>) -> bool {
        let Some(done) = self.unacked.pop_front() else {
            return true;
        };
        let mut failed = Vec::new();
        self.note(done, first, &mut failed);
        while let Some(next) = self.unacked.front_mut() {
            let Some(result) = next.write.try_take() else {
                break;
            };
            let done = self.unacked.pop_front().expect("front exists");
            self.note(done, result, &mut failed);
        }
        if let Some((topic, e)) = failed.first() {
            tracing::error!(messages = failed.len(), first_topic = %topic, error = %e,
                "messages not stored and not acknowledged; the broker will resend them");
        }
        failed.is_empty()
    }

    fn note(
        &mut self,
        done: Unacked,
        result: Result<Outcome, crate::store::StoreError>,
        failed: &mut Vec<(String, crate::store::StoreError)>,
    ) {
        match result {
            Ok(outcome) => {
                if outcome == Outcome::Duplicate {
                    tracing::debug!(topic = %done.topic, pkid = done.pkid, "redelivery of a stored message; acknowledged again");
                }
                if done.generation == self.generation {
                    self.ready.push(done.pkid);
                }
            }
            Err(e) => failed.push((done.topic, e)),
        }
    }

    /// Writes the PUBACKs of committed messages straight to the connection, one flush for all.
    async fn send_acks(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let Some(network) = self.eventloop.network.as_mut() else {
            self.ready.clear(); // Disconnected: the broker will redeliver them.
            return;
        };
        let pkids = std::mem::take(&mut self.ready);
        let write_all = async {
            for pkid in pkids {
                network.write(Packet::PubAck(PubAck::new(pkid))).await?;
            }
            network.flush().await
        };
        match tokio::time::timeout(FLUSH_TIMEOUT, write_all).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.drop_connection(&format!("cannot send acknowledgements: {e}")),
            Err(_) => self.drop_connection("broker did not take acknowledgements in time"),
        }
    }

    fn drop_connection(&mut self, why: &str) {
        tracing::warn!("dropping the broker connection: {why}");
        self.eventloop.clean();
        self.new_generation();
    }

    fn new_generation(&mut self) {
        self.generation += 1;
        self.ready.clear();
        self.forget_desired_publishes();
        self.health.set_mqtt(LinkState::Down);
    }

    /// Forgets which desired publishes await a broker acknowledgement (see
    /// [`MqttHandle::awaiting_pkid`]); the downlink publishes them again.
    fn forget_desired_publishes(&mut self) {
        self.awaiting_pkid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.in_flight.clear();
    }

    /// Waits the next backoff delay (or until shutdown).
    async fn pause(&mut self, shutdown: &CancellationToken) {
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_AFTER)
        {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        tracing::debug!(?delay, attempt = self.backoff.attempts(), "reconnect delay");
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    fn on_outgoing_publish(&mut self, pkid: u16) {
        if self.resends > 0 {
            self.resends -= 1;
            return; // A publish of the last connection, sent again.
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

    /// Shutdown: read nothing more (the broker keeps it), acknowledge what was handed to the
    /// store within `deadline`, disconnect.
    async fn drain(mut self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        while !self.unacked.is_empty() {
            match tokio::time::timeout_at(until, next_commit(&mut self.unacked)).await {
                Ok(result) => {
                    self.on_committed(result);
                }
                Err(_) => {
                    tracing::warn!(
                        left = self.unacked.len(),
                        "shutdown deadline reached; the broker will redeliver the rest"
                    );
                    break;
                }
            }
        }
        self.send_acks().await;
        if self.eventloop.network.is_none() {
            // Not connected: polling would connect just to say goodbye.
            self.health.set_mqtt(LinkState::Down);
            return;
        }
        let _ = self.client.try_disconnect();
        let flush = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(event)) = tokio::time::timeout_at(flush, self.eventloop.poll()).await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
        self.health.set_mqtt(LinkState::Down);
        tracing::info!("disconnected from broker");
    }
}

/// Why a connection attempt failed, as far as it changes what an operator should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    /// The broker answered and said no: credentials, ACL or client id.
    Refused,
    /// No answer, or the connection broke.
    Unreachable,
}

impl Problem {
    fn of(e: &rumqttc::ConnectionError) -> Problem {
        match e {
            rumqttc::ConnectionError::ConnectionRefused(_) => Problem::Refused,
            _ => Problem::Unreachable,
        }
    }

    fn advice(self) -> &'static str {
        match self {
            Problem::Refused => {
                "broker refused the connection: check mqtt.username, mqtt.password_file (or \
                 credential mqtt-password), mqtt.client_id and the broker's ACL"
            }
            Problem::Unreachable => "cannot reach broker",
        }
    }
}

/// The commit answer of the oldest unacknowledged message; pending forever when there is none.
///
/// # Cancel safety
/// Cancel safe: the answer stays in the oneshot until taken.
async fn next_commit(unacked: &mut VecDeque<Unacked>) -> Result<Outcome, crate::store::StoreError> {
    match unacked.front_mut() {
        Some(front) => (&mut front.write).await,
        None => std::future::pending().await,
    }
}
