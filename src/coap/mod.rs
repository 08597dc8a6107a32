//! CoAP (RFC 7252) server on a UDP socket: device ingest and the desired-state resource with
//! Observe (RFC 7641).
//!
//! coap-lite parses and frames messages; the server loop, deduplication and Observe are ours.
//!
//! # Resources
//!
//! - `POST|PUT /d/{device}/state`: a JSON Merge Patch (RFC 7386) of the device's reported
//!   state. Both methods merge: a PUT of a whole document sets every field it names but does
//!   not delete the others (send `null` for that).
//! - `POST /d/{device}/telemetry`: one point or an array of points.
//! - `GET /d/{device}/desired`: the device's desired document, JSON unless Accept is 60
//!   (CBOR); 4.06 for another Accept. A device with no desired document yet gets 2.05 with
//!   `{}` rather than 4.04, so a device that polls or observes before any exists gets
//!   something usable; an observer then receives the first real document as a notification.
//!
//! Payloads are Content-Format 50 (JSON) or 60 (CBOR); without the option the format is
//! detected as for MQTT; any other is 4.15. A payload over `coap.max_message_size` is 4.13
//! with Size1. There is no block-wise transfer (RFC 7959): a request split with Block1 is 4.13
//! (the client learns the limit from Size1), a Block2 request for block 0 gets the whole
//! document. Unknown critical options are 4.02. See [`route`] for every answer and which
//! refusals are also stored as rejections (those that lose a device's data, not unknown paths
//! or wrong methods).
//!
//! # Acknowledged only after commit
//!
//! The response to an ingest is sent only after the store has committed the message
//! (DESIGN.md §4): 2.01 Created when the message created the device, 2.04 Changed otherwise,
//! 5.03 with Max-Age if the store failed. A confirmable request gets a piggybacked ACK (same
//! message id and token); a non-confirmable one a NON response with a fresh message id (not
//! coap-lite's default of reusing the request's). There are no separate responses: commits
//! take milliseconds, and a client that retransmits meanwhile is ignored until the answer
//! comes (below).
//!
//! # Retransmissions (RFC 7252 §4.5)
//!
//! A confirmable request retransmitted by its client (same peer and message id within
//! `EXCHANGE_LIFETIME`, 247 s) is answered again with the cached response and not applied
//! twice; if the first copy is still being handled, the retransmission is ignored. A repeated
//! non-confirmable request within `NON_LIFETIME` (145 s) is dropped. The cache holds
//! [`DEDUP_CAPACITY`] entries, oldest evicted first ([`exchange`]). Responses to GET are not
//! kept (GET is safe: it is handled again), nor are 5.03 answers (the retry gets a real
//! chance).
//!
//! # Bounds and order
//!
//! Requests that need the store run as tasks behind a semaphore of `coap.max_concurrent`
//! permits, so a slow commit never blocks the receive loop; when none is free the request is
//! answered 5.03 with Max-Age [`OVERLOAD_RETRY_AFTER_SECS`] at once. Two requests of one device
//! in flight together could be committed in either order, but a conforming client has at most
//! one confirmable request outstanding per server (NSTART = 1, RFC 7252 §4.7), so per-device
//! order holds for conforming clients; clients that fire non-confirmable requests without
//! waiting get no ordering promise (as with UDP itself). Requests that need no store (4.04,
//! 4.05, …) are answered from the receive loop without a permit.
//!
//! # Observe
//!
//! `GET /d/{device}/desired` with Observe = 0 registers the client (re-registration by the
//! same endpoint replaces it), Observe = 1 or a RST to a notification deregisters it. At most
//! [`MAX_OBSERVERS`] are kept; beyond that the GET is answered without registering (a
//! registration older than a day may be evicted to make room, see [`observe`]).
//! [`CoapHandle::desired_changed`] never blocks: it records the newest document per observer
//! under a short lock and wakes the notifier, which sends it as a NON 2.05 with the observer's
//! token, its requested Content-Format, a fresh message id and a 24-bit Observe number that
//! only increases. Notifications are NON: a lost one is superseded by the next change; the
//! daemon's downlink announces every change by `seq`, and one already sent is not repeated.
//! No Max-Age is sent with the document, so the default of 60 s applies: a client following
//! RFC 7641 §3.3.1 re-registers after a quiet minute, which the replacement rule absorbs.
//!
//! # Malformed input
//!
//! Unparseable datagrams are dropped (a confirmable one with a readable header gets RST),
//! counted in [`CoapStats::malformed`] and logged at debug at most once per 10 s. Nothing a
//! peer sends can panic the server.
//!
//! # Shutdown
//!
//! When `shutdown` fires the receive loop stops reading; handlers in progress finish and send
//! their responses (they are tasks on the daemon's tracker); the notifier stops.
//!
//! # Tracing
//!
//! The receive loop and notifier run in span `coap{local}`; each handler in a child span
//! `request{peer, path, device}`.

