//! From an MQTT PUBLISH to a store write: which device, which kind, decoded or rejected.
//!
//! Pure.

use crate::codec::FormatChoice;
use crate::config::TopicsConfig;
use crate::config::topics::Template;
use crate::ingest::{self, Kind};
use crate::model::{
    DeviceKey, Inbound, MqttDelivery, Origin, REJECTED_EXCERPT_LEN, RejectCause, Rejection,
    UnixMillis, WriteOp, fnv1a,
};

/// Routes messages of the subscribed topics.
#[derive(Clone, Debug)]
pub struct Router {
    state: Template,
    telemetry: Template,
    state_format: FormatChoice,
    telemetry_format: FormatChoice,
    max_size: usize,
}

impl Router {
    pub fn new(topics: &TopicsConfig, max_size: usize) -> Router {
        Router {
            state: topics.state.clone(),
            telemetry: topics.telemetry.clone(),
            state_format: topics.state_format,
            telemetry_format: topics.telemetry_format,
            max_size,
        }
    }

    /// The filters to subscribe to.
    pub fn filters(&self) -> [String; 2] {
        [self.state.filter(), self.telemetry.filter()]
    }

    /// Decides what to store for one message. Never fails: anything unusable becomes a
    /// [`WriteOp::Reject`] with a reason.
    pub fn route(
        &self,
        topic: &str,
        payload: &[u8],
        pkid: u16,
        dup: bool,
        received_at: UnixMillis,
    ) -> WriteOp {
        let mqtt = (pkid != 0).then(|| MqttDelivery {
            pkid,
            dup,
            digest: fnv1a(&[topic.as_bytes(), payload]),
        });
        let (kind, raw_device, choice) = if let Some(d) = self.state.device_in(topic) {
            (Kind::State, d, self.state_format)
        } else if let Some(d) = self.telemetry.device_in(topic) {
            (Kind::Telemetry, d, self.telemetry_format)
        } else {
            let why = (
                RejectCause::Topic,
                "topic matches no configured template".into(),
            );
            return reject(topic, None, payload, why, mqtt, received_at);
        };
        let device = match DeviceKey::parse(raw_device) {
            Ok(d) => d,
            Err(e) => {
                let why = (RejectCause::DeviceKey, e);
                return reject(topic, Some(raw_device), payload, why, mqtt, received_at);
            }
        };
        if payload.len() > self.max_size {
            let reason = format!(
                "payload is {} bytes, the limit (mqtt.max_message_size) is {}",
                payload.len(),
                self.max_size
            );
            let why = (RejectCause::TooLarge, reason);
            return reject(topic, Some(raw_device), payload, why, mqtt, received_at);
        }
        match ingest::decode_reading(kind, payload, choice) {
            Ok((format, reading)) => WriteOp::Ingest(Inbound {
                device,
                origin: Origin::Mqtt,
                format,
                received_at,
                reading,
                mqtt,
            }),
            Err(e) => {
                let why = (e.cause, e.reason);
                reject(topic, Some(raw_device), payload, why, mqtt, received_at)
            }
        }
    }
}

fn reject(
    topic: &str,
    device: Option<&str>,
    payload: &[u8],
    (cause, reason): (RejectCause, String),
    mqtt: Option<MqttDelivery>,
    received_at: UnixMillis,
) -> WriteOp {
    WriteOp::Reject(Rejection {
        origin: Origin::Mqtt,
        device: device.map(str::to_owned),
        locator: topic.to_owned(),
        cause,
        reason,
        size: payload.len(),
        excerpt: payload[..payload.len().min(REJECTED_EXCERPT_LEN)].to_vec(),
        received_at,
        mqtt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reading;

    fn router() -> Router {
        Router::new(&TopicsConfig::default(), 100)
    }

    fn reason(op: WriteOp) -> String {
        match op {
            WriteOp::Reject(r) => format!("{}: {}", r.cause.as_str(), r.reason),
            WriteOp::Ingest(i) => panic!("expected a rejection, got {i:?}"),
        }
    }

    #[test]
    fn routes_state_and_telemetry_by_topic() {
        let now = UnixMillis(1);
        let WriteOp::Ingest(i) =
            router().route("devices/s1/state", br#"{"on":true}"#, 7, false, now)
        else {
            panic!()
        };
        assert_eq!(i.device.as_str(), "s1");
        assert!(matches!(i.reading, Reading::State(_)));
        assert_eq!(i.mqtt.unwrap().pkid, 7);
        let WriteOp::Ingest(i) = router().route(
            "devices/s1/telemetry",
            br#"[{"t":1},{"t":2}]"#,
            8,
            false,
            now,
        ) else {
            panic!()
        };
        assert!(matches!(i.reading, Reading::Telemetry(ref p) if p.len() == 2));
    }

    #[test]
    fn unusable_messages_become_rejections_with_reasons() {
        let now = UnixMillis(1);
        let r = router();
        assert!(
            reason(r.route("devices/s1/other", b"{}", 1, false, now))
                .contains("topic: topic matches no configured template")
        );
        assert!(
            reason(r.route("devices/a b/state", b"{}", 1, false, now)).starts_with("device_key: ")
        );
        assert!(
            reason(r.route("devices/s1/state", &[b' '; 101], 1, false, now)).contains(
                "too_large: payload is 101 bytes, the limit (mqtt.max_message_size) is 100"
            )
        );
        assert!(
            reason(r.route("devices/s1/state", b"{oops", 1, false, now))
                .starts_with("decode: invalid JSON")
        );
        assert!(
            reason(r.route("devices/s1/state", b"[1]", 1, false, now))
                .starts_with("invalid: state must be an object")
        );
    }

    #[test]
    fn the_digest_covers_topic_and_payload() {
        let now = UnixMillis(1);
        let digest =
            |topic: &str, payload: &[u8]| match router().route(topic, payload, 1, true, now) {
                WriteOp::Ingest(i) => i.mqtt.unwrap().digest,
                WriteOp::Reject(r) => r.mqtt.unwrap().digest,
            };
        assert_eq!(
            digest("devices/a/state", b"{}"),
            digest("devices/a/state", b"{}")
        );
        assert_ne!(
            digest("devices/a/state", b"{}"),
            digest("devices/b/state", b"{}")
        );
        assert_ne!(
            digest("devices/a/state", b"{}"),
            digest("devices/a/state", b"{ }")
        );
    }
}
