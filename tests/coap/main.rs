//! The CoAP server against real peers.
//!
//! Real: the libcoap command-line client `coap-client-notls` (Debian `libcoap3-bin`) as a
//! child process, UDP on loopback (the server socket bound to 127.0.0.1:0), the SQLite store in
//! a temporary directory. Where a test needs control libcoap does not give (a retransmission
//! with the same message id, a RST, a malformed datagram), it crafts datagrams itself with
//! coap-lite on a plain UDP socket.
//!
//! Not real: no daemon around the server (the test calls `coap::spawn` and plays the downlink
//! by calling `desired_changed`), no clouds. A slow or busy store is simulated by parking the
//! store thread in a `store.call` until the test releases it.
//!
//! Absence of a datagram is checked with a ping barrier where possible: the server handles
//! datagrams from a peer in order, so once the RST to a later ping is back, any answer to an
//! earlier request would have come first.

mod rig;

use std::time::Duration;

use coap_lite::option_value::OptionValueU16;
use coap_lite::{CoapOption, MessageType, Packet, RequestType, ResponseType};
use nn_gateway::coap;
use nn_gateway::codec;
use nn_gateway::config::CoapConfig;
use nn_gateway::model::Format;
use rig::*;
use serde_json::json;
use tokio::time::timeout;

#[tokio::test]
async fn state_in_json_and_cbor_is_merged_and_acknowledged_created_then_changed() {
    let gw = Gateway::default().await;
    let first = gw
        .client(
            &[
                "-m",
                "post",
                "-t",
                "json",
                "-e",
                r#"{"fw":"1.0","led":{"on":true}}"#,
            ],
            "/d/dev1/state",
        )
        .await;
    assert_eq!(code(&first), "2.01", "a new device is created");
    let cbor_file = gw.dir.path().join("patch.cbor");
    std::fs::write(
        &cbor_file,
        codec::encode(&json!({"led": {"level": 3}, "fw": null}), Format::Cbor),
    )
    .unwrap();
    let second = gw
        .client(
            &["-m", "put", "-t", "cbor", "-f", cbor_file.to_str().unwrap()],
            "/d/dev1/state",
        )
        .await;
    assert_eq!(code(&second), "2.04");
    assert!(stdout(&second).contains("Content-Format:application/cbor"));

    let devices = gw.devices().await;
    assert_eq!(devices.len(), 1);
    assert_eq!(
        (devices[0].key.as_str(), devices[0].origin.as_str()),
        ("dev1", "coap")
    );
    assert_eq!(
        devices[0].reported,
        Some(json!({"led": {"on": true, "level": 3}}))
    );
    assert_eq!(devices[0].reported_version, Some(2));
    gw.stop().await;
}