pub mod exchange;
pub mod message;
pub mod observe;
pub mod reply;
pub mod route;
mod server;

use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::CoapConfig;
use crate::model::DesiredDoc;
use crate::store::Store;

pub use exchange::{EXCHANGE_LIFETIME, NON_LIFETIME};

/// Most observers kept at once. Each costs a token, an address and at most one pending
/// document; a gateway has a few thousand devices at most, and few observe.
pub const MAX_OBSERVERS: usize = 1024;

/// Most requests remembered for deduplication. At 40 requests/s this covers the whole
/// 247 s exchange lifetime; beyond that the oldest go first, long after clients stop
/// retransmitting (within 45 s). An entry holds a small response (at most ~150 bytes).
pub const DEDUP_CAPACITY: usize = 10_000;

/// Max-Age of the 5.03 sent when every handler permit is taken: a short wait usually suffices.
pub const OVERLOAD_RETRY_AFTER_SECS: u32 = 2;

/// Max-Age of the 5.03 sent when the store failed (a full disk takes longer to clear).
pub const STORE_RETRY_AFTER_SECS: u32 = 30;

/// Counters since start, for status output and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoapStats {
    /// Requests received, duplicates included.
    pub requests: u64,
    /// Retransmitted or repeated requests not applied again.
    pub duplicates: u64,
    /// Datagrams that were not valid CoAP.
    pub malformed: u64,
    /// Requests answered 5.03 because every handler permit was taken.
    pub overloaded: u64,
    /// Notifications sent.
    pub notifications: u64,
    /// Observers registered now.
    pub observers: usize,
}

/// Cheap cloneable handle to the running server.
#[derive(Clone)]
pub struct CoapHandle {
    shared: Arc<server::Shared>,
}

impl CoapHandle {
    /// Tells the server a device's desired document changed; its observers get a
    /// notification. Never blocks: it takes a short lock and wakes the notifier. Announcing a
    /// change already sent (same or older `seq`) sends nothing.
    pub fn desired_changed(&self, doc: DesiredDoc) {
        if server::lock(&self.shared.observers).changed(&doc) {
            self.shared.due.notify_one();
        }
    }

    pub fn stats(&self) -> CoapStats {
        self.shared.stats()
    }
}

/// What the CoAP server is connected to inside the daemon.
pub struct Links {
    /// Bound by the caller (port 0 in tests), so binding fails before anything starts.
    pub socket: UdpSocket,
    pub store: Store,
    pub shutdown: CancellationToken,
}

/// Starts the server on the already-bound `links.socket`, as tasks on `tracker`. It stops
/// reading when `links.shutdown` fires; handlers in progress finish and answer.
pub fn spawn(cfg: &CoapConfig, links: Links, tracker: &TaskTracker) -> CoapHandle {
    let Links {
        socket,
        store,
        shutdown,
    } = links;
    let local = socket
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let shared = Arc::new(server::Shared {
        socket,
        store,
        max_message_size: cfg.max_message_size,
        permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
        exchanges: Mutex::new(exchange::Exchanges::new(DEDUP_CAPACITY)),
        observers: Mutex::new(observe::Registry::new(MAX_OBSERVERS)),
        due: Notify::new(),
        ids: message::MessageIds::new(fastrand::u16(..)),
        counters: server::Counters::default(),
        overload_log: Mutex::new(server::LogGate::new(server::LOG_EVERY)),
        observers_full_log: Mutex::new(server::LogGate::new(server::LOG_EVERY)),
    });
    let span = tracing::info_span!("coap", %local);
    tracker.spawn(
        server::receive(shared.clone(), tracker.clone(), shutdown.clone()).instrument(span.clone()),
    );
    tracker.spawn(server::notify(shared.clone(), shutdown).instrument(span));
    CoapHandle { shared }
}
