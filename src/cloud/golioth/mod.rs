//! Golioth, through its Management REST API: the device registry, tags and LightDB State.
//!
//! - [`client`]: [`Golioth`], one request per method (lists walk every page).
//! - [`wire`]: Golioth's JSON; the only place serde meets it.
//! - [`mapping`]: wire ↔ the gateway's types ([`RemoteDevice`], [`Tag`], the id newtypes)
//!   and Golioth's error body.
//!
//! Telemetry never goes here: LightDB Stream can be read over REST but only written from a
//! device session, so Golioth gets the reported state (LightDB State) and NetNeural the
//! telemetry. Golioth pushes no registry or desired-state changes: they are polled, and a
//! list with `statePath` brings every device's desired document in the same pages.

pub mod client;
pub mod mapping;
pub mod wire;

pub use client::{Golioth, PER_PAGE};
pub use mapping::{DeviceFilter, DeviceId, DevicePatch, NewDevice, RemoteDevice, Tag, TagId};
