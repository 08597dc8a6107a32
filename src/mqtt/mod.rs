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
//! reading once [`WINDOW`] messages are waiting for their commit. The window bounds what is
//! read but not yet committed; it does not bound what a broken connection makes the broker
//! resend. A PUBACK written is not a PUBACK read: under several flooding publishers Mosquitto
//! 2.0.11 read one of ours per four PUBLISHes it forwarded (16,000–18,000 stored messages
//! awaiting their PUBACK's turn), and when a connection ends in a RST it drops what it had not
//! read. So after a crash or a lost connection the broker resends up to that many stored
//! messages.
//!
//! Redeliveries carry DUP and their original packet id; the store recognises one whose content
//! it already holds ([`crate::store::DEDUP_SPAN`], which says why it is half the packet-id
//! space) and it is acknowledged without being stored twice.
//!
//! **A clean stop leaves nothing stored to resend** (SIGTERM, i.e. `links.shutdown`): read no
//! more, wait (within `links.drain`) for the commits of what was handed to the store, write
//! their PUBACKs, then DISCONNECT and read and discard until the broker closes the connection
//! ([`Link::goodbye`]). Messages read in that last phase are neither stored nor acknowledged; the
//! broker resends them to the next connection, where they are stored once. Dropping the socket
//! instead, while the broker still streams to us, closes it with unread data, which Linux
//! answers with a RST: Mosquitto then never reads our last PUBACKs nor the DISCONNECT (its log
//! said "closed its connection", not "Received DISCONNECT"), and resent thousands of stored
//! messages per stop.
//!
//! If a commit fails (a full disk), that message and every later one of the same connection
//! are left unacknowledged (the store holds them back rather than storing them out of order),
//! the connection is dropped at once and the next one waits out the backoff; the broker then
//! resends them all, in order.
//!
//! **Cancel safety.** The driver waits on the poll, the oldest commit and the desired queue at
//! once, so either can interrupt a poll that is waiting on the network (or connecting: the
//! attempt is simply made again). rumqttc's read path only buffers, so nothing is lost there.
//! An interrupted write can drop one outgoing packet, only when rumqttc's buffer already holds
//! 8 KiB and the socket takes nothing: a ping (recovered by reconnecting), a desired publish
//! (published again by the downlink), or in theory the SUBSCRIBE right after a CONNACK (the
//! buffer is empty then, so it does not happen in practice). The driver's own PUBACKs are
//! written outside the poll and are never interrupted.
//!
//! **Backoff** grows with each failed or short-lived connection and resets only after one that
//! lasted `STABLE_AFTER` (30 s), so a broker that keeps dropping us, or a full disk that makes us
//! drop the connection, cannot turn into a reconnect storm.
//!
//! **TLS** (`[mqtt.tls]`): the configuration holds a rustls `ClientConfig` built from the
//! certificate files at load time ([`crate::config::TlsClient`]), handed to rumqttc as its
//! transport. When a connection attempt fails for a TLS reason, [`tls`] turns rustls' error into
//! a sentence naming the certificate problem, logged with the usual "cannot reach broker" line,
//! kept in [`Health::mqtt_error`] for `status`, and the link is `refused` (see [`tls`] for why).
//!
//! Downlink: [`MqttHandle::publish_desired`] hands a desired document to the driver, which
//! publishes it retained at QoS 1 and matches the broker's PUBACK to it ([`desired`]), then
//! reports it on the `published` channel so the store can record that the broker holds it.

pub mod desired;
mod link;
mod problem;
pub mod router;
mod tls;

use problem::Problem;

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::topics::Template;
use crate::config::{MAX_WIRE_PACKET, MqttConfig, TlsClient};
use crate::health::{Health, LinkState};
use crate::model::{DesiredDoc, Outcome, UnixMillis, WriteOp};
use crate::store::{PendingWrite, Store, StoreError};
pub use desired::Published;
use link::Link;
use router::Router;

/// Messages read but not yet acknowledged before the driver stops reading. Two store batches:
/// one committing while the next fills, so group commit stays full without letting the
/// acknowledgements fall far behind.
pub const WINDOW: usize = 2 * crate::store::MAX_BATCH;

/// Requests (desired publishes, subscribes, disconnect) waiting for the event loop.
const REQUEST_QUEUE: usize = 1024;

