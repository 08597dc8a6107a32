//! The CoAP server's I/O: the receive loop, request handlers and the notifier.
//!
//! Three kinds of task share one [`Shared`]:
//! - the **receive loop** reads datagrams, deduplicates requests, answers what needs no
//!   store at once, and spawns a handler for the rest (or answers 5.03 when all
//!   `max_concurrent` permits are taken);
//! - a **handler** per request waits for the store and then sends the response;
//! - the **notifier** sends the notifications the observer registry has due.
//!
//! Locks are `std` mutexes held only for pure bookkeeping, never across an `.await`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, Packet, RequestType};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::exchange::{Check, Exchanges};
use super::message::{self, Exchange, Incoming, MessageIds};
use super::observe::Registry;
use super::reply::{NotStored, Reply};
use super::route::{self, Observe, Plan};
use super::{CoapStats, OVERLOAD_RETRY_AFTER_SECS, STORE_RETRY_AFTER_SECS};
use crate::model::{DesiredDoc, DeviceKey, Format, UnixMillis, WriteOp};
use crate::store::Store;

/// Receive buffer: the largest UDP payload, so an oversized request is read whole and
/// answered 4.13 rather than truncated into something that parses.
const RECV_BUFFER: usize = 65_535;

/// At most one log line per this interval for each kind of repetitive trouble (malformed
/// datagrams, receive errors, overload, a full observer registry).
pub(super) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Pause after a receive error, so a persistent one cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// State shared by the server's tasks and the [`super::CoapHandle`].
pub(super) struct Shared {
    pub(super) socket: UdpSocket,
    pub(super) store: Store,
    pub(super) max_message_size: usize,
    pub(super) permits: Arc<Semaphore>,
    pub(super) exchanges: Mutex<Exchanges>,
    pub(super) observers: Mutex<Registry>,
    /// Rung when the registry has notifications due.
    pub(super) due: Notify,
    pub(super) ids: MessageIds,
    pub(super) counters: Counters,
    /// Rate limits for warnings a busy or crowded server would otherwise repeat per request.
    pub(super) overload_log: Mutex<LogGate>,
    pub(super) observers_full_log: Mutex<LogGate>,
}

#[derive(Default)]
pub(super) struct Counters {
    requests: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
    overloaded: AtomicU64,
    notifications: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn stats(&self) -> CoapStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CoapStats {
            requests: get(&c.requests),
            duplicates: get(&c.duplicates),
            malformed: get(&c.malformed),
            overloaded: get(&c.overloaded),
            notifications: get(&c.notifications),
            observers: lock(&self.observers).len(),
        }
    }

    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        if let Err(e) = self.socket.send_to(bytes, peer).await {
            tracing::debug!(%peer, error = %e, "cannot send datagram");
        }
    }

    /// Frames a reply and records it for retransmissions of a confirmable request (unless
    /// the request is safe or the reply says "try again later").
    fn finish(&self, peer: SocketAddr, to: &Exchange, replayable: bool, reply: &Reply) -> Vec<u8> {
        let bytes = message::response(reply, to, &self.ids);
        let mut exchanges = lock(&self.exchanges);
        if replayable && !reply.is_retry_later() {
            exchanges.answered(peer, to.mid, bytes.clone());
        } else {
            exchanges.forget(peer, to.mid);
        }
        bytes
    }

    /// Handles one request in the receive loop: returns what to send at once, if anything.
    fn on_request(
        self: &Arc<Self>,
        req: Packet,
        peer: SocketAddr,
        tracker: &TaskTracker,
    ) -> Option<Vec<u8>> {
        bump(&self.counters.requests);
        let to = Exchange::of(&req);
        let seen = lock(&self.exchanges).check(peer, to.mid, to.confirmable, Instant::now());
        match seen {
            Check::New => {}
            Check::InProgress | Check::Duplicate => {
                bump(&self.counters.duplicates);
                tracing::debug!(%peer, mid = to.mid, "duplicate request dropped");
                return None;
            }
            Check::Replay(bytes) => {
                bump(&self.counters.duplicates);
                tracing::debug!(%peer, mid = to.mid, "retransmission answered with the cached response");
                return Some(bytes);
            }
        }
        // Safe requests are simply handled again; only unsafe ones need their answer kept.
        let replayable = !matches!(req.header.code, MessageClass::Request(RequestType::Get));
        let path = route::path_of(&req);
        let plan = route::plan(&req, self.max_message_size, UnixMillis::now());
        if let Plan::Answer(reply) = &plan {
            tracing::debug!(%peer, %path, code = ?reply.code, "answered");
            return Some(self.finish(peer, &to, replayable, reply));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            bump(&self.counters.overloaded);
            if let Some(suppressed) = lock(&self.overload_log).allow(Instant::now()) {
                tracing::warn!(%peer, %path, suppressed, "all CoAP handlers busy; answering 5.03");
            }
            let reply = Reply::unavailable(OVERLOAD_RETRY_AFTER_SECS, "gateway busy, retry later");
            return Some(self.finish(peer, &to, replayable, &reply));
        };
        let device = match &plan {
            Plan::Ingest(i) => i.device.to_string(),
            Plan::Refuse { rejection, .. } => rejection.device.clone().unwrap_or_default(),
            Plan::Desired { device, .. } => device.to_string(),
            Plan::Answer(_) => String::new(),
        };
        let span = tracing::info_span!("request", %peer, %path, %device);
        tracker.spawn(
            self.clone()
                .handle(plan, peer, to, replayable, permit)
                .instrument(span),
        );
        None
    }

    async fn handle(
        self: Arc<Self>,
        plan: Plan,
        peer: SocketAddr,
        to: Exchange,
        replayable: bool,
        _permit: OwnedSemaphorePermit,
    ) {
        let reply = match plan {
            Plan::Answer(reply) => reply,
            Plan::Ingest(inbound) => {
                let result = self.store.write(WriteOp::Ingest(inbound)).await;
                match &result {
                    Ok(outcome) => tracing::debug!(?outcome, "stored"),
                    Err(e) => tracing::error!(error = %e, "store unavailable; answered 5.03"),
                }
                let result = result.map_err(|e| {
                    if e.is_disk_full() {
                        NotStored::Full
                    } else {
                        NotStored::Unavailable
                    }
                });
                Reply::after_ingest(&result, STORE_RETRY_AFTER_SECS)
            }
            Plan::Refuse { rejection, reply } => {
                tracing::warn!(reason = %rejection.reason, code = ?reply.code, "rejected request");
                if let Err(e) = self.store.write(WriteOp::Reject(rejection)).await {
                    tracing::error!(error = %e, "cannot record the rejection");
                }
                reply
            }
            Plan::Desired {
                device,
                format,
                observe,
            } => self.desired(peer, &to, device, format, observe).await,
        };
        let bytes = self.finish(peer, &to, replayable, &reply);
        self.send(&bytes, peer).await;
    }

    /// GET of a desired document, with Observe registration or deregistration.
    async fn desired(
        &self,
        peer: SocketAddr,
        to: &Exchange,
        device: DeviceKey,
        format: Format,
        observe: Observe,
    ) -> Reply {
        let registering = match observe {
            Observe::Register => {
                let ok = lock(&self.observers).begin(
                    peer,
                    device.clone(),
                    to.token.clone(),
                    format,
                    Instant::now(),
                );
                if !ok
                    && let Some(suppressed) = lock(&self.observers_full_log).allow(Instant::now())
                {
                    tracing::warn!(
                        suppressed,
                        "observer limit reached; answering without registering"
                    );
                }
                ok
            }
            Observe::Deregister => {
                if lock(&self.observers).deregister(peer, &device) {
                    tracing::debug!("observer deregistered");
                }
                false
            }
            Observe::No => false,
        };
        let key = device.clone();
        let stored = self.store.call(move |db| db.desired(&key)).await;
        let stored = match stored {
            Ok(doc) => doc,
            Err(e) => {
                if registering {
                    lock(&self.observers).cancel(peer, &device, &to.token);
                }
                tracing::error!(error = %e, "cannot read desired state; answered 5.03");
                return Reply::unavailable(STORE_RETRY_AFTER_SECS, "gateway storage unavailable");
            }
        };
        let (observe, doc) = if registering {
            match lock(&self.observers).complete(peer, &device, &to.token, stored.clone()) {
                Some((n, doc)) => (Some(n), doc),
                None => (None, stored),
            }
        } else {
            (None, stored)
        };
        if observe.is_some() {
            tracing::debug!("observer registered");
        }
        // A device with no desired document yet gets an empty one (and, if it observes, the
        // first real one as a notification).
        let empty = serde_json::Value::Object(serde_json::Map::new());
        Reply::content(
            doc.as_ref().map_or(&empty, |d: &DesiredDoc| &d.doc),
            format,
            observe,
        )
    }
}

