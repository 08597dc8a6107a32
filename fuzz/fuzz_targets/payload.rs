//! A device's payload bytes through the codecs and the ingest checks.
//!
//! Properties, beyond not panicking: a decoded value re-encoded in its format (and in the
//! other one) decodes to the same value; a fixed format is the one reported; an accepted
//! state is an object, accepted telemetry has 1 to MAX_POINTS_PER_MESSAGE points with `ts`
//! taken out of their data; applying a merge patch twice is the same as once (RFC 7386).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nn_gateway::codec::{self, FormatChoice};
use nn_gateway::ingest::{self, Kind, MAX_POINTS_PER_MESSAGE};
use nn_gateway::model::{Format, Reading};
use serde_json::Value;

fuzz_target!(|payload: &[u8]| {
    for choice in [FormatChoice::Auto, FormatChoice::Json, FormatChoice::Cbor] {
        if let Ok((format, value)) = codec::decode(payload, choice) {
            match choice {
                FormatChoice::Json => assert_eq!(format, Format::Json),
                FormatChoice::Cbor => assert_eq!(format, Format::Cbor),
                FormatChoice::Auto => assert_eq!(codec::detect(payload), Ok(format)),
            }
            for again in [Format::Json, Format::Cbor] {
                let bytes = codec::encode(&value, again);
                let back = codec::decode_as(&bytes, again)
                    .unwrap_or_else(|e| panic!("{value:?} as {again:?} does not decode: {e}"));
                assert_eq!(back, value, "{again:?} round trip");
            }
            let mut once = Value::Object(Default::default());
            ingest::merge_patch(&mut once, &value);
            let mut twice = once.clone();
            ingest::merge_patch(&mut twice, &value);
            assert_eq!(once, twice, "merge patch is idempotent");
        }
        for kind in [Kind::State, Kind::Telemetry] {
            match ingest::decode_reading(kind, payload, choice) {
                Ok((_, Reading::State(_))) => assert_eq!(kind, Kind::State),
                Ok((_, Reading::Telemetry(points))) => {
                    assert_eq!(kind, Kind::Telemetry);
                    assert!((1..=MAX_POINTS_PER_MESSAGE).contains(&points.len()));
                    assert!(points.iter().all(|p| !p.data.contains_key("ts")));
                }
                Err(refused) => assert!(!refused.reason.is_empty()),
            }
        }
    }
});
