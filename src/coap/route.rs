//! From a CoAP request to what the server does with it.
//!
//! Pure: [`plan`] reads a parsed request and returns a [`Plan`]; the server executes it.
//!
//! Resources (anything else is 4.04):
//!
//! | path                    | methods    | payload                                    |
//! |-------------------------|------------|--------------------------------------------|
//! | `/d/{device}/state`     | POST, PUT  | a JSON Merge Patch object (both merge)     |
//! | `/d/{device}/telemetry` | POST       | one point or an array of points            |
//! | `/d/{device}/desired`   | GET        | answered in JSON, or CBOR with Accept: 60  |
//!
//! Refusals that lose a device's data (bad payload 4.00, too large 4.13, unsupported
//! Content-Format 4.15, an invalid device key in an ingest path) are also stored as a
//! [`Rejection`] so an operator sees them; unknown paths (4.04), wrong methods (4.05), bad
//! options (4.02) and unacceptable Accept values (4.06) are only answered and logged at debug,
//! since scanners and discovery probes would otherwise push real rejections out of the table.

use coap_lite::option_value::{OptionValueU16, OptionValueU32};
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

use super::reply::{CF_CBOR, CF_JSON, Reply};
use crate::codec::FormatChoice;
use crate::ingest::{self, Kind};
use crate::model::{
    DeviceKey, Format, Inbound, Origin, REJECTED_EXCERPT_LEN, RejectCause, Rejection, UnixMillis,
};

/// Critical options (odd numbers) the server understands; a request carrying any other
/// critical option is refused with 4.02 (RFC 7252 §5.4.1).
const URI_HOST: u16 = 3;
const URI_PORT: u16 = 7;
const URI_PATH: u16 = 11;
const URI_QUERY: u16 = 15;
const ACCEPT: u16 = 17;
const BLOCK2: u16 = 23;
const BLOCK1: u16 = 27;
const PROXY_URI: u16 = 35;
const PROXY_SCHEME: u16 = 39;

/// What an Observe option on a GET asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observe {
    No,
    Register,
    Deregister,
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Answer at once; nothing to store.
    Answer(Reply),
    /// Store the message, then answer with [`Reply::after_ingest`].
    Ingest(Inbound),
    /// Record the refusal, then answer with `reply`.
    Refuse { rejection: Rejection, reply: Reply },
    /// Read the device's desired document and answer with it.
    Desired {
        device: DeviceKey,
        format: Format,
        observe: Observe,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    State,
    Telemetry,
    Desired,
}

