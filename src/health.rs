//! Shared liveness: what each loop last reported, read by the watchdog and `STATUS=`.
//!
//! Lock-free atomics; cheap to clone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// State of a connection to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Disabled,
    Down,
    Connected,
    /// The peer answered and refused us (credentials, authorisation).
    Refused,
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

#[derive(Clone, Debug, Default)]
pub struct Health {
    mqtt: Arc<AtomicU8>,
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
}
