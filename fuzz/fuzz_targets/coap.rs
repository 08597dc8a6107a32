//! A datagram from the network, as the CoAP server sees it: classified, routed, answered.
//!
//! Properties, beyond not panicking: whatever we send back (a response to a request, an RST
//! to a ping or to a malformed confirmable message) parses as a CoAP message again, keeps the
//! request's token (and message id, when confirmable), carries the planned code and payload;
//! a planned ingest names a valid device and a payload within the size limit; a refusal's
//! excerpt is bounded; a diagnostic is short UTF-8.
#![no_main]

use coap_lite::{MessageClass, MessageType, Packet};
use libfuzzer_sys::fuzz_target;
use nn_gateway::coap::message::{self, Exchange, Incoming, MessageIds};
use nn_gateway::coap::reply::{DIAGNOSTIC_LEN, Reply};
use nn_gateway::coap::route::{self, Observe, Plan};
use nn_gateway::model::{DeviceKey, Outcome, REJECTED_EXCERPT_LEN, UnixMillis};

/// The server's default `coap.max_message_size`.
const MAX_SIZE: usize = 1024;

fuzz_target!(|datagram: &[u8]| {
    match message::classify(datagram) {
        Incoming::Request(req) => answer(&req),
        Incoming::Ping { mid } | Incoming::Malformed { reset: Some(mid) } => {
            assert_eq!(
                message::classify(&message::reset(mid)),
                Incoming::Reset { mid }
            );
        }
        Incoming::Reset { .. } | Incoming::Ignore | Incoming::Malformed { reset: None } => {}
    }
});

fn answer(req: &Packet) {
    let reply = match route::plan(req, MAX_SIZE, UnixMillis(0)) {
        Plan::Answer(reply) => reply,
        Plan::Refuse { rejection, reply } => {
            assert!(rejection.excerpt.len() <= REJECTED_EXCERPT_LEN);
            assert_eq!(rejection.size, req.payload.len());
            reply
        }
        Plan::Ingest(inbound) => {
            assert!(DeviceKey::parse(inbound.device.as_str()).is_ok());
            assert!(req.payload.len() <= MAX_SIZE);
            Reply::after_ingest(&Ok(Outcome::Stored { new_device: true }), 30)
        }
        Plan::Desired {
            device,
            format,
            observe,
        } => {
            assert!(DeviceKey::parse(device.as_str()).is_ok());
            let seq = (observe == Observe::Register).then_some(7);
            Reply::content(&serde_json::json!({"on": true}), format, seq)
        }
    };
    if reply.content_format.is_none() {
        assert!(reply.payload.len() <= DIAGNOSTIC_LEN, "diagnostic too long");
        assert!(
            std::str::from_utf8(&reply.payload).is_ok(),
            "diagnostic not UTF-8"
        );
    }
    let to = Exchange::of(req);
    let bytes = message::response(&reply, &to, &MessageIds::new(0));
    // Our own response, sent back to us, is well-formed: the server would ignore it.
    assert_eq!(message::classify(&bytes), Incoming::Ignore, "{bytes:02x?}");
    let sent = Packet::from_bytes(&bytes).expect("our response parses");
    assert_eq!(sent.get_token(), to.token.as_slice());
    assert_eq!(sent.header.code, MessageClass::Response(reply.code));
    assert_eq!(sent.payload, reply.payload);
    if to.confirmable {
        assert_eq!(sent.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(sent.header.message_id, to.mid);
    } else {
        assert_eq!(sent.header.get_type(), MessageType::NonConfirmable);
    }
}