/// Desired documents waiting for the driver; beyond this the downlink tries again later.
const DESIRED_QUEUE: usize = 256;

/// A connection that lasted this long counts as healthy: the next reconnect starts from
/// `reconnect_min` again. Shorter ones (a broker that drops us at once, a full disk making us
/// drop it) keep the delay growing, so a persistent fault cannot become a reconnect storm.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How often a broker outage that goes on is logged again (with the attempts since).
const CALM_LOG: Duration = Duration::from_secs(60);

/// Longest wait for the broker to take a batch of PUBACKs before the connection is dropped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Least time shutdown gives the broker, after our DISCONNECT, to read what we wrote and close
/// the connection ([`Link::goodbye`]), even when the drain used up its deadline. Under a flood
/// Mosquitto reads one packet of ours per turn of its loop, so tens of thousands of PUBACKs
/// can be waiting in its socket; within the daemon's grace of 2 s beyond the drain.
const GOODBYE_MIN: Duration = Duration::from_secs(1);

/// Cheap cloneable handle for publishing to the broker.
#[derive(Clone)]
pub struct MqttHandle {
    desired: mpsc::Sender<DesiredDoc>,
    health: Health,
}

impl MqttHandle {
    /// Hands a desired document to the MQTT task, which publishes it retained at QoS 1 on the
    /// device's desired topic if it is connected. The broker's acknowledgement arrives later
    /// on the `published` channel given to [`spawn`]; a document that never gets one is simply
    /// published again by the downlink (retained, so a repeat is harmless).
    ///
    /// # Errors
    /// When the task's queue is full (try again later) or the task has stopped.
    pub fn publish_desired(
        &self,
        doc: &DesiredDoc,
    ) -> Result<(), mpsc::error::TrySendError<DesiredDoc>> {
        self.desired.try_send(doc.clone())
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
/// acknowledging (within `links.drain`) everything already handed to the store and waiting
/// for the broker to close the connection, so that it has read those acknowledgements.
pub fn spawn(cfg: &MqttConfig, links: Links, tracker: &TaskTracker) -> MqttHandle {
    let router = Router::new(&cfg.topics, cfg.max_message_size);
    let desired_topic = cfg.topics.desired.clone();
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_WIRE_PACKET, MAX_WIRE_PACKET)
        .set_inflight(100);
    if let Some(user) = &cfg.username {
        let password = cfg
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        opts.set_credentials(user.clone(), password);
    }
    if let Some(tls) = &cfg.tls.client {
        // The configuration names the ring provider itself; installing the process default
        // too keeps every rustls user in the process on the same one.
        crate::cloud::install_crypto_provider();
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.config(),
        )));
    }
    let (client, eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);
    let (desired_tx, desired_rx) = mpsc::channel(DESIRED_QUEUE);
    let handle = MqttHandle {
        desired: desired_tx,
        health: links.health.clone(),
    };
    let driver = Driver {
        link: Link::new(eventloop),
        client,
        router,
        desired_topic,
        store: links.store,
        health: links.health,
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        unacked: VecDeque::new(),
        ready: Vec::new(),
        generation: 0,
        connected: false,
        connected_at: None,
        must_pause: false,
        tracker: desired::Tracker::default(),
        desired: desired_rx,
        published: links.published,
        tls: cfg.tls.client.clone(),
    };
    let scheme = if cfg.tls.client.is_some() {
        "mqtts"
    } else {
        "mqtt"
    };
    let span =
        tracing::info_span!("mqtt", broker = %format!("{scheme}://{}:{}", cfg.host, cfg.port));
    tracker.spawn(driver.run(links.shutdown, links.drain).instrument(span));
    handle
}

/// A message handed to the store, waiting for its commit (and then its PUBACK, unless QoS 0).
struct Unacked {
    /// `None` for QoS 0: nothing to acknowledge, but a failed commit must still drop the
    /// connection, or the store would hold back every later message of it.
    pkid: Option<u16>,
    /// The connection it arrived on; its PUBACK is only valid there.
    generation: u64,
    topic: String,
    write: PendingWrite,
}

