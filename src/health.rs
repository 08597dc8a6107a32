//! Shared liveness: what each loop last reported, read by the watchdog and `STATUS=`.
//!
//! The MQTT link is a lock-free atomic; each cloud lane's state sits behind a short mutex (never
//! held across an await). Cheap to clone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::model::{Target, UnixMillis};
use std::sync::atomic::{AtomicU8, Ordering};

/// State of a connection to a peer. In the heartbeat (and `status --json`) as its
/// [`LinkState::as_str`] word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Disabled,
    Down,
    Connected,
    /// The peer answered and refused us (credentials, authorisation).
    Refused,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Disabled => "disabled",
            LinkState::Down => "down",
            LinkState::Connected => "connected",
            LinkState::Refused => "refused",
        }
    }

    fn from_u8(v: u8) -> LinkState {
        match v {
            1 => LinkState::Down,
            2 => LinkState::Connected,
            3 => LinkState::Refused,
            _ => LinkState::Disabled,
        }
    }
}

/// State of a cloud's outbox lane, decided from real request outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneState {
    Disabled,
    /// Requests succeed (or fail for reasons of their own rows).
    Online,
    /// The cloud asked us to slow down (429, `Retry-After`): the lane waits, then goes on.
    BackingOff,
    /// No answer: the lane probes on its backoff schedule instead of trying every row.
    Offline,
    /// 401/403: paused until the key changes (SIGHUP) or a slow recheck succeeds.
    AuthFailed,
}

impl LaneState {
    pub fn as_str(self) -> &'static str {
        match self {
            LaneState::Disabled => "disabled",
            LaneState::Online => "online",
            LaneState::BackingOff => "backing off",
            LaneState::Offline => "offline",
            LaneState::AuthFailed => "auth failed",
        }
    }
}

/// What `status` shows of one cloud.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloudHealth {
    pub state: LaneState,
    /// Unix milliseconds of the state's start.
    pub since: i64,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct Health {
    mqtt: Arc<AtomicU8>,
    /// Why the last connection attempt to the broker failed; cleared on connecting.
    mqtt_error: Arc<Mutex<Option<String>>>,
    clouds: Arc<Mutex<BTreeMap<Target, CloudHealth>>>,
    /// Rung when a state changes, so the daemon refreshes STATUS= and its heartbeat at once.
    changed: Arc<tokio::sync::Notify>,
}

impl Health {
    pub fn set_mqtt(&self, state: LinkState) {
        if self.mqtt.swap(state as u8, Ordering::Relaxed) != state as u8 {
            self.changed.notify_one();
        }
    }

    /// Completes after the next change of any state.
    ///
    /// # Cancel safety
    /// Cancel safe; a change seen by no waiter is kept for the next one.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub fn mqtt(&self) -> LinkState {
        LinkState::from_u8(self.mqtt.load(Ordering::Relaxed))
    }

    /// Records why the broker cannot be reached (`None` once connected), for `status`: a
    /// TLS or credential problem is otherwise only in the log.
    pub fn set_mqtt_error(&self, error: Option<String>) {
        let mut slot = self.mqtt_error.lock().unwrap_or_else(|p| p.into_inner());
        if *slot != error {
            *slot = error;
            drop(slot);
            self.changed.notify_one();
        }
    }

    pub fn mqtt_error(&self) -> Option<String> {
        self.mqtt_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn with_cloud<R>(&self, target: Target, f: impl FnOnce(&mut CloudHealth) -> R) -> R {
        let mut clouds = self.clouds.lock().unwrap_or_else(|p| p.into_inner());
        let entry = clouds.entry(target).or_insert(CloudHealth {
            state: LaneState::Disabled,
            since: UnixMillis::now().0,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
        });
        f(entry)
    }

    /// Sets a lane's state; returns the previous one.
    pub fn set_lane(&self, target: Target, state: LaneState) -> LaneState {
        let before = self.with_cloud(target, |c| {
            let before = c.state;
            if before != state {
                c.state = state;
                c.since = UnixMillis::now().0;
            }
            before
        });
        if before != state {
            self.changed.notify_one();
        }
        before
    }

    pub fn lane_succeeded(&self, target: Target) {
        self.with_cloud(target, |c| c.last_success_at = Some(UnixMillis::now().0));
    }

    /// Records a cloud's last error (already free of secrets: see [`crate::cloud::CloudError`]).
    pub fn lane_failed(&self, target: Target, error: &str) {
        self.with_cloud(target, |c| {
            c.last_error = Some(error.to_owned());
            c.last_error_at = Some(UnixMillis::now().0);
        });
    }

    pub fn lane(&self, target: Target) -> LaneState {
        self.with_cloud(target, |c| c.state)
    }

    /// Every cloud's state, for the heartbeat.
    pub fn clouds(&self) -> BTreeMap<Target, CloudHealth> {
        self.clouds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `status --json` and heartbeats written by older builds carry these words.
    #[test]
    fn link_states_serialize_as_the_words_status_always_showed() {
        for state in [
            LinkState::Disabled,
            LinkState::Down,
            LinkState::Connected,
            LinkState::Refused,
        ] {
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, state.as_str());
            assert_eq!(serde_json::from_value::<LinkState>(json).unwrap(), state);
        }
    }
}
