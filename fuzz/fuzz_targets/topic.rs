//! MQTT topic templates and the router: the input is a template, a newline, a topic, a
//! newline, and the payload of a PUBLISH on that topic.
//!
//! Properties, beyond not panicking: a template that parses shows as a string that parses to
//! the same template; filling it with a valid device key gives a topic whose device is that
//! key, and its filter's device is `+`; a device found in an arbitrary topic fills the
//! template back to exactly that topic; the router rejects a topic that neither template
//! matches, and stores or rejects one that does under the device it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nn_gateway::config::TopicsConfig;
use nn_gateway::config::topics::Template;
use nn_gateway::model::{DeviceKey, MAX_DEVICE_KEY_LEN, RejectCause, UnixMillis, WriteOp};
use nn_gateway::mqtt::router::Router;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(template), topic, payload) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(template), Ok(topic)) = (
        std::str::from_utf8(template),
        std::str::from_utf8(topic.unwrap_or_default()),
    ) else {
        return;
    };
    let Ok(t) = Template::parse(template) else {
        return;
    };
    assert_eq!(
        Template::parse(&t.to_string()).as_ref(),
        Ok(&t),
        "shown as parsed"
    );
    assert_eq!(t.device_in(&t.filter()), Some("+"));

    let dev = device_from(topic);
    assert!(DeviceKey::parse(&dev).is_ok(), "{dev:?} is a valid key");
    assert_eq!(t.device_in(&t.topic(&dev)), Some(dev.as_str()));

    if let Some(found) = t.device_in(topic) {
        assert_eq!(t.topic(found), topic, "matching is exact");
    }

    route(t, topic, payload.unwrap_or_default());
});

/// A valid device key made of the input's allowed characters.
fn device_from(topic: &str) -> String {
    let key: String = topic
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        .take(MAX_DEVICE_KEY_LEN)
        .collect();
    if key.is_empty() { "d".into() } else { key }
}

fn route(state: Template, topic: &str, payload: &[u8]) {
    let topics = TopicsConfig {
        state,
        ..TopicsConfig::default()
    };
    if topics.state == topics.telemetry {
        // The loader refuses this configuration.
        return;
    }
    let matched = topics
        .state
        .device_in(topic)
        .or_else(|| topics.telemetry.device_in(topic));
    let router = Router::new(&topics, 256);
    match (
        router.route(topic, payload, 1, false, UnixMillis(0)),
        matched,
    ) {
        (WriteOp::Reject(r), None) => assert_eq!(r.cause, RejectCause::Topic),
        (WriteOp::Reject(r), Some(device)) => {
            assert_ne!(r.cause, RejectCause::Topic);
            assert_eq!(r.device.as_deref(), Some(device));
            assert_eq!(r.locator, topic);
        }
        (WriteOp::Ingest(i), Some(device)) => {
            assert_eq!(i.device.as_str(), device);
            assert!(payload.len() <= 256);
        }
        (WriteOp::Ingest(_), None) => panic!("stored a message on an unmatched topic"),
    }
}
