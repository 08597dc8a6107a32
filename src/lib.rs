//! nn-gateway: the NetNeural site gateway daemon.
//!
//! Local devices publish state and telemetry over MQTT and CoAP; the gateway stores each
//! message in its SQLite mirror together with the outbox rows owed to the clouds, in one
//! transaction, and only then acknowledges it. Desired state flows the other way.
//!
//! # Layout
//!
//! Pure (no I/O, unit- and property-tested):
//! - [`model`]: domain types — device keys, timestamps, readings, rejections, and the words
//!   rooms share: a store write and its outcome, a desired document.
//! - [`codec`]: JSON and CBOR payloads to and from JSON values; the only CBOR user.
//! - [`ingest`]: checks every transport shares — state patches, telemetry points, RFC 7386 merge.
//! - [`backoff`]: exponential backoff with full jitter, used by every retry loop.
//! - [`reconcile`]: the three-way merge of a device's document between the mirror and the clouds.
//! - [`outbox::policy`]: what a failed send means for its row (retry at T, dead) and its lane
//!   (offline, backing off, auth failed).
//! - [`config::topics`]: MQTT topic templates, parsed as the configuration is read.
//! - [`mqtt::router`]: PUBLISH → store write; `mqtt::tls`: a TLS failure → the sentence that
//!   names the certificate problem.
//! - [`coap::route`], [`coap::reply`], [`coap::message`]: CoAP request → plan → response bytes;
//!   [`coap::exchange`] (retransmission cache) and [`coap::observe`] (observer registry).
//!
//! I/O:
//! - [`cloud`]: what both cloud clients share — the typed [`cloud::CloudError`] (which cloud,
//!   which request, what failed, retried or not), the HTTP client set-up, `Retry-After` — and
//!   a room per cloud: [`cloud::golioth`] and [`cloud::netneural`] (each its client, wire
//!   types and mapping), [`cloud::uplink`] (each cloud as an outbox lane sees it), and
//!   [`cloud::sync`] (reconciliation runs: read both clouds, link, merge with [`reconcile`],
//!   write, commit).
//! - [`config`]: the typed configuration, from TOML and `NNGW_` environment variables, holding
//!   parsed values (topic templates, addresses, URLs, the MQTT TLS client configuration built
//!   from its certificate files) so that what runs later cannot fail on them.
//! - [`store`]: the SQLite mirror — migrations, all SQL (one file per aggregate: ingest,
//!   devices and desired state, outbox and telemetry cursors, reconciliation, retention,
//!   status, the metrics' gauges), and the
//!   store thread with group commit.
//! - [`mqtt`]: rumqttc client of the site broker (plain TCP, or TLS with `[mqtt.tls]`) — ingest
//!   acknowledged after commit, in batches, desired publishes.
//! - [`coap`]: CoAP server on a UDP socket — ingest, desired resource with Observe.
//! - [`outbox`]: one lane per cloud delivering the outbox rows and the telemetry cursor,
//!   through an [`outbox::Uplink`] each cloud implements.
//! - [`downlink`]: carries desired-state changes from the store to MQTT and CoAP.
//! - [`notify`]: the systemd notify protocol (READY, WATCHDOG, STATUS, STOPPING).
//! - [`health`]: shared liveness flags read by the watchdog and the status line.
//! - [`metrics`]: the Prometheus registry every part counts into (ingest and commits, cloud
//!   requests, retention), plus gauges read from the store and [`health`] at each scrape;
//!   one per daemon run, no global.
//! - [`heartbeat`]: the daemon's beat in the database for operator commands, WATCHDOG=1 while
//!   the store answers, STATUS=.
//! - [`retention`]: the task that has the store enforce telemetry retention every minute.
//! - [`api`]: the local HTTP API (axum), its bearer token, the Golioth webhook, the health
//!   probes; it renders [`view`]'s views, as the CLI does. [`api::console`]: the web console's
//!   files, embedded, served at `/`.
//! - [`daemon`]: start-up as a list of spawns, then shutdown in one written order.
//! - [`view`]: the views the CLI and the API both show (status, device pages, one device).
//! - [`cli`]: the operator commands (status, devices, rejected, telemetry, queue, desired set,
//!   conflicts, sync now, sync-log, check-config).

pub mod api;
pub mod backoff;
pub mod cli;
pub mod cloud;
pub mod coap;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod downlink;
pub mod health;
pub mod heartbeat;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod notify;
pub mod outbox;
pub mod reconcile;
pub mod retention;
pub mod store;
pub mod view;
