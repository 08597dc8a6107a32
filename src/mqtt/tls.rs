//! Why a TLS connection to the broker failed, in words an operator acts on. Pure.
//!
//! rumqttc hands TLS failures over in several wrappers: `ConnectionError::Tls` around an
//! `io::Error` around the `rustls::Error` for a failed handshake, and
//! `MqttState(Deserialization(Io(…)))` for an alert the broker sends after the handshake (with
//! TLS 1.3 a broker checks the client's certificate after the client has finished, so
//! "certificate required" arrives with the first read). [`explain`] digs the rustls error out
//! of whichever wrapper and turns it into one sentence naming the certificate problem and the
//! key to look at.
//!
//! **Link state.** A certificate problem leaves the link [`LinkState::Refused`], as bad
//! credentials do: the broker (or we) refused an identity, and retrying will not help until
//! an operator changes a file or the broker's certificate. (The driver keeps retrying with
//! backoff anyway, so a fixed broker certificate is picked up without a restart.) A broker that
//! closes the connection mid-handshake without saying why is [`LinkState::Down`]: that is
//! also what a broker restarting looks like (and what Mosquitto's plain listener does with a
//! ClientHello: the sentence then suspects the port).
//!
//! [`LinkState::Refused`]: crate::health::LinkState::Refused
//! [`LinkState::Down`]: crate::health::LinkState::Down

use std::path::Path;

use rumqttc::ConnectionError;
use rustls::{AlertDescription, CertificateError};

/// What the sentences name: the configured files and the name checked.
#[derive(Clone, Copy, Debug)]
pub(super) struct Context<'a> {
    pub ca_file: &'a Path,
    pub server_name: &'a str,
    pub client_cert: bool,
}

/// A TLS failure in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Explained {
    /// "TLS: …", naming the problem and the key to look at.
    pub sentence: String,
    /// rustls named the problem (a certificate, a name, an alert): retrying alone will not
    /// fix it, and the link is `refused`. Otherwise the broker just closed the connection
    /// mid-handshake: `down`.
    pub refused: bool,
}

/// The sentence for a connection failure during or right after the TLS handshake; `None`
/// when the failure is not a TLS one (connection refused, timeouts, a broken connection).
pub(super) fn explain(e: &ConnectionError, ctx: Context<'_>) -> Option<Explained> {
    if let Some(r) = rustls_error(e) {
        return Some(Explained {
            sentence: sentence(r, ctx),
            refused: true,
        });
    }
    // Closed without a TLS alert: what a plain MQTT listener does with our ClientHello (and
    // what a broker going down at that moment looks like).
    match e {
        ConnectionError::Tls(rumqttc::TlsError::Io(io)) => Some(Explained {
            sentence: format!(
                "TLS: the broker closed the connection during the handshake ({io}): is \
                 mqtt.port its TLS listener (usually 8883)?"
            ),
            refused: false,
        }),
        _ => None,
    }
}

/// The `rustls::Error` somewhere inside `e`, down its chain of sources.
fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        next = match err.downcast_ref::<std::io::Error>() {
            // `io::Error::source` skips the error it wraps: take that one itself.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn sentence(e: &rustls::Error, ctx: Context<'_>) -> String {
    let ca = ctx.ca_file.display();
    let name = ctx.server_name;
    let s = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::NotValidForNameContext { presented, .. } => {
                let names = if presented.is_empty() {
                    "no names at all".to_owned()
                } else {
                    let names: Vec<&str> = presented.iter().map(|p| plain_name(p)).collect();
                    names.join(", ")
                };
                format!(
                    "the broker's certificate is not valid for name {name:?} (it names {names}); \
                     set mqtt.tls.server_name to one of its names, or give the broker a \
                     certificate for {name:?}"
                )
            }
            CertificateError::NotValidForName => format!(
                "the broker's certificate is not valid for name {name:?}; set \
                 mqtt.tls.server_name to a name it carries"
            ),
            CertificateError::UnknownIssuer => format!(
                "the broker's certificate is not signed by the CA in {ca} (mqtt.tls.ca_file)"
            ),
            CertificateError::BadSignature => format!(
                "the broker's certificate has a signature that does not verify against the CA \
                 in {ca} (mqtt.tls.ca_file)"
            ),
            CertificateError::Expired => "the broker's certificate expired".to_owned(),
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "the broker's certificate expired (valid until {}); renew it on the broker",
                rfc3339(not_after.as_secs())
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the broker's certificate is not valid yet: check this gateway's clock".to_owned()
            }
            CertificateError::Revoked => "the broker's certificate is revoked".to_owned(),
            other => format!("the broker's certificate is refused: {other}"),
        },
        rustls::Error::AlertReceived(alert) => alert_sentence(*alert, ctx),
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "the broker did not answer in TLS: is mqtt.port its TLS listener (usually 8883)?"
                .to_owned()
        }
        rustls::Error::PeerIncompatible(_) => format!(
            "the broker and the gateway have no TLS version or cipher suite in common (the \
             gateway speaks TLS 1.2 and 1.3): {e}"
        ),
        other => other.to_string(),
    };
    format!("TLS: {s}")
}

/// `broker.example` for webpki's `DnsName("broker.example")`, `10.0.0.5` for
/// `IpAddress(10.0.0.5)`: the names as the operator wrote them in the certificate request.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|rest| rest.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

