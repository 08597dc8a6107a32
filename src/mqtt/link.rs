//! The one place that reaches into rumqttc's event loop beyond `poll()`.
//!
//! The driver needs four things rumqttc's API does not offer, and takes them from the
//! event loop's public fields (`network`, `state`, `pending`) and its `clean()`:
//! - writing PUBACKs straight to the connection, many per flush ([`Link::send_acks`]; see the
//!   module doc of [`super`] for why `AsyncClient::ack` falls behind);
//! - dropping the connection at once ([`Link::drop_connection`]);
//! - forgetting what the old connection left behind, so nothing of it is acknowledged or
//!   matched on the next one ([`Link::forget_old_connection`]);
//! - a goodbye that lets the broker read everything we wrote ([`Link::goodbye`]).
//!
//! These fields are public but not a stable API: a patch release may rename or re-purpose
//! them. That is why `Cargo.toml` pins rumqttc to one exact version, and why they are touched
//! here and nowhere else: moving to a new rumqttc means re-reading its `eventloop.rs` and
//! `state.rs` against this file (and running `tests/mqtt.rs` against a real broker).

use rumqttc::{ConnectionError, Event, EventLoop, Packet, PubAck, Request};
use tokio::time::Instant;

/// rumqttc's event loop, with the few internals the driver needs behind named operations.
pub(super) struct Link {
    eventloop: EventLoop,
}

impl Link {
    pub(super) fn new(eventloop: EventLoop) -> Link {
        Link { eventloop }
    }

    /// rumqttc's own poll: connects when not connected, reads, sends queued requests.
    ///
    /// # Cancel safety
    /// As rumqttc's `poll` (see the driver's module doc).
    pub(super) async fn poll(&mut self) -> Result<Event, ConnectionError> {
        self.eventloop.poll().await
    }

    /// Whether a connection (a socket, with or without its CONNACK yet) is open.
    pub(super) fn has_connection(&self) -> bool {
        self.eventloop.network.is_some()
    }

    /// Writes a PUBACK for each of `pkids` and flushes once. `None` when there is no
    /// connection (the broker will redeliver those messages to the next one).
    pub(super) async fn send_acks(
        &mut self,
        pkids: Vec<u16>,
    ) -> Option<Result<(), rumqttc::StateError>> {
        let network = self.eventloop.network.as_mut()?;
        let write_all = async {
            for pkid in pkids {
                network.write(Packet::PubAck(PubAck::new(pkid))).await?;
            }
            network.flush().await
        };
        Some(write_all.await)
    }

    /// Closes the connection now; the next poll reconnects.
    pub(super) fn drop_connection(&mut self) {
        self.eventloop.clean();
    }

    /// After a connection ended: drops what rumqttc kept of it that must not reach the next.
    pub(super) fn forget_old_connection(&mut self) {
        // Events rumqttc read before the failure would otherwise be handed out after the
        // reconnect, and their PUBACKs would name packet ids of the new session.
        self.eventloop.state.events.clear();
        // Our unacknowledged desired publishes are not resent by rumqttc: their events could
        // not be told from new ones (and a resend can collide with a new publish's packet id).
        // The downlink publishes again whatever the broker did not acknowledge.
        self.eventloop
            .pending
            .retain(|r| !matches!(r, Request::Publish(_)));
        self.eventloop.state.collision = None;
    }

    /// Ends a connection so that the broker reads everything written before: DISCONNECT, then
    /// read and discard until the broker closes the connection (it does on DISCONNECT), within
    /// `deadline`. Returns how many packets were discarded (`None` when not connected):
    /// messages that arrived after the stop, neither stored nor acknowledged, which the broker
    /// sends again to the next connection.
    ///
    /// Why not just drop the socket: the broker keeps streaming until it reads our DISCONNECT,
    /// so our receive buffer holds unread data, and Linux answers `close()` on such a socket
    /// with a RST instead of a FIN. A RST makes the broker's kernel discard what Mosquitto had
    /// not read yet: our last PUBACKs (under load, thousands of them) and the DISCONNECT.
    /// Reading until the broker's FIN empties our buffer, and the broker's FIN proves it read
    /// all we wrote. (rumqttc's `Network` does not expose the socket, so we cannot half-close
    /// it; the DISCONNECT, read in order after the PUBACKs, does the same job.)
    pub(super) async fn goodbye(&mut self, deadline: Instant) -> Result<Option<u64>, &'static str> {
        let Some(network) = self.eventloop.network.as_mut() else {
            return Ok(None);
        };
        let sent = async {
            network.write(Packet::Disconnect).await?;
            network.flush().await
        };
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("cannot send DISCONNECT"),
            Err(_) => return Err("DISCONNECT not taken in time"),
        }
        let mut discarded = 0;
        loop {
            match tokio::time::timeout_at(deadline, network.read()).await {
                Ok(Ok(_)) => discarded += 1,
                // The broker closed the connection (or it broke): nothing more can arrive.
                Ok(Err(_)) => return Ok(Some(discarded)),
                Err(_) => return Err("deadline reached"),
            }
        }
    }
}
