//! Datagrams in and out: what an incoming datagram is, and the bytes of what we send.
//!
//! Pure. coap-lite parses and serialises; the rules about message types and ids live here:
//! - a confirmable request is answered with a piggybacked ACK carrying its message id and
//!   token;
//! - a non-confirmable request is answered with a NON carrying a **fresh** message id (coap-lite's
//!   `CoapResponse::new` would reuse the request's, which the client may then take for a
//!   duplicate and drop);
//! - an empty confirmable message (a "CoAP ping") and a confirmable message we cannot process
//!   are answered with RST (RFC 7252 §4.2, §4.3); anything else we cannot use is ignored.

use std::sync::atomic::{AtomicU16, Ordering};

use coap_lite::option_value::OptionValueU32;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

use super::observe::Notification;
use super::reply::Reply;

/// Largest datagram we send: the most a UDP datagram over IPv4 can carry. There is no
/// block-wise transfer (RFC 7959), so a desired document is always sent whole; one above the
/// path MTU (about 1 KiB for 6LoWPAN and some VPNs) relies on IP fragmentation.
pub const MAX_DATAGRAM: usize = 65_507;

/// What an incoming datagram is.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// A CON or NON request.
    Request(Packet),
    /// An empty CON: answer with RST.
    Ping { mid: u16 },
    /// A RST: the peer rejects the message with this id (perhaps a notification).
    Reset { mid: u16 },
    /// Something to ignore silently: an ACK (we never send CON), an empty NON, a NON
    /// response, a message of an unknown CoAP version.
    Ignore,
    /// Not a valid message. `reset` is the message id to answer with RST when it was
    /// confirmable.
    Malformed { reset: Option<u16> },
}

/// Classifies one datagram.
pub fn classify(datagram: &[u8]) -> Incoming {
    if datagram.len() < 4 {
        return Incoming::Malformed { reset: None };
    }
    // Messages with an unknown version are silently ignored (RFC 7252 §3).
    if datagram[0] >> 6 != 1 {
        return Incoming::Ignore;
    }
    let confirmable = (datagram[0] >> 4) & 0b11 == 0;
    let mid = u16::from_be_bytes([datagram[2], datagram[3]]);
    let Ok(packet) = Packet::from_bytes(datagram) else {
        return Incoming::Malformed {
            reset: confirmable.then_some(mid),
        };
    };
    let code = u8::from(packet.header.code);
    match (packet.header.get_type(), code) {
        (MessageType::Reset, _) => Incoming::Reset { mid },
        (MessageType::Acknowledgement, _) => Incoming::Ignore,
        (MessageType::Confirmable, 0) => Incoming::Ping { mid },
        (MessageType::NonConfirmable, 0) => Incoming::Ignore,
        // Class 0 with a non-zero detail is a request, even with a method we do not know
        // (answered 4.05).
        (_, 1..=31) => Incoming::Request(packet),
        // A response or reserved class sent to us as CON: we have no such exchange.
        (MessageType::Confirmable, _) => Incoming::Malformed { reset: Some(mid) },
        (MessageType::NonConfirmable, _) => Incoming::Ignore,
    }
}

/// The exchange a request opened: where its response must go and how it is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub mid: u16,
    pub token: Vec<u8>,
    pub confirmable: bool,
}

impl Exchange {
    pub fn of(req: &Packet) -> Exchange {
        Exchange {
            mid: req.header.message_id,
            token: req.get_token().to_vec(),
            confirmable: req.header.get_type() == MessageType::Confirmable,
        }
    }
}

/// Allocates message ids for messages we originate (NON responses and notifications).
#[derive(Debug)]
pub struct MessageIds(AtomicU16);

impl MessageIds {
    /// Starts at `first`; pass a random value so a restarted server does not reuse the ids it
    /// just used (RFC 7252 §4.4).
    pub fn new(first: u16) -> MessageIds {
        MessageIds(AtomicU16::new(first))
    }

