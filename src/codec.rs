//! Payload codecs: JSON and CBOR to and from `serde_json::Value`, and auto-detection.
//!
//! Pure. The only module that touches CBOR (ciborium), so the CBOR crate can be swapped here
//! alone.

use serde_json::Value;

use crate::model::Format;

/// Which encoding a topic or resource accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// JSON if the first non-blank byte is `{` or `[`, CBOR if it is a CBOR map or array.
    Auto,
    Json,
    Cbor,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("payload is empty")]
    Empty,
    #[error("payload is neither a JSON object/array nor a CBOR map/array (first byte 0x{0:02x})")]
    Unrecognised(u8),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid CBOR: {0}")]
    Cbor(String),
}

/// Guesses the encoding from the first byte. Devices send documents (objects) or lists of
/// points (arrays), so only those shapes are recognised.
pub fn detect(payload: &[u8]) -> Result<Format, DecodeError> {
    let first = *payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .ok_or(DecodeError::Empty)?;
    match first {
        b'{' | b'[' => Ok(Format::Json),
        // CBOR major type 4 (array, 0x80..=0x9f) or 5 (map, 0xa0..=0xbf).
        0x80..=0xbf => Ok(Format::Cbor),
        other => Err(DecodeError::Unrecognised(other)),
    }
}

/// Decodes a payload with the chosen (or detected) format.
pub fn decode(payload: &[u8], choice: FormatChoice) -> Result<(Format, Value), DecodeError> {
    let format = match choice {
        FormatChoice::Auto => detect(payload)?,
        FormatChoice::Json => Format::Json,
        FormatChoice::Cbor => Format::Cbor,
    };
    decode_as(payload, format).map(|v| (format, v))
}

/// Deepest nesting of arrays and maps a CBOR payload may have: what serde_json reads back
/// (its recursion limit), since every document is stored as JSON text. A deeper one would be
/// stored and then read back as a string of its text (the `fuzz/payload` round trip, on a
/// crafted input).
pub const MAX_NESTING: usize = 127;

/// Decodes a payload known to be in `format`.
pub fn decode_as(payload: &[u8], format: Format) -> Result<Value, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    match format {
        Format::Json => {
            serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))
        }
        Format::Cbor => {
            let mut reader = payload;
            let value: Value =
                ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_NESTING)
                    .map_err(|e| DecodeError::Cbor(e.to_string()))?;
            if !reader.is_empty() {
                return Err(DecodeError::Cbor(format!(
                    "{} trailing bytes after the first item",
                    reader.len()
                )));
            }
            Ok(value)
        }
    }
}

/// Encodes a value; used for desired-state documents sent to devices.
pub fn encode(value: &Value, format: Format) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(value).unwrap_or_default(),
        Format::Cbor => {
            let mut out = Vec::new();
            // Writing a serde_json::Value into a Vec cannot fail.
            let _ = ciborium::into_writer(value, &mut out);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cbor(v: &Value) -> Vec<u8> {
        encode(v, Format::Cbor)
    }

    #[test]
    fn detects_json_and_cbor_documents() {
        assert_eq!(detect(b"  {\"a\":1}"), Ok(Format::Json));
        assert_eq!(detect(b"[1]"), Ok(Format::Json));
        assert_eq!(detect(&cbor(&json!({"a": 1}))), Ok(Format::Cbor));
        assert_eq!(detect(&cbor(&json!([1, 2]))), Ok(Format::Cbor));
        assert_eq!(detect(b""), Err(DecodeError::Empty));
        assert_eq!(detect(b"42"), Err(DecodeError::Unrecognised(b'4')));
    }

    #[test]
    fn cbor_round_trips_through_json_values() {
        let doc = json!({"t": 21.5, "on": true, "tags": ["a"], "nested": {"n": -3}});
        let (format, back) = decode(&cbor(&doc), FormatChoice::Auto).unwrap();
        assert_eq!(format, Format::Cbor);
        assert_eq!(back, doc);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            decode(b"{\"a\":", FormatChoice::Auto),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(&[0xa1, 0x61], FormatChoice::Auto),
            Err(DecodeError::Cbor(_))
        ));
        let mut two = cbor(&json!({"a": 1}));
        two.extend(cbor(&json!({"b": 2})));
        assert!(matches!(
            decode(&two, FormatChoice::Cbor),
            Err(DecodeError::Cbor(_))
        ));
    }

    /// Found by `fuzz/payload`: the default JSON float parser read this CBOR double back
    /// one ulp off once stored as JSON text (5.429707779445516e-51 as ...515e-51).
    #[test]
    fn a_cbor_float_survives_json_text_exactly() {
        let payload = [
            0xa2, 0x62, b'o', b'n', 0xf5, 0x64, b't', b'e', b'm', b'p', 0xfb, 0x35, 0x80, 0x40,
            0x80, 0x61, 0x00, 0x00, 0x00,
        ];
        let (_, value) = decode(&payload, FormatChoice::Cbor).unwrap();
        let text = encode(&value, Format::Json);
        assert_eq!(decode_as(&text, Format::Json), Ok(value));
    }

    /// Found by the `fuzz/payload` round trip on a crafted input: CBOR nested deeper than
    /// serde_json reads was accepted, and its JSON text (as the store keeps it) did not decode.
    #[test]
    fn cbor_nests_no_deeper_than_json_text_can_be_read_back() {
        let nested = |depth: usize| [vec![0x81; depth - 1], vec![0x80]].concat();
        let (_, deepest) = decode(&nested(MAX_NESTING), FormatChoice::Cbor).unwrap();
        let text = encode(&deepest, Format::Json);
        assert_eq!(decode_as(&text, Format::Json), Ok(deepest));
        assert!(matches!(
            decode(&nested(MAX_NESTING + 1), FormatChoice::Cbor),
            Err(DecodeError::Cbor(_))
        ));
        let too_deep_json = format!(
            "{}{}",
            "[".repeat(MAX_NESTING + 1),
            "]".repeat(MAX_NESTING + 1)
        );
        assert!(decode_as(too_deep_json.as_bytes(), Format::Json).is_err());
    }

    #[test]
    fn a_fixed_format_is_not_second_guessed() {
        assert!(decode(b"{\"a\":1}", FormatChoice::Cbor).is_err());
    }
}
