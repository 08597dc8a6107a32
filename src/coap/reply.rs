//! Responses before framing: code, options and payload.
//!
//! Pure. [`crate::coap::message`] frames a [`Reply`] for a particular exchange.

use coap_lite::ResponseType;
use serde_json::Value;

use crate::codec;
use crate::model::{Format, Outcome};

/// Content-Format numbers (RFC 7252 §12.3).
pub const CF_JSON: u16 = 50;
pub const CF_CBOR: u16 = 60;

/// Longest diagnostic payload sent with an error. Keeps error responses (which are cached for
/// retransmissions) small.
pub const DIAGNOSTIC_LEN: usize = 128;

/// Why an ingest was not stored, as far as the device's answer tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    /// The gateway's disk (or its database size limit) is full.
    Full,
    /// Anything else: the store failed or is closing.
    Unavailable,
}

/// A response to send, before it is framed for a particular exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub code: ResponseType,
    pub observe: Option<u32>,
    pub content_format: Option<u16>,
    pub max_age: Option<u32>,
    pub size1: Option<u32>,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn empty(code: ResponseType) -> Reply {
        Reply {
            code,
            observe: None,
            content_format: None,
            max_age: None,
            size1: None,
            payload: Vec::new(),
        }
    }

    /// An error with a diagnostic payload: UTF-8 text, no Content-Format (RFC 7252 §5.5.2).
    pub fn diagnostic(code: ResponseType, text: &str) -> Reply {
        let mut end = text.len().min(DIAGNOSTIC_LEN);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Reply {
            payload: text.as_bytes()[..end].to_vec(),
            ..Reply::empty(code)
        }
    }

    /// 2.05 with a desired document.
    pub fn content(doc: &Value, format: Format, observe: Option<u32>) -> Reply {
        Reply {
            observe,
            content_format: Some(content_format(format)),
            payload: codec::encode(doc, format),
            ..Reply::empty(ResponseType::Content)
        }
    }

    /// 5.03 Service Unavailable, telling the client when to try again (Max-Age, RFC 7252
    /// §5.9.3.4).
    pub fn unavailable(retry_after_secs: u32, why: &str) -> Reply {
        Reply {
            max_age: Some(retry_after_secs),
            ..Reply::diagnostic(ResponseType::ServiceUnavailable, why)
        }
    }

    /// The answer to an ingest, once the store has answered: 2.01 when the message created
    /// the device, 2.04 otherwise, 5.03 if it was not stored.
    pub fn after_ingest(result: &Result<Outcome, NotStored>, retry_after_secs: u32) -> Reply {
        match result {
            Ok(Outcome::Stored { new_device: true }) => Reply::empty(ResponseType::Created),
            // CoAP writes carry no MQTT delivery, so Duplicate does not occur here.
            Ok(Outcome::Stored { new_device: false } | Outcome::Duplicate) => {
                Reply::empty(ResponseType::Changed)
            }
            // The store could not hold this reading and kept it as a rejection instead.
            Ok(Outcome::Rejected) => Reply::diagnostic(
                ResponseType::InternalServerError,
                "reading could not be stored; kept as rejected",
            ),
            Err(NotStored::Full) => Reply::unavailable(retry_after_secs, "gateway storage is full"),
            Err(NotStored::Unavailable) => {
                Reply::unavailable(retry_after_secs, "gateway storage unavailable")
            }
        }
    }

    /// "Try again later": never replayed to a retransmission, which gets a fresh chance.
    pub fn is_retry_later(&self) -> bool {
        self.code == ResponseType::ServiceUnavailable
    }
}

pub fn content_format(format: Format) -> u16 {
    match format {
        Format::Json => CF_JSON,
        Format::Cbor => CF_CBOR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_results_map_to_response_codes() {
        let created = Reply::after_ingest(&Ok(Outcome::Stored { new_device: true }), 30);
        assert_eq!(created.code, ResponseType::Created);
        let changed = Reply::after_ingest(&Ok(Outcome::Stored { new_device: false }), 30);
        assert_eq!(changed.code, ResponseType::Changed);
        let failed = Reply::after_ingest(&Err(NotStored::Unavailable), 30);
        assert_eq!(
            (failed.code, failed.max_age),
            (ResponseType::ServiceUnavailable, Some(30))
        );
        assert!(failed.is_retry_later() && !changed.is_retry_later());
    }

    #[test]
    fn diagnostics_are_cut_at_a_character_boundary() {
        let long = "é".repeat(DIAGNOSTIC_LEN);
        let r = Reply::diagnostic(ResponseType::BadRequest, &long);
        assert!(r.payload.len() <= DIAGNOSTIC_LEN);
        assert!(std::str::from_utf8(&r.payload).is_ok());
        assert_eq!(r.content_format, None);
    }
}
