//! Pulls of single devices that a webhook asked for ([`crate::api`]'s Golioth intake), so a
//! change made in Golioth reaches the device in seconds instead of at the next interval.
//!
//! A request names a Golioth device. Requests for a device already waiting are one request;
//! a device is pulled at most once per `min_interval`: one asked for again sooner waits for
//! the end of it (so the change behind the last webhook of a storm is still read, and a storm
//! of a thousand is two pulls, not a thousand). The devices due together are pulled in one
//! focused run ([`super::Syncer::run_focused`]), [`MAX_PER_RUN`] at most. At most
//! [`MAX_WAITING`] devices wait; past that a request is refused (the interval's full run
//! still reads every device).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Syncer;

/// Devices pulled by one focused run at most.
pub const MAX_PER_RUN: usize = 50;

/// Devices waiting for a pull at most.
pub const MAX_WAITING: usize = 10_000;

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requested {
    /// Waiting now (a pull comes at once, or when `min_interval` since the last one is up).
    Scheduled,
    /// Already waiting: this request is that one.
    Coalesced,
    /// [`MAX_WAITING`] devices wait already.
    Full,
}

/// The waiting devices, shared by the API (which asks) and the focus task (which pulls).
#[derive(Clone)]
pub struct PullRequests {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    bell: Notify,
    min_interval: Duration,
}

#[derive(Default)]
struct State {
    waiting: BTreeSet<String>,
    /// When each recently pulled device was last pulled (entries older than `min_interval`
    /// are dropped as due devices are taken).
    last: HashMap<String, Instant>,
}

impl PullRequests {
    pub fn new(min_interval: Duration) -> PullRequests {
        PullRequests {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                bell: Notify::new(),
                min_interval,
            }),
        }
    }

    /// Asks for a pull of the Golioth device `id`.
    pub fn request(&self, id: &str) -> Requested {
        let mut s = self.lock();
        if s.waiting.contains(id) {
            return Requested::Coalesced;
        }
        if s.waiting.len() >= MAX_WAITING {
            return Requested::Full;
        }
        s.waiting.insert(id.to_owned());
        drop(s);
        self.inner.bell.notify_one();
        Requested::Scheduled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the devices due at `now` ([`MAX_PER_RUN`] at most), marking them pulled, and
    /// says when the next waiting one is due.
    fn take_due(&self, now: Instant) -> (Vec<String>, Option<Instant>) {
        let min = self.inner.min_interval;
        let mut s = self.lock();
        s.last.retain(|_, at| now.duration_since(*at) < min);
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for id in &s.waiting {
            match s.last.get(id) {
                Some(at) if now.duration_since(*at) < min => {
                    let at = *at + min;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                _ if due.len() < MAX_PER_RUN => due.push(id.clone()),
                _ => next = Some(now),
            }
        }
        for id in &due {
            s.waiting.remove(id);
            s.last.insert(id.clone(), now);
        }
        (due, next)
    }

    /// Devices waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// Pulls the requested devices as they come due, until shutdown.
pub(super) async fn run(syncer: Arc<Syncer>, requests: PullRequests, shutdown: CancellationToken) {
    loop {
        let (due, next) = requests.take_due(Instant::now());
        if due.is_empty() {
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = requests.inner.bell.notified() => {}
                () = wait => {}
            }
            continue;
        }
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = syncer.run_focused(&due) => r,
        };
        match result {
            Ok(r) if !r.errors.is_empty() => tracing::warn!(
                devices = due.len(),
                errors = %r.errors.join("; "),
                "webhook pull incomplete (the next full run reads them again)"
            ),
            Ok(r) => tracing::info!(
                devices = due.len(),
                taken = r.taken,
                pushed = r.pushed,
                conflicts = r.conflicts,
                desired_published = r.desired_changed,
                ms = r.duration_ms,
                "webhook pull"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "webhook pull not committed (the next full run reads them again)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_for_one_device_is_one_pull_now_and_one_at_the_end_of_the_interval() {
        let r = PullRequests::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(r.request("a"), Requested::Scheduled);
        for _ in 0..999 {
            assert_eq!(r.request("a"), Requested::Coalesced);
        }
        assert_eq!(r.take_due(t0), (vec!["a".to_owned()], None));
        // More webhooks while (or after) it is pulled: one more pull, after the interval.
        assert_eq!(r.request("a"), Requested::Scheduled);
        assert_eq!(r.request("a"), Requested::Coalesced);
        let (due, next) = r.take_due(t0 + Duration::from_millis(500));
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(2)));
        assert_eq!(
            r.take_due(t0 + Duration::from_secs(2)).0,
            vec!["a".to_owned()]
        );
        assert_eq!(r.waiting(), 0);
    }

    #[test]
    fn devices_due_together_share_a_run_and_the_waiting_set_is_bounded() {
        let r = PullRequests::new(Duration::from_secs(2));
        for i in 0..MAX_WAITING {
            assert_eq!(r.request(&format!("d{i}")), Requested::Scheduled);
        }
        assert_eq!(r.request("one-too-many"), Requested::Full);
        let now = Instant::now();
        let (due, next) = r.take_due(now);
        assert_eq!(due.len(), MAX_PER_RUN);
        assert_eq!(next, Some(now), "the rest are due at once, in the next run");
        assert_eq!(r.waiting(), MAX_WAITING - MAX_PER_RUN);
    }
}