    pub fn next(&self) -> u16 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// The bytes answering `to` with `reply`.
pub fn response(reply: &Reply, to: &Exchange, ids: &MessageIds) -> Vec<u8> {
    let (kind, mid) = if to.confirmable {
        (MessageType::Acknowledgement, to.mid)
    } else {
        (MessageType::NonConfirmable, ids.next())
    };
    frame(kind, mid, &to.token, reply)
}

/// The bytes of a notification (always NON; see the module documentation of `coap`).
pub fn notification(n: &Notification) -> Vec<u8> {
    let reply = Reply::content(&n.doc.doc, n.format, Some(n.observe));
    frame(MessageType::NonConfirmable, n.mid, &n.token, &reply)
}

/// An RST for message `mid`.
pub fn reset(mid: u16) -> Vec<u8> {
    let [hi, lo] = mid.to_be_bytes();
    // Version 1, type 3 (RST), no token, code 0.00.
    vec![0b0111_0000, 0, hi, lo]
}

fn frame(kind: MessageType, mid: u16, token: &[u8], reply: &Reply) -> Vec<u8> {
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.set_type(kind);
    packet.header.message_id = mid;
    packet.header.code = MessageClass::Response(reply.code);
    packet.set_token(token.to_vec());
    let mut uint = |option: CoapOption, value: Option<u32>| {
        if let Some(v) = value {
            packet.add_option_as(option, OptionValueU32(v));
        }
    };
    uint(CoapOption::Observe, reply.observe);
    uint(
        CoapOption::ContentFormat,
        reply.content_format.map(u32::from),
    );
    uint(CoapOption::MaxAge, reply.max_age);
    uint(CoapOption::Size1, reply.size1);
    packet.payload = reply.payload.clone();
    match packet.to_bytes_with_limit(MAX_DATAGRAM) {
        Ok(bytes) => bytes,
        Err(_) => {
            // Only a payload too large for one datagram gets here.
            packet.clear_all_options();
            packet.header.code = MessageClass::Response(ResponseType::InternalServerError);
            packet.payload =
                b"response too large for one datagram (no block-wise transfer)".to_vec();
            packet.to_bytes_with_limit(MAX_DATAGRAM).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::RequestType;

    fn request(kind: MessageType, mid: u16) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(kind);
        p.header.message_id = mid;
        p.header.code = MessageClass::Request(RequestType::Get);
        p.set_token(vec![0xab, 0xcd]);
        p
    }

    #[test]
    fn datagrams_are_classified_by_type_and_code() {
        let con = request(MessageType::Confirmable, 5).to_bytes().unwrap();
        assert!(matches!(classify(&con), Incoming::Request(_)));
        assert_eq!(classify(&[0x40, 0, 0, 9]), Incoming::Ping { mid: 9 });
        assert_eq!(classify(&[0x50, 0, 0, 9]), Incoming::Ignore);
        assert_eq!(classify(&[0x70, 0, 0, 9]), Incoming::Reset { mid: 9 });
        assert_eq!(classify(&[0x60, 0x45, 0, 9]), Incoming::Ignore);
        // A 2.05 sent to us as CON, and a CON with a 9-byte token, are rejected with RST.
        assert_eq!(
            classify(&[0x40, 0x45, 0, 9]),
            Incoming::Malformed { reset: Some(9) }
        );
        assert_eq!(
            classify(&[0x49, 0x01, 0, 9, 1]),
            Incoming::Malformed { reset: Some(9) }
        );
        // Unparseable NON, too short, or another version.
        assert_eq!(
            classify(&[0x59, 0x01, 0, 9, 1]),
            Incoming::Malformed { reset: None }
        );
        assert_eq!(classify(&[0x40, 1]), Incoming::Malformed { reset: None });
        assert_eq!(classify(&[0x80, 1, 0, 1]), Incoming::Ignore);
    }

    #[test]
    fn a_confirmable_request_gets_a_piggybacked_ack_with_its_id_and_token() {
        let ids = MessageIds::new(1000);
        let req = request(MessageType::Confirmable, 77);
        let bytes = response(
            &Reply::empty(ResponseType::Changed),
            &Exchange::of(&req),
            &ids,
        );
        let p = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(p.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(p.header.message_id, 77);
        assert_eq!(p.get_token(), &[0xab, 0xcd]);
        assert_eq!(p.header.code, MessageClass::Response(ResponseType::Changed));
    }

    #[test]
    fn a_non_confirmable_request_gets_a_non_with_a_fresh_message_id() {
        let ids = MessageIds::new(1000);
        let req = request(MessageType::NonConfirmable, 77);
        let first = Packet::from_bytes(&response(
            &Reply::empty(ResponseType::Changed),
            &Exchange::of(&req),
            &ids,
        ))
        .unwrap();
        let second = Packet::from_bytes(&response(
            &Reply::empty(ResponseType::Changed),
            &Exchange::of(&req),
            &ids,
        ))
        .unwrap();
        assert_eq!(first.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(first.get_token(), &[0xab, 0xcd]);
        assert_eq!(first.header.message_id, 1000);
        assert_eq!(second.header.message_id, 1001);
    }

    #[test]
    fn reply_options_are_framed() {
        let ids = MessageIds::new(0);
        let reply = Reply {
            max_age: Some(2),
            size1: Some(1024),
            ..Reply::diagnostic(ResponseType::ServiceUnavailable, "busy")
        };
        let req = request(MessageType::Confirmable, 1);
        let p = Packet::from_bytes(&response(&reply, &Exchange::of(&req), &ids)).unwrap();
        let uint = |o| {
            p.get_first_option_as::<OptionValueU32>(o)
                .unwrap()
                .unwrap()
                .0
        };
        assert_eq!(uint(CoapOption::MaxAge), 2);
        assert_eq!(uint(CoapOption::Size1), 1024);
        assert_eq!(p.payload, b"busy");
        assert_eq!(reset(0x1234), vec![0x70, 0, 0x12, 0x34]);
        assert_eq!(classify(&reset(3)), Incoming::Reset { mid: 3 });
    }

    #[test]
    fn a_response_too_large_for_a_datagram_becomes_a_server_error() {
        let ids = MessageIds::new(0);
        let reply = Reply {
            payload: vec![b'x'; MAX_DATAGRAM],
            ..Reply::empty(ResponseType::Content)
        };
        let req = request(MessageType::Confirmable, 1);
        let p = Packet::from_bytes(&response(&reply, &Exchange::of(&req), &ids)).unwrap();
        assert_eq!(
            p.header.code,
            MessageClass::Response(ResponseType::InternalServerError)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Whatever a peer sends, classifying, routing and answering it does not panic.
        #[test]
        fn no_datagram_panics_the_server(
            mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            version_one in proptest::prelude::any::<bool>(),
        ) {
            if version_one && bytes.len() >= 2 {
                // Random bytes are mostly another CoAP version, ignored at once: half the time,
                // make them a version 1 request (any type, method 0.00 to 0.07) instead.
                bytes[0] = (bytes[0] & 0x3f) | 0x40;
                bytes[1] %= 8;
            }
            if let Incoming::Request(req) = classify(&bytes) {
                let to = Exchange::of(&req);
                let ids = MessageIds::new(0);
                match crate::coap::route::plan(&req, 16, crate::model::UnixMillis(0)) {
                    crate::coap::route::Plan::Answer(reply)
                    | crate::coap::route::Plan::Refuse { reply, .. } => {
                        let answer = response(&reply, &to, &ids);
                        proptest::prop_assert!(Packet::from_bytes(&answer).is_ok());
                    }
                    _ => {}
                }
            }
        }
    }
}