#[tokio::test]
async fn telemetry_in_json_and_cbor_arrays_is_stored_point_by_point() {
    let gw = Gateway::default().await;
    let one = gw
        .client(
            &["-m", "post", "-t", "json", "-e", r#"{"t":21.5}"#],
            "/d/dev1/telemetry",
        )
        .await;
    assert_eq!(code(&one), "2.01");
    let cbor_file = gw.dir.path().join("points.cbor");
    let points = json!([{"t": 22, "ts": 1_700_000_000_000_i64}, {"t": 23}]);
    std::fs::write(&cbor_file, codec::encode(&points, Format::Cbor)).unwrap();
    let two = gw
        .client(
            &[
                "-m",
                "post",
                "-t",
                "cbor",
                "-f",
                cbor_file.to_str().unwrap(),
            ],
            "/d/dev1/telemetry",
        )
        .await;
    assert_eq!(code(&two), "2.04");
    // Non-confirmable works too, and its response is NON.
    let non = gw
        .client(
            &["-N", "-m", "post", "-e", r#"{"t":24}"#],
            "/d/dev1/telemetry",
        )
        .await;
    assert!(stdout(&non).contains("t:NON c:2.04"), "{}", stdout(&non));

    assert_eq!(
        gw.telemetry("dev1").await,
        vec![
            json!({"t": 21.5}),
            json!({"t": 22}),
            json!({"t": 23}),
            json!({"t": 24})
        ]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_payload_is_answered_4_00_with_a_reason_and_recorded_as_rejected() {
    let gw = Gateway::default().await;
    let out = gw
        .client(
            &["-m", "post", "-t", "json", "-e", "[1,2]"],
            "/d/dev1/state",
        )
        .await;
    assert_eq!(code(&out), "4.00");
    assert!(
        stderr(&out).contains("state must be an object"),
        "{}",
        stderr(&out)
    );

    let rejected = gw.rejected().await;
    assert_eq!(rejected.len(), 1);
    let r = &rejected[0];
    assert_eq!(
        (r.origin.as_str(), r.device.as_deref(), r.locator.as_str()),
        ("coap", Some("dev1"), "/d/dev1/state")
    );
    assert!(r.reason.contains("state must be an object"));
    assert_eq!(r.excerpt, "[1,2]");
    assert!(
        gw.devices().await.is_empty(),
        "a refused message creates no device"
    );
    gw.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_get_4_04_and_4_05_without_a_rejection() {
    let gw = Gateway::default().await;
    let out = gw
        .client(&["-m", "post", "-e", "{}"], "/devices/dev1/state")
        .await;
    assert_eq!(code(&out), "4.04");
    let out = gw.client(&["-m", "get"], "/.well-known/core").await;
    assert_eq!(code(&out), "4.04");
    let out = gw.client(&["-m", "get"], "/d/dev1/state").await;
    assert_eq!(code(&out), "4.05");
    let out = gw.client(&["-m", "delete"], "/d/dev1/desired").await;
    assert_eq!(code(&out), "4.05");
    assert!(gw.rejected().await.is_empty());
    let status = gw.store.call(|db| db.status()).await.unwrap();
    assert_eq!((status.devices, status.rejected_total), (0, 0));
    gw.stop().await;
}

#[tokio::test]
async fn a_payload_over_the_limit_is_answered_4_13_with_size1_and_recorded() {
    let gw = Gateway::start(CoapConfig {
        max_message_size: 64,
        ..CoapConfig::default()
    })
    .await;
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(90));
    let out = gw
        .client(
            &["-m", "post", "-t", "json", "-e", &big],
            "/d/dev1/telemetry",
        )
        .await;
    assert_eq!(code(&out), "4.13");
    assert!(stdout(&out).contains("Size1:64"), "{}", stdout(&out));
    let rejected = gw.rejected().await;
    assert!(
        rejected[0]
            .reason
            .contains("limit (coap.max_message_size) is 64")
    );
    assert_eq!(rejected[0].size, big.len() as i64);
    // At the limit it is fine.
    let ok = format!(r#"{{"b":"{}"}}"#, "x".repeat(64 - 8));
    assert_eq!(ok.len(), 64);
    let out = gw
        .client(
            &["-m", "post", "-t", "json", "-e", &ok],
            "/d/dev1/telemetry",
        )
        .await;
    assert_eq!(code(&out), "2.01");
    gw.stop().await;
}

#[tokio::test]
async fn an_unsupported_content_format_is_answered_4_15_and_recorded() {
    let gw = Gateway::default().await;
    let out = gw
        .client(
            &["-m", "post", "-t", "text/plain", "-e", "21.5"],
            "/d/dev1/telemetry",
        )
        .await;
    assert_eq!(code(&out), "4.15");
    let out = gw
        .client(
            &["-m", "post", "-t", "application/xml", "-e", "<a/>"],
            "/d/dev1/state",
        )
        .await;
    assert_eq!(code(&out), "4.15");
    let rejected = gw.rejected().await;
    assert_eq!(rejected.len(), 2);
    assert!(
        rejected
            .iter()
            .all(|r| r.reason.contains("is not supported"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn desired_state_is_served_as_json_or_cbor_and_empty_before_any_exists() {
    let gw = Gateway::default().await;
    let out = gw.client(&["-m", "get"], "/d/dev1/desired").await;
    assert_eq!(code(&out), "2.05");
    assert!(stdout(&out).contains("Content-Format:application/json"));
    assert!(stdout(&out).contains(":: '{}'"), "{}", stdout(&out));

    gw.set_desired("dev1", json!({"interval": 30})).await;
    let out = gw.client(&["-m", "get"], "/d/dev1/desired").await;
    assert!(
        stdout(&out).contains(r#":: '{"interval":30}'"#),
        "{}",
        stdout(&out)
    );

    let file = gw.dir.path().join("desired.cbor");
    let out = gw
        .client(
            &["-m", "get", "-A", "60", "-o", file.to_str().unwrap()],
            "/d/dev1/desired",
        )
        .await;
    assert_eq!(code(&out), "2.05");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        codec::decode_as(&bytes, Format::Cbor).unwrap(),
        json!({"interval": 30})
    );

    let out = gw
        .client(&["-m", "get", "-A", "text/plain"], "/d/dev1/desired")
        .await;
    assert_eq!(code(&out), "4.06");
    gw.stop().await;
}

#[tokio::test]
async fn an_observer_is_notified_when_the_desired_state_changes() {
    let gw = Gateway::default().await;
    let args: Vec<String> = ["-s", "3", "-m", "get"]
        .iter()
        .map(|s| s.to_string())
        .chain([gw.uri("/d/dev1/desired")])
        .collect();
    let observer = tokio::spawn(run_client(args));
    let handle = gw.handle.clone();
    eventually("the observer to register", || handle.stats().observers == 1).await;

    let doc = gw.set_desired("dev1", json!({"led": "blue"})).await;
    gw.handle.desired_changed(doc.clone());
    // Announced again (the downlink re-reads changes by seq): not sent twice.
    gw.handle.desired_changed(doc);
    let out = observer.await.unwrap();
    let printed = stdout(&out);
    assert!(
        printed.starts_with("{}"),
        "first the empty document: {printed:?}"
    );
    assert!(
        printed.contains(r#"{"led":"blue"}"#),
        "then the notification: {printed:?}"
    );
    assert_eq!(gw.handle.stats().notifications, 1);
    // When its observation time is over, libcoap deregisters.
    eventually("the observer to deregister", || {
        handle.stats().observers == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn raw_observe_gets_cbor_notifications_until_a_reset_cancels_it() {
    let gw = Gateway::default().await;
    let raw = Raw::new(gw.addr).await;
    let mut get = request(
        MessageType::Confirmable,
        RequestType::Get,
        10,
        "/d/dev2/desired",
        b"",
    );
    get.set_observe_value(0);
    get.add_option_as(CoapOption::Accept, OptionValueU16(60));
    raw.send(&get).await;
    let answer = raw.recv().await;
    assert_eq!(
        (response_code(&answer), answer.header.message_id),
        (ResponseType::Content, 10)
    );
    let first_observe =
        uint_option(&answer, CoapOption::Observe).expect("registered: Observe in the answer");
    assert_eq!(uint_option(&answer, CoapOption::ContentFormat), Some(60));
    assert_eq!(
        codec::decode_as(&answer.payload, Format::Cbor).unwrap(),
        json!({})
    );

    let doc = gw.set_desired("dev2", json!({"mode": "eco"})).await;
    gw.handle.desired_changed(doc);
    let note = raw.recv().await;
    assert_eq!(note.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(note.get_token(), get.get_token());
    assert_ne!(
        note.header.message_id, 10,
        "a notification has its own message id"
    );
    assert!(uint_option(&note, CoapOption::Observe).unwrap() > first_observe);
    assert_eq!(uint_option(&note, CoapOption::ContentFormat), Some(60));
    assert_eq!(
        codec::decode_as(&note.payload, Format::Cbor).unwrap(),
        json!({"mode": "eco"})
    );

    // The client rejects the notification: the observation ends.
    let [hi, lo] = note.header.message_id.to_be_bytes();
    raw.send_bytes(&[0x70, 0, hi, lo]).await;
    raw.barrier(11).await;
    assert_eq!(gw.handle.stats().observers, 0);
    let doc = gw.set_desired("dev2", json!({"mode": "boost"})).await;
    gw.handle.desired_changed(doc);
    assert_eq!(gw.handle.stats().notifications, 1);
    raw.barrier(12).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_retransmitted_confirmable_request_is_answered_again_but_stored_once() {
    let gw = Gateway::default().await;
    let raw = Raw::new(gw.addr).await;
    let post = con_post(0x1234, "/d/dev1/telemetry", br#"{"t":1}"#);
    raw.send(&post).await;
    let first = raw.recv_bytes().await;
    raw.send(&post).await;
    let second = raw.recv_bytes().await;
    assert_eq!(first, second, "the cached response, byte for byte");
    let p = Packet::from_bytes(&first).unwrap();
    assert_eq!(
        (p.header.get_type(), p.header.message_id),
        (MessageType::Acknowledgement, 0x1234)
    );
    assert_eq!(
        (response_code(&p), p.get_token()),
        (ResponseType::Created, post.get_token())
    );
    assert_eq!(gw.telemetry("dev1").await.len(), 1);
    assert_eq!(gw.handle.stats().duplicates, 1);
    // The same message id from another endpoint is another exchange.
    let other = Raw::new(gw.addr).await;
    other.send(&post).await;
    assert_eq!(response_code(&other.recv().await), ResponseType::Changed);
    assert_eq!(gw.telemetry("dev1").await.len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn a_retransmission_while_the_first_copy_is_handled_is_ignored() {
    let gw = Gateway::default().await;
    let raw = Raw::new(gw.addr).await;
    let release = gw.block_store().await;
    let post = con_post(7, "/d/dev1/state", br#"{"on":true}"#);
    raw.send(&post).await;
    raw.send(&post).await;
    raw.barrier(100).await;
    release.send(()).unwrap();
    let p = raw.recv().await;
    assert_eq!(
        (response_code(&p), p.header.message_id),
        (ResponseType::Created, 7)
    );
    raw.barrier(101).await;
    assert_eq!(gw.devices().await[0].reported_version, Some(1));
    gw.stop().await;
}

#[tokio::test]
async fn a_non_confirmable_request_gets_a_fresh_message_id_and_its_duplicate_is_dropped() {
    let gw = Gateway::default().await;
    let raw = Raw::new(gw.addr).await;
    let post = request(
        MessageType::NonConfirmable,
        RequestType::Post,
        500,
        "/d/dev1/telemetry",
        br#"{"t":1}"#,
    );
    raw.send(&post).await;
    let p = raw.recv().await;
    assert_eq!(p.header.get_type(), MessageType::NonConfirmable);
    assert_ne!(p.header.message_id, 500);
    assert_eq!(
        (response_code(&p), p.get_token()),
        (ResponseType::Created, post.get_token())
    );
    raw.send(&post).await;
    raw.barrier(501).await;
    assert_eq!(gw.telemetry("dev1").await.len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn pings_get_a_reset_and_malformed_datagrams_are_dropped_and_counted() {
    let gw = Gateway::default().await;
    let raw = Raw::new(gw.addr).await;
    raw.send_bytes(&[0xff, 0x00]).await;
    raw.send_bytes(&[0x52, 0x01, 0x00, 0x01, 0xaa]).await; // NON with a token cut short
    // "G" reads as version 1, CON, and "E" as code 2.05: a response sent to us as CON.
    raw.send_bytes(b"GET / HTTP/1.1\r\n\r\n").await;
    let answer = raw.recv().await;
    assert_eq!(answer.header.get_type(), MessageType::Reset);
    raw.barrier(9).await;
    assert_eq!(gw.handle.stats().malformed, 3);
    // The server still works.
    raw.send(&con_post(10, "/d/dev1/state", b"{}")).await;
    assert_eq!(response_code(&raw.recv().await), ResponseType::Created);
    gw.stop().await;
}

#[tokio::test]
async fn when_every_handler_is_busy_a_request_gets_5_03_with_max_age() {
    let gw = Gateway::start(CoapConfig {
        max_concurrent: 1,
        ..CoapConfig::default()
    })
    .await;
    let raw = Raw::new(gw.addr).await;
    let release = gw.block_store().await;
    raw.send(&con_post(1, "/d/dev1/telemetry", br#"{"t":1}"#))
        .await;
    let second = con_post(2, "/d/dev2/telemetry", br#"{"t":2}"#);
    raw.send(&second).await;
    let busy = raw.recv().await;
    assert_eq!(
        (response_code(&busy), busy.header.message_id),
        (ResponseType::ServiceUnavailable, 2)
    );
    assert_eq!(
        uint_option(&busy, CoapOption::MaxAge),
        Some(coap::OVERLOAD_RETRY_AFTER_SECS)
    );
    assert_eq!(gw.handle.stats().overloaded, 1);
    // Requests that need no store are still answered.
    raw.send(&con_post(3, "/nowhere", b"{}")).await;
    assert_eq!(response_code(&raw.recv().await), ResponseType::NotFound);

    release.send(()).unwrap();
    let first = raw.recv().await;
    assert_eq!(
        (response_code(&first), first.header.message_id),
        (ResponseType::Created, 1)
    );
    // A 5.03 is not replayed: the retransmission gets a real chance.
    raw.send(&second).await;
    assert_eq!(response_code(&raw.recv().await), ResponseType::Created);
    assert_eq!(gw.telemetry("dev2").await.len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_stops_reading_but_requests_in_progress_are_answered() {
    let gw = Gateway::default().await;
    let raw = Raw::new(gw.addr).await;
    let release = gw.block_store().await;
    raw.send(&con_post(1, "/d/dev1/telemetry", br#"{"t":1}"#))
        .await;
    raw.barrier(2).await;
    gw.shutdown.cancel();
    release.send(()).unwrap();
    let answer = raw.recv().await;
    assert_eq!(response_code(&answer), ResponseType::Created);
    raw.send(&con_post(3, "/d/dev1/telemetry", br#"{"t":2}"#))
        .await;
    let mut buf = [0u8; 64];
    let late = timeout(Duration::from_millis(300), raw.socket.recv_from(&mut buf)).await;
    assert!(late.is_err(), "no answer after shutdown");
    assert_eq!(gw.telemetry("dev1").await.len(), 1);
    gw.stop().await;
}
