//! Fake clouds for the integration tests: in-process HTTP servers on 127.0.0.1 port 0 that
//! keep state and answer with the real request and response shapes, scriptable to fail.
//!
//! - [`golioth::FakeGolioth`]: the Golioth Management API subset the gateway uses (devices,
//!   tags, LightDB State), after `/work/shared/golioth/golioth-management-openapi.yml`.
//! - [`netneural::FakeNetNeural`]: a PostgREST subset at `/rest/v1/<table>` over the NetNeural
//!   tables of DESIGN.md §5, with their unique, foreign-key, not-null and check constraints.
//! - [`faults`]: what both share to misbehave (status answers, delays, dropped connections,
//!   responses lost after the write, poisoned payloads, a revocable key) and the request log.
//! - [`rig`]: the other side: a pre-filled gateway database and the real `nn-gateway` binary
//!   run against the fakes (for crash tests and the uplink benchmark).
//!
//! Use from a test file with `mod fakes;`. Everything runs on the test's tokio runtime; a
//! fake stops when dropped.
#![allow(dead_code, unused_imports)] // Each test binary uses a different part of the fakes.

pub mod faults;
pub mod golioth;
pub mod netneural;
mod postgrest;
pub mod rig;
mod server;

pub use faults::{Answer, Counts, Fault, Faults, Logged, Mark, Match};
pub use golioth::FakeGolioth;
pub use netneural::FakeNetNeural;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 3339 in UTC with `Z`, as Golioth writes timestamps.
fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("a formattable time")
}

/// A random version 4 UUID, as `gen_random_uuid()` makes them.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut h = String::with_capacity(32);
    for x in b {
        use std::fmt::Write as _;
        let _ = write!(h, "{x:02x}");
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