/// The request's path as `/a/b/c`, for logs and the rejected table.
pub fn path_of(req: &Packet) -> String {
    let mut path = String::new();
    for segment in req.get_option(CoapOption::UriPath).into_iter().flatten() {
        path.push('/');
        path.push_str(&String::from_utf8_lossy(segment));
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// Decides what to do with a request. Never fails: anything unusable becomes an error reply.
pub fn plan(req: &Packet, max_size: usize, received_at: UnixMillis) -> Plan {
    use ResponseType as R;
    let method = match req.header.code {
        MessageClass::Request(m) => Some(m),
        _ => None,
    };
    if let Some(reply) = bad_option(req) {
        return Plan::Answer(reply);
    }
    let path = path_of(req);
    let segments: Vec<&[u8]> = req
        .get_option(CoapOption::UriPath)
        .into_iter()
        .flatten()
        .map(Vec::as_slice)
        .collect();
    let (raw_device, resource) = match segments.as_slice() {
        [b"d", device, b"state"] => (*device, Resource::State),
        [b"d", device, b"telemetry"] => (*device, Resource::Telemetry),
        [b"d", device, b"desired"] => (*device, Resource::Desired),
        _ => {
            return Plan::Answer(Reply::diagnostic(
                R::NotFound,
                "no such resource; use /d/{device}/state, /d/{device}/telemetry or /d/{device}/desired",
            ));
        }
    };
    let raw_device = String::from_utf8_lossy(raw_device).into_owned();
    let kind = match (resource, method) {
        (Resource::State, Some(RequestType::Post | RequestType::Put)) => Kind::State,
        (Resource::Telemetry, Some(RequestType::Post)) => Kind::Telemetry,
        (Resource::Desired, Some(RequestType::Get)) => return desired(req, &raw_device),
        (Resource::State, _) => {
            return Plan::Answer(Reply::diagnostic(R::MethodNotAllowed, "use POST or PUT"));
        }
        (Resource::Telemetry, _) => {
            return Plan::Answer(Reply::diagnostic(R::MethodNotAllowed, "use POST"));
        }
        (Resource::Desired, _) => {
            return Plan::Answer(Reply::diagnostic(R::MethodNotAllowed, "use GET"));
        }
    };
    let payload = req.payload.as_slice();
    let refuse = |code: ResponseType, cause, reason: String, size1: Option<u32>| Plan::Refuse {
        reply: Reply {
            size1,
            ..Reply::diagnostic(code, &reason)
        },
        rejection: Rejection {
            origin: Origin::Coap,
            device: Some(raw_device.clone()),
            locator: path.clone(),
            cause,
            reason,
            size: payload.len(),
            excerpt: payload[..payload.len().min(REJECTED_EXCERPT_LEN)].to_vec(),
            received_at,
            mqtt: None,
        },
    };
    let device = match DeviceKey::parse(&raw_device) {
        Ok(d) => d,
        Err(e) => return refuse(R::BadRequest, RejectCause::DeviceKey, e, None),
    };
    let limit = u32::try_from(max_size).unwrap_or(u32::MAX);
    if let Some(block1) = uint_option(req, BLOCK1) {
        // NUM = 0 with M = 0 is a whole payload in one block; anything else needs reassembly.
        if block1 >> 3 != 0 {
            let reason = format!(
                "block-wise transfer is not supported; send the payload (at most {max_size} bytes) in one message"
            );
            let cause = RejectCause::TooLarge;
            return refuse(R::RequestEntityTooLarge, cause, reason, Some(limit));
        }
    }
    if payload.len() > max_size {
        let reason = format!(
            "payload is {} bytes, the limit (coap.max_message_size) is {max_size}",
            payload.len()
        );
        let cause = RejectCause::TooLarge;
        return refuse(R::RequestEntityTooLarge, cause, reason, Some(limit));
    }
    let choice = match req.get_first_option_as::<OptionValueU16>(CoapOption::ContentFormat) {
        None => FormatChoice::Auto,
        Some(Ok(OptionValueU16(CF_JSON))) => FormatChoice::Json,
        Some(Ok(OptionValueU16(CF_CBOR))) => FormatChoice::Cbor,
        Some(other) => {
            let shown = other.map_or_else(|_| "invalid".to_owned(), |v| v.0.to_string());
            let reason = format!(
                "Content-Format {shown} is not supported; use {CF_JSON} (application/json) or {CF_CBOR} (application/cbor)"
            );
            return refuse(
                R::UnsupportedContentFormat,
                RejectCause::Decode,
                reason,
                None,
            );
        }
    };
    match ingest::decode_reading(kind, payload, choice) {
        Ok((format, reading)) => Plan::Ingest(Inbound {
            device,
            origin: Origin::Coap,
            format,
            received_at,
            reading,
            mqtt: None,
        }),
        Err(e) => refuse(R::BadRequest, e.cause, e.reason, None),
    }
}

fn desired(req: &Packet, raw_device: &str) -> Plan {
    let device = match DeviceKey::parse(raw_device) {
        Ok(d) => d,
        Err(e) => return Plan::Answer(Reply::diagnostic(ResponseType::BadRequest, &e)),
    };
    let format = match uint_option(req, ACCEPT) {
        None | Some(50) => Format::Json,
        Some(60) => Format::Cbor,
        Some(_) => {
            return Plan::Answer(Reply::diagnostic(
                ResponseType::NotAcceptable,
                "desired state is available as 50 (application/json) or 60 (application/cbor)",
            ));
        }
    };
    // Block2 NUM = 0 only states a preferred block size; the document is sent whole.
    if uint_option(req, BLOCK2).is_some_and(|b| b >> 4 != 0) {
        return Plan::Answer(Reply::diagnostic(
            ResponseType::BadOption,
            "block-wise transfer is not supported",
        ));
    }
    let observe = match req.get_observe_value() {
        Some(Ok(0)) => Observe::Register,
        Some(Ok(1)) => Observe::Deregister,
        // Other values carry no meaning in a request (RFC 7641 §2): a plain GET.
        _ => Observe::No,
    };
    Plan::Desired {
        device,
        format,
        observe,
    }
}

/// A critical option the server does not understand, as the reply that refuses it.
fn bad_option(req: &Packet) -> Option<Reply> {
    let (number, _) = req.options().find(|(number, values)| {
        **number % 2 == 1
            && !values.is_empty()
            && !matches!(
                **number,
                URI_HOST | URI_PORT | URI_PATH | URI_QUERY | ACCEPT | BLOCK2 | BLOCK1
            )
    })?;
    Some(if matches!(*number, PROXY_URI | PROXY_SCHEME) {
        Reply::diagnostic(
            ResponseType::ProxyingNotSupported,
            "this server is not a proxy",
        )
    } else {
        Reply::diagnostic(
            ResponseType::BadOption,
            &format!("critical option {number} is not supported"),
        )
    })
}

fn uint_option(req: &Packet, number: u16) -> Option<u32> {
    req.get_first_option_as::<OptionValueU32>(CoapOption::from(number))
        .map(|v| v.map_or(u32::MAX, |v| v.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::model::Reading;
    use coap_lite::MessageType;
    use serde_json::json;

    fn req(method: RequestType, path: &str, payload: &[u8]) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        for segment in path.split('/').skip(1) {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        p
    }

    fn with(mut p: Packet, number: u16, value: u32) -> Packet {
        p.add_option_as(CoapOption::from(number), OptionValueU32(value));
        p
    }

    fn go(p: &Packet) -> Plan {
        plan(p, 64, UnixMillis(1))
    }

    fn answer_code(plan: Plan) -> ResponseType {
        match plan {
            Plan::Answer(r) => r.code,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn refusal(plan: Plan) -> (ResponseType, Rejection, Reply) {
        match plan {
            Plan::Refuse { rejection, reply } => (reply.code, rejection, reply),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn state_and_telemetry_become_ingests_in_either_format() {
        use RequestType::{Post, Put};
        let Plan::Ingest(i) = go(&req(Post, "/d/s1/state", br#"{"on":true}"#)) else {
            panic!()
        };
        assert_eq!(
            (i.device.as_str(), i.origin, i.format),
            ("s1", Origin::Coap, Format::Json)
        );
        assert!(matches!(i.reading, Reading::State(_)) && i.mqtt.is_none());
        assert!(matches!(
            go(&req(Put, "/d/s1/state", b"{}")),
            Plan::Ingest(_)
        ));
        let cbor = codec::encode(&json!([{"t": 1}, {"t": 2}]), Format::Cbor);
        let Plan::Ingest(i) = go(&with(req(Post, "/d/s1/telemetry", &cbor), 12, 60)) else {
            panic!()
        };
        assert_eq!(i.format, Format::Cbor);
        assert!(matches!(i.reading, Reading::Telemetry(ref p) if p.len() == 2));
        // Absent Content-Format: detected.
        let Plan::Ingest(i) = go(&req(Post, "/d/s1/telemetry", &cbor)) else {
            panic!()
        };
        assert_eq!(i.format, Format::Cbor);
    }

    #[test]
    fn unusable_paths_methods_and_options_are_answered_without_a_rejection() {
        use RequestType::{Delete, Get, Post, Put};
        let rows: [(Packet, ResponseType); 9] = [
            (req(Post, "/d/s1/other", b"{}"), ResponseType::NotFound),
            (req(Post, "/d/s1/state/", b"{}"), ResponseType::NotFound),
            (req(Get, "/.well-known/core", b""), ResponseType::NotFound),
            (req(Get, "/d/s1/state", b""), ResponseType::MethodNotAllowed),
            (
                req(Put, "/d/s1/telemetry", b"{}"),
                ResponseType::MethodNotAllowed,
            ),
            (
                req(Delete, "/d/s1/desired", b""),
                ResponseType::MethodNotAllowed,
            ),
            (
                with(req(Post, "/d/s1/state", b"{}"), 1, 5),
                ResponseType::BadOption,
            ),
            (
                with(req(Get, "/d/s1/desired", b""), 35, 1),
                ResponseType::ProxyingNotSupported,
            ),
            (
                with(req(Get, "/d/s1/desired", b""), 17, 0),
                ResponseType::NotAcceptable,
            ),
        ];
        for (p, want) in rows {
            assert_eq!(answer_code(go(&p)), want, "{}", path_of(&p));
        }
        // An unknown method code on a known resource is 4.05 (RFC 7252 §5.8).
        let mut p = req(Get, "/d/s1/state", b"");
        p.header.code = MessageClass::from(0x1f);
        assert_eq!(answer_code(go(&p)), ResponseType::MethodNotAllowed);
        // A bad device key in a GET loses no data: answered only.
        assert_eq!(
            answer_code(go(&req(Get, "/d/a b/desired", b""))),
            ResponseType::BadRequest
        );
    }

    #[test]
    fn refusals_that_lose_data_are_recorded_with_a_reason() {
        use RequestType::Post;
        let (code, rej, reply) = refusal(go(&req(Post, "/d/s1/state", b"[1]")));
        assert_eq!(code, ResponseType::BadRequest);
        assert!(rej.reason.contains("state must be an object"));
        assert_eq!(rej.cause, RejectCause::Invalid);
        assert_eq!(
            (rej.origin, rej.device.as_deref(), rej.locator.as_str()),
            (Origin::Coap, Some("s1"), "/d/s1/state")
        );
        assert_eq!(reply.payload, rej.reason.as_bytes());

        let (code, rej, reply) = refusal(go(&req(Post, "/d/s1/telemetry", &[b' '; 65])));
        assert_eq!(code, ResponseType::RequestEntityTooLarge);
        assert_eq!(reply.size1, Some(64));
        assert!(rej.reason.contains("limit (coap.max_message_size) is 64"));
        assert_eq!(rej.cause, RejectCause::TooLarge);

        let (code, _, _) = refusal(go(&with(req(Post, "/d/s1/telemetry", b"{}"), 12, 0)));
        assert_eq!(code, ResponseType::UnsupportedContentFormat);
        let (code, rej, _) = refusal(go(&with(req(Post, "/d/s1/state", b"{}"), 12, 42)));
        assert_eq!(code, ResponseType::UnsupportedContentFormat);
        assert!(rej.reason.contains("Content-Format 42"));
        assert_eq!(rej.cause, RejectCause::Decode);
        // JSON declared, CBOR sent: the declared format is not second-guessed.
        let cbor = codec::encode(&json!({"a": 1}), Format::Cbor);
        assert_eq!(
            refusal(go(&with(req(Post, "/d/s1/state", &cbor), 12, 50))).0,
            ResponseType::BadRequest
        );

        let (code, rej, _) = refusal(go(&req(Post, "/d/a*b/state", b"{}")));
        assert_eq!(
            (code, rej.device.as_deref()),
            (ResponseType::BadRequest, Some("a*b"))
        );

        // Block1 beyond a single complete block: not reassembled.
        let (code, _, reply) = refusal(go(&with(req(Post, "/d/s1/state", b"{}"), 27, 0b1000)));
        assert_eq!(
            (code, reply.size1),
            (ResponseType::RequestEntityTooLarge, Some(64))
        );
        assert!(matches!(
            go(&with(req(Post, "/d/s1/state", b"{}"), 27, 0b0010)),
            Plan::Ingest(_)
        ));
    }

    #[test]
    fn desired_gets_choose_format_and_observe() {
        use RequestType::Get;
        let p = req(Get, "/d/s1/desired", b"");
        let device = DeviceKey::parse("s1").unwrap();
        let want = |format, observe| Plan::Desired {
            device: device.clone(),
            format,
            observe,
        };
        assert_eq!(go(&p), want(Format::Json, Observe::No));
        assert_eq!(
            go(&with(p.clone(), 17, 60)),
            want(Format::Cbor, Observe::No)
        );
        assert_eq!(
            go(&with(p.clone(), 6, 0)),
            want(Format::Json, Observe::Register)
        );
        assert_eq!(
            go(&with(p.clone(), 6, 1)),
            want(Format::Json, Observe::Deregister)
        );
        assert_eq!(go(&with(p.clone(), 6, 7)), want(Format::Json, Observe::No));
        // Block2 asking for block 0 is served whole; a later block cannot exist.
        assert_eq!(go(&with(p.clone(), 23, 6)), want(Format::Json, Observe::No));
        assert_eq!(answer_code(go(&with(p, 23, 0x16))), ResponseType::BadOption);
    }
}