fn alert_sentence(alert: AlertDescription, ctx: Context<'_>) -> String {
    use AlertDescription as A;
    match alert {
        A::CertificateRequired => {
            "the broker requires a client certificate (mqtt.tls.cert_file)".to_owned()
        }
        // TLS 1.2 has no "certificate required": a broker that got none says one of these.
        A::HandshakeFailure | A::BadCertificate if !ctx.client_cert => format!(
            "the broker refused the handshake ({alert:?}); it probably requires a client \
             certificate (mqtt.tls.cert_file)"
        ),
        A::UnknownCA => "the broker does not trust the CA that signed our client certificate \
                         (mqtt.tls.cert_file)"
            .to_owned(),
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::AccessDenied => {
            format!("the broker refused our client certificate (mqtt.tls.cert_file): {alert:?}")
        }
        A::ProtocolVersion | A::InsufficientSecurity | A::HandshakeFailure => format!(
            "the broker refused the handshake ({alert:?}): no TLS version or cipher suite in \
             common (the gateway speaks TLS 1.2 and 1.3)"
        ),
        other => format!("the broker ended the handshake with alert {other:?}"),
    }
}

fn rfc3339(unix_secs: u64) -> String {
    i64::try_from(unix_secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {unix_secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{ServerName, UnixTime};

    const CA: &str = "/etc/nn-gateway/ca.pem";

    fn ctx() -> Context<'static> {
        Context {
            ca_file: Path::new(CA),
            server_name: "10.0.0.5",
            client_cert: false,
        }
    }

    /// As tokio-rustls hands a handshake failure to rumqttc.
    fn handshake(e: rustls::Error) -> ConnectionError {
        ConnectionError::Tls(rumqttc::TlsError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e,
        )))
    }

    fn cert(e: CertificateError) -> ConnectionError {
        handshake(rustls::Error::InvalidCertificate(e))
    }

    #[test]
    fn a_wrong_name_says_which_name_was_checked_and_which_the_certificate_has() {
        let e = cert(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("10.0.0.5").unwrap(),
            // As webpki 0.103 presents them.
            presented: vec![
                "DnsName(\"broker.example\")".into(),
                "IpAddress(10.0.0.6)".into(),
            ],
        });
        let s = explain(&e, ctx()).unwrap().sentence;
        assert!(
            s.starts_with(
                "TLS: the broker's certificate is not valid for name \"10.0.0.5\" (it names broker.example, 10.0.0.6)"
            ),
            "{s}"
        );
        assert!(s.contains("mqtt.tls.server_name"), "{s}");
    }

    #[test]
    fn an_unknown_issuer_names_the_ca_file_and_its_key() {
        let s = explain(&cert(CertificateError::UnknownIssuer), ctx())
            .unwrap()
            .sentence;
        assert_eq!(
            s,
            "TLS: the broker's certificate is not signed by the CA in /etc/nn-gateway/ca.pem (mqtt.tls.ca_file)"
        );
    }

    #[test]
    fn an_expired_certificate_says_when_it_ended() {
        let e = cert(CertificateError::ExpiredContext {
            time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_000)),
            not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_577_923_200)),
        });
        let s = explain(&e, ctx()).unwrap().sentence;
        assert!(
            s.starts_with(
                "TLS: the broker's certificate expired (valid until 2020-01-02T00:00:00Z)"
            ),
            "{s}"
        );
        assert_eq!(
            explain(&cert(CertificateError::Expired), ctx())
                .unwrap()
                .sentence,
            "TLS: the broker's certificate expired"
        );
    }

    #[test]
    fn a_missing_client_certificate_is_named_whether_tls_1_3_or_1_2_says_so() {
        // TLS 1.3: the alert arrives on the first read after the handshake (as seen from
        // Mosquitto 2.0.11 with OpenSSL 3.0).
        let late = ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            )),
        ));
        assert_eq!(
            explain(&late, ctx()).unwrap().sentence,
            "TLS: the broker requires a client certificate (mqtt.tls.cert_file)"
        );
        let tls12 = handshake(rustls::Error::AlertReceived(
            AlertDescription::HandshakeFailure,
        ));
        assert!(
            explain(&tls12, ctx())
                .unwrap()
                .sentence
                .contains("probably requires a client certificate (mqtt.tls.cert_file)")
        );
    }

    #[test]
    fn a_refused_client_certificate_is_told_from_a_missing_one() {
        let with_cert = Context {
            client_cert: true,
            ..ctx()
        };
        let unknown_ca = handshake(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert_eq!(
            explain(&unknown_ca, with_cert).unwrap().sentence,
            "TLS: the broker does not trust the CA that signed our client certificate (mqtt.tls.cert_file)"
        );
        let bad = handshake(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate,
        ));
        assert!(
            explain(&bad, with_cert)
                .unwrap()
                .sentence
                .starts_with("TLS: the broker refused our client certificate (mqtt.tls.cert_file)")
        );
    }

    #[test]
    fn a_plain_listener_is_suspected_when_the_answer_is_not_tls() {
        let e = handshake(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert!(explain(&e, ctx()).unwrap().sentence.contains("8883"));
    }

    #[test]
    fn failures_that_are_not_tls_are_left_to_the_caller() {
        let refused =
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(explain(&refused, ctx()), None);
        assert_eq!(explain(&ConnectionError::NetworkTimeout, ctx()), None);
    }

    #[test]
    fn a_handshake_cut_short_without_an_alert_is_down_and_suspects_the_port() {
        // Mosquitto's plain listener resets the connection on our ClientHello.
        let reset = ConnectionError::Tls(rumqttc::TlsError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        let explained = explain(&reset, ctx()).unwrap();
        assert!(!explained.refused);
        assert!(
            explained
                .sentence
                .starts_with("TLS: the broker closed the connection during the handshake")
                && explained.sentence.contains("8883"),
            "{}",
            explained.sentence
        );
        let alert = handshake(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert!(explain(&alert, ctx()).unwrap().refused);
    }
}