struct Driver {
    /// rumqttc's event loop; its internals only through [`Link`].
    link: Link,
    client: AsyncClient,
    router: Router,
    desired_topic: Template,
    store: Store,
    health: Health,
    backoff: Backoff,
    /// In arrival order; the store commits in the same order.
    unacked: VecDeque<Unacked>,
    /// Packet ids committed and due a PUBACK on the current connection.
    ready: Vec<u16>,
    /// Counts connections: a PUBACK is only sent on its message's connection, and the store
    /// holds back a connection's writes after one of them failed.
    generation: u64,
    /// A CONNACK was received on the current connection.
    connected: bool,
    connected_at: Option<tokio::time::Instant>,
    /// The connection was dropped: wait out the backoff before the next attempt.
    must_pause: bool,
    tracker: desired::Tracker,
    desired: mpsc::Receiver<DesiredDoc>,
    published: mpsc::Sender<Published>,
    /// Set for TLS to the broker: what [`tls::explain`] names in its sentences.
    tls: Option<TlsClient>,
}

impl Driver {
    async fn run(mut self, shutdown: CancellationToken, drain: Duration) {
        let filters = self.router.filters();
        let mut last_problem: Option<Problem> = None;
        // Failed attempts since the last log line, and when that line was written: a long
        // outage is logged calmly (every CALM_LOG), not once and then never again.
        let mut failed_attempts: u32 = 0;
        let mut logged_at = tokio::time::Instant::now();
        let mut subscribed_once = false;
        loop {
            self.send_acks().await;
            if std::mem::take(&mut self.must_pause) {
                self.pause(&shutdown).await;
            }
            let read = self.unacked.len() < WINDOW;
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                result = next_commit(&mut self.unacked) => {
                    self.on_committed(result);
                    continue;
                }
                Some(doc) = self.desired.recv() => {
                    self.publish_desired(doc);
                    continue;
                }
                event = self.link.poll(), if read => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.connected = true;
                    last_problem = None;
                    self.connected_at = Some(tokio::time::Instant::now());
                    self.health.set_mqtt_error(None);
                    self.health.set_mqtt(LinkState::Connected);
                    tracing::info!(session_present = ack.session_present, "connected to broker");
                    // A resumed session keeps our subscriptions, and subscribing again would
                    // make the broker resend every retained message (stored again, an old
                    // retained state applied after newer ones). Subscribe when the session is
                    // new, and once per process in case the configured topics changed.
                    if !ack.session_present || !subscribed_once {
                        subscribed_once = true;
                        for filter in &filters {
                            if let Err(e) =
                                self.client.try_subscribe(filter.clone(), QoS::AtLeastOnce)
                            {
                                tracing::error!(%filter, error = %e, "cannot queue subscription");
                            }
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
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.tracker.sent(pkid),
                Ok(_) => {}
                Err(e) => {
                    let problem = Problem::of(&e, self.tls.as_ref());
                    if self.connected {
                        tracing::warn!(error = %e, "lost broker connection; reconnecting with backoff");
                    } else if last_problem.as_ref() != Some(&problem) {
                        // Once per kind of failure, not once per attempt.
                        tracing::warn!(error = %e, "{}; retrying with backoff (logged again on change, and every minute)", problem.advice());
                        failed_attempts = 0;
                        logged_at = tokio::time::Instant::now();
                    } else {
                        failed_attempts += 1;
                        if logged_at.elapsed() >= CALM_LOG {
                            tracing::warn!(error = %e, attempts = failed_attempts,
                                "{}; still retrying with backoff", problem.advice());
                            failed_attempts = 0;
                            logged_at = tokio::time::Instant::now();
                        }
                    }
                    let state = match problem {
                        Problem::Refused | Problem::Tls { refused: true, .. } => LinkState::Refused,
                        Problem::Unreachable | Problem::Tls { refused: false, .. } => {
                            LinkState::Down
                        }
                    };
                    if !self.connected {
                        let why = match &problem {
                            Problem::Tls { sentence, .. } => sentence.clone(),
                            other => format!("{}: {e}", other.advice()),
                        };
                        self.health.set_mqtt_error(Some(why));
                    }
                    last_problem = Some(problem);
                    self.new_generation(state);
                    self.must_pause = true;
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
        let write = match self.store.enqueue_from(op, Some(self.generation)).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable; message left unacknowledged");
                return;
            }
        };
        let pkid = (publish.qos != QoS::AtMostOnce).then_some(publish.pkid);
        self.unacked.push_back(Unacked {
            pkid,
            generation: self.generation,
            topic: publish.topic,
            write,
        });
    }

    /// Handles the oldest commit and every later one already answered. A failed write of the
    /// current connection drops it (logged once for the lot); failures of an older connection
    /// were already dealt with when it dropped.
    fn on_committed(&mut self, first: Result<Outcome, StoreError>) {
        let Some(done) = self.unacked.pop_front() else {
            return;
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
            self.drop_connection("a message could not be stored");
        }
    }

    fn note(
        &mut self,
        done: Unacked,
        result: Result<Outcome, StoreError>,
        failed: &mut Vec<(String, StoreError)>,
    ) {
        let current = done.generation == self.generation;
        match result {
            Ok(outcome) => {
                if outcome == Outcome::Duplicate {
                    tracing::debug!(topic = %done.topic, pkid = ?done.pkid, "redelivery of a stored message; acknowledged again");
                }
                if current && let Some(pkid) = done.pkid {
                    self.ready.push(pkid);
                }
            }
            Err(e) if current => failed.push((done.topic, e)),
            Err(_) => {}
        }
    }

    /// Writes the PUBACKs of committed messages straight to the connection, one flush for all.
    async fn send_acks(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let pkids = std::mem::take(&mut self.ready);
        match tokio::time::timeout(FLUSH_TIMEOUT, self.link.send_acks(pkids)).await {
            // `None`: disconnected, and the broker will redeliver them.
            Ok(None | Some(Ok(()))) => {}
            Ok(Some(Err(e))) => {
                self.drop_connection(&format!("cannot send acknowledgements: {e}"));
            }
            Err(_) => self.drop_connection("broker did not take acknowledgements in time"),
        }
    }

    /// Publishes a desired document if connected; otherwise the downlink sends it again later.
    fn publish_desired(&mut self, doc: DesiredDoc) {
        if !self.connected {
            return;
        }
        let topic = self.desired_topic.topic(doc.device.as_str());
        let payload = serde_json::to_vec(&doc.doc).unwrap_or_default();
        self.tracker.handed(Published {
            device: doc.device,
            seq: doc.seq,
        });
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, payload)
        {
            self.tracker.take_back();
            tracing::debug!(error = %e, "desired publish not queued; the downlink will send it again");
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        if let Some(p) = self.tracker.acknowledged(pkid)
            && self.published.try_send(p).is_err()
        {
            // The downlink republishes anything not recorded as published; retained QoS 1
            // makes that harmless.
            tracing::debug!(pkid, "publish confirmation dropped; it will be republished");
        }
    }

    fn drop_connection(&mut self, why: &str) {
        if !self.connected && !self.link.has_connection() {
            return; // Already down.
        }
        tracing::warn!("dropping the broker connection: {why}");
        self.link.drop_connection();
        self.new_generation(LinkState::Down);
        self.must_pause = true;
    }

    /// After the connection dropped (rumqttc has cleaned up): nothing of the old connection
    /// may be acknowledged or matched on the next one.
    fn new_generation(&mut self, state: LinkState) {
        self.generation += 1;
        self.connected = false;
        self.ready.clear();
        self.link.forget_old_connection();
        self.tracker.reset();
        self.health.set_mqtt(state);
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

    /// Shutdown: read nothing more (the broker keeps it), acknowledge what was handed to the
    /// store within `deadline`, disconnect.
    async fn drain(mut self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        while !self.unacked.is_empty() {
            match tokio::time::timeout_at(until, next_commit(&mut self.unacked)).await {
                Ok(result) => self.on_committed(result),
                Err(_) => {
                    tracing::warn!(
                        left = self.unacked.len(),
                        "shutdown deadline reached; the broker will redeliver the rest"
                    );
                    break;
                }
            }
        }
        if tokio::time::timeout_at(until, self.send_acks())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline reached while sending acknowledgements");
        }
        let bye = until.max(tokio::time::Instant::now() + GOODBYE_MIN);
        match self.link.goodbye(bye).await {
            Ok(None) => {} // Not connected: nothing to say goodbye to.
            Ok(Some(discarded)) => {
                tracing::info!(
                    discarded,
                    "disconnected from broker; it resends what arrived after the stop"
                );
            }
            Err(why) => tracing::warn!(
                "broker did not close the connection after DISCONNECT ({why}); \
                 it may resend messages already stored"
            ),
        }
        self.health.set_mqtt(LinkState::Down);
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
