//! Domain types shared by every module: device keys, timestamps, readings, and the vocabulary
//! of the store's callers (a write, its outcome, a desired document), so that pure modules
//! need not import the store.
//!
//! Pure: no I/O. Vendor wire formats never appear here; each external system maps its own
//! JSON to these types in its own module.

use std::fmt;

use serde_json::{Map, Value};

/// Longest device key accepted, in bytes. Keys become MQTT topic levels, CoAP path segments
/// and cloud identifiers, so they are kept short and plain.
pub const MAX_DEVICE_KEY_LEN: usize = 64;

/// The id a device uses for itself in its MQTT topic or CoAP path.
///
/// Validated on construction: 1 to [`MAX_DEVICE_KEY_LEN`] bytes of ASCII letters, digits and
/// `-`, `_`, `.`, `:`. Anything else (wildcards, slashes, spaces, control bytes) is refused so
/// that a key is always safe to put back into a topic or a URL path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey(String);

impl DeviceKey {
    /// Checks and wraps a device key.
    ///
    /// # Errors
    /// Returns a sentence naming what is wrong with the key.
    pub fn parse(raw: &str) -> Result<DeviceKey, String> {
        if raw.is_empty() {
            return Err("device key is empty".into());
        }
        if raw.len() > MAX_DEVICE_KEY_LEN {
            return Err(format!(
                "device key is {} bytes long, the limit is {MAX_DEVICE_KEY_LEN}",
                raw.len()
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(format!(
                "device key {raw:?} contains {bad:?}; allowed are letters, digits and - _ . :"
            ));
        }
        Ok(DeviceKey(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Milliseconds since the Unix epoch, UTC. The one time unit stored in the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn now() -> UnixMillis {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }

    /// RFC 3339 in UTC with millisecond precision, for people and JSON output.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| self.0.to_string()),
            Err(_) => self.0.to_string(),
        }
    }
}

/// Where a device or a reading came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    Mqtt,
    Coap,
    Golioth,
    NetNeural,
    /// The local operator (CLI or local API).
    Local,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Mqtt => "mqtt",
            Origin::Coap => "coap",
            Origin::Golioth => "golioth",
            Origin::NetNeural => "netneural",
            Origin::Local => "local",
        }
    }
}

/// Payload encoding of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Cbor,
}

impl Format {
    /// The MIME type stored with telemetry points.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Cbor => "application/cbor",
        }
    }
}

/// A cloud the gateway owes data to. One outbox lane each.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Golioth,
    NetNeural,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Golioth, Target::NetNeural];

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Golioth => "golioth",
            Target::NetNeural => "netneural",
        }
    }

    /// Whether this cloud accepts telemetry. Golioth's LightDB Stream cannot be written over
    /// REST (data enters it only from a device session), so telemetry goes to NetNeural only.
    pub fn takes_telemetry(self) -> bool {
        matches!(self, Target::NetNeural)
    }
}

/// One telemetry point as the device sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The device's own timestamp (`ts`), if it sent one.
    pub device_ts: Option<UnixMillis>,
    /// The point without its `ts` field.
    pub data: Map<String, Value>,
}

/// What a device said, decoded and checked.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// A JSON Merge Patch (RFC 7386) to apply to the device's reported state.
    State(Map<String, Value>),
    /// One or more telemetry points, in the order the device sent them.
    Telemetry(Vec<Point>),
}

/// How an MQTT delivery is recognised when the broker delivers it again.
///
/// After a reconnect with a persistent session the broker resends every QoS 1 message we did
/// not acknowledge, with its original packet id and the DUP flag set. If a message with that
/// packet id and the same digest was stored among the last [`crate::store::DEDUP_SPAN`] deliveries, the
/// redelivery is acknowledged without being stored again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MqttDelivery {
    pub pkid: u16,
    pub dup: bool,
    /// FNV-1a of topic and payload.
    pub digest: u64,
}