/// Reads and dispatches datagrams until `shutdown` fires.
pub(super) async fn receive(
    shared: Arc<Shared>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut malformed_log = LogGate::new(LOG_EVERY);
    let mut error_log = LogGate::new(LOG_EVERY);
    loop {
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = shared.socket.recv_from(&mut buf) => r,
        };
        let (len, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                if let Some(suppressed) = error_log.allow(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "UDP receive failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ERROR_PAUSE) => continue,
                }
            }
        };
        let out = match message::classify(&buf[..len]) {
            Incoming::Request(req) => shared.on_request(req, peer, &tracker),
            Incoming::Ping { mid } => Some(message::reset(mid)),
            Incoming::Reset { mid } => {
                if lock(&shared.observers).reset(peer, mid) {
                    tracing::debug!(%peer, "observer cancelled by RST");
                }
                None
            }
            Incoming::Ignore => None,
            Incoming::Malformed { reset } => {
                bump(&shared.counters.malformed);
                if let Some(suppressed) = malformed_log.allow(Instant::now()) {
                    tracing::debug!(%peer, len, suppressed, "malformed datagram dropped");
                }
                reset.map(message::reset)
            }
        };
        if let Some(bytes) = out {
            shared.send(&bytes, peer).await;
        }
    }
    tracing::debug!("stopped reading requests; handlers in progress finish");
}

/// Sends due notifications whenever the registry rings.
pub(super) async fn notify(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = shared.due.notified() => {}
        }
        let due = lock(&shared.observers).take_due(|| shared.ids.next());
        for n in due {
            bump(&shared.counters.notifications);
            tracing::debug!(peer = %n.peer, device = %n.doc.device, seq = n.doc.seq, observe = n.observe, "notification");
            shared.send(&message::notification(&n), n.peer).await;
        }
    }
}

/// Lets one log line through per interval and counts the ones held back.
#[derive(Debug)]
pub(super) struct LogGate {
    every: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl LogGate {
    pub(super) fn new(every: Duration) -> LogGate {
        LogGate {
            every,
            next: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_gate_lets_one_line_through_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut gate = LogGate::new(Duration::from_secs(10));
        assert_eq!(gate.allow(t0), Some(0));
        assert_eq!(gate.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(gate.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(gate.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(gate.allow(t0 + Duration::from_secs(11)), None);
    }
}
