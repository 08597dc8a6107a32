//! Downlink: carries desired-state changes from the store to the devices.
//!
//! The store is the truth: every desired document has a global change counter (`seq`) and a
//! `published_seq`, the last change the MQTT broker acknowledged. This task wakes on a timer
//! (`gateway.downlink_poll`) and on the broker's acknowledgements. Desired edits come from
//! another process (`nn-gateway desired set`, `conflicts resolve`) and from the daemon's own
//! sync runs; all are seen at the next poll (one indexed query). On each pass it:
//! - tells the CoAP server about every change since the last one it saw, for its observers;
//! - publishes, retained at QoS 1, every document whose newest change the broker has not
//!   acknowledged, and records the acknowledgement when it comes. A document handed to the
//!   broker but not acknowledged within [`REPUBLISH_AFTER`] is published again; a retained
//!   publish is idempotent, so a repeat is harmless and nothing is lost across restarts.
//!
//! Started by [`spawn`], the shape of every long-running part. Nothing talks to the task once
//! it runs, so it has no handle: one comes with its first inbound channel (a bell for desired
//! edits made inside the daemon, when there are any).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::coap::CoapHandle;
use crate::config::GatewayConfig;
use crate::model::DeviceKey;
use crate::mqtt::{MqttHandle, Published};
use crate::store::Store;

/// Documents read from the store per pass; more are taken on the next pass.
const PAGE: usize = 256;

/// A publish not acknowledged within this time is sent again.
pub const REPUBLISH_AFTER: Duration = Duration::from_secs(30);

/// Capacity of the channel of broker acknowledgements from the MQTT task. A dropped
/// confirmation only causes a harmless republish.
pub const PUBLISHED_QUEUE: usize = 1024;

/// What the downlink is connected to inside the daemon.
pub struct Links {
    pub store: Store,
    /// `None` when MQTT is disabled.
    pub mqtt: Option<MqttHandle>,
    /// `None` when CoAP is disabled.
    pub coap: Option<CoapHandle>,
    /// The broker's acknowledgements of desired publishes, from the MQTT task.
    pub published: mpsc::Receiver<Published>,
    pub shutdown: CancellationToken,
}

/// Starts the downlink on `tracker`; it polls every `gateway.downlink_poll` and stops when
/// `links.shutdown` fires (what is not yet acknowledged is published again after a restart).
pub fn spawn(cfg: &GatewayConfig, links: Links, tracker: &TaskTracker) {
    let downlink = Downlink {
        store: links.store,
        mqtt: links.mqtt,
        coap: links.coap,
        poll: cfg.downlink_poll,
        published: links.published,
    };
    let span = tracing::info_span!("downlink");
    tracker.spawn(downlink.run(links.shutdown).instrument(span));
}

struct Downlink {
    store: Store,
    mqtt: Option<MqttHandle>,
    coap: Option<CoapHandle>,
    poll: Duration,
    published: mpsc::Receiver<Published>,
}

impl Downlink {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut coap_cursor: i64 = 0;
        let mut handed: HashMap<DeviceKey, (i64, Instant)> = HashMap::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                Some(p) = self.published.recv() => {
                    handed.remove(&p.device);
                    let (device, seq) = (p.device.clone(), p.seq);
                    if let Err(e) = self.store.call(move |db| db.mark_desired_published(&device, seq)).await {
                        tracing::warn!(device = %p.device, error = %e, "cannot record desired publish; it will be sent again");
                    }
                    continue;
                }
                () = tokio::time::sleep(self.poll) => {}
            }
            if let Err(e) = self.pass(&mut coap_cursor, &mut handed).await {
                tracing::warn!(error = %e, "downlink pass failed; retrying at the next poll");
            }
        }
    }

    async fn pass(
        &mut self,
        coap_cursor: &mut i64,
        handed: &mut HashMap<DeviceKey, (i64, Instant)>,
    ) -> Result<(), crate::store::StoreError> {
        if let Some(coap) = &self.coap {
            let since = *coap_cursor;
            for doc in self
                .store
                .call(move |db| db.desired_since(since, PAGE))
                .await?
            {
                *coap_cursor = doc.seq;
                coap.desired_changed(doc);
            }
        }
        if let Some(mqtt) = &self.mqtt {
            if !mqtt.is_connected() {
                // Nothing reaches the broker now; after the reconnect everything unacknowledged
                // is published again at once.
                handed.clear();
                return Ok(());
            }
            let now = Instant::now();
            for doc in self.store.call(|db| db.desired_unpublished(PAGE)).await? {
                let recent = handed.get(&doc.device).is_some_and(|(seq, at)| {
                    *seq == doc.seq && now.duration_since(*at) < REPUBLISH_AFTER
                });
                if recent {
                    continue;
                }
                if let Err(e) = mqtt.publish_desired(&doc) {
                    tracing::debug!(error = %e, "MQTT request queue busy; publishing the rest at the next pass");
                    break;
                }
                tracing::debug!(device = %doc.device, seq = doc.seq, "desired state handed to the broker");
                handed.insert(doc.device.clone(), (doc.seq, now));
            }
        }
        Ok(())
    }
}