/// A decoded message ready to be stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Inbound {
    pub device: DeviceKey,
    pub origin: Origin,
    pub format: Format,
    pub received_at: UnixMillis,
    pub reading: Reading,
    pub mqtt: Option<MqttDelivery>,
}

/// Why a message was refused, as one word from a fixed set: what metrics count rejections by
/// (bounded, unlike [`Rejection::reason`], the sentence for people, which quotes the message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectCause {
    /// The MQTT topic matches no configured template.
    Topic,
    /// The device key in the topic or path is not a valid [`DeviceKey`].
    DeviceKey,
    /// Over the transport's `max_message_size`, or sent block-wise (CoAP).
    TooLarge,
    /// Not JSON or CBOR, or a CoAP Content-Format the gateway does not take.
    Decode,
    /// Decoded, but not the shape its kind needs (state not an object, bad telemetry points).
    Invalid,
    /// Well-formed, but the store cannot take it (a value SQLite refuses): kept as rejected.
    Unstorable,
}

impl RejectCause {
    pub const ALL: [RejectCause; 6] = [
        RejectCause::Topic,
        RejectCause::DeviceKey,
        RejectCause::TooLarge,
        RejectCause::Decode,
        RejectCause::Invalid,
        RejectCause::Unstorable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectCause::Topic => "topic",
            RejectCause::DeviceKey => "device_key",
            RejectCause::TooLarge => "too_large",
            RejectCause::Decode => "decode",
            RejectCause::Invalid => "invalid",
            RejectCause::Unstorable => "unstorable",
        }
    }
}

/// A message that could not be used, kept so an operator can see what arrived and why it was
/// refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub origin: Origin,
    /// The device key as far as it could be read (it may itself be the problem).
    pub device: Option<String>,
    /// The MQTT topic or CoAP path.
    pub locator: String,
    /// Why, in one fixed word (for metrics).
    pub cause: RejectCause,
    /// Why, as a sentence naming the problem (for the rejected table and logs).
    pub reason: String,
    pub size: usize,
    /// The first bytes of the payload, for diagnosis.
    pub excerpt: Vec<u8>,
    pub received_at: UnixMillis,
    pub mqtt: Option<MqttDelivery>,
}

/// Bytes of a rejected payload kept for the operator.
pub const REJECTED_EXCERPT_LEN: usize = 256;

/// One write a transport hands to the store: a message to store, or one to keep as rejected.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Ingest(Inbound),
    Reject(Rejection),
}

/// How a write went, once committed: what the transport answers its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored; `new_device` when this message created the device.
    Stored { new_device: bool },
    /// A redelivery of a message already stored: acknowledged, not stored again.
    Duplicate,
    /// Recorded in the rejected table.
    Rejected,
}

/// A device's desired document and its change counters, as the downlink carries it to MQTT
/// and CoAP.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredDoc {
    pub device: DeviceKey,
    pub doc: Value,
    /// Counts changes of this device's document.
    pub version: i64,
    /// Global change counter: orders changes across devices.
    pub seq: i64,
}

/// 64-bit FNV-1a: a stable digest (unlike `DefaultHasher`, whose output may change between Rust
/// releases) used to recognise redelivered MQTT messages across restarts and upgrades.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_refuse_topic_and_path_syntax() {
        assert!(DeviceKey::parse("sensor-01").is_ok());
        assert!(DeviceKey::parse("a.b_c:d").is_ok());
        for bad in ["", "a/b", "+", "#", "a b", "é", &"x".repeat(65)] {
            assert!(DeviceKey::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn digest_separates_parts() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"x"]), fnv1a(&[b"x"]));
    }

    #[test]
    fn millis_format_as_rfc3339() {
        assert_eq!(UnixMillis(0).to_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            UnixMillis(1_700_000_000_123).to_rfc3339(),
            "2023-11-14T22:13:20.123Z"
        );
    }
}
