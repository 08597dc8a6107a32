//! Why a connection to the broker failed, in the words that say what to do about it.

use crate::config::TlsClient;

/// Why a connection attempt failed, as far as it changes what an operator should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Problem {
    /// The broker answered and said no: credentials, ACL or client id.
    Refused,
    /// TLS failed: the sentence of [`super::tls::explain`]. `refused` when rustls named the problem
    /// (a certificate, a name, an alert): the link is then `refused` (the module doc of
    /// [`super::tls`] says why), else `down`.
    Tls { sentence: String, refused: bool },
    /// No answer, or the connection broke.
    Unreachable,
}

impl Problem {
    pub(super) fn of(e: &rumqttc::ConnectionError, tls: Option<&TlsClient>) -> Problem {
        if let Some(tls) = tls {
            let ctx = super::tls::Context {
                ca_file: tls.ca_file(),
                server_name: tls.server_name(),
                client_cert: tls.has_client_cert(),
            };
            if let Some(super::tls::Explained { sentence, refused }) = super::tls::explain(e, ctx) {
                return Problem::Tls { sentence, refused };
            }
        }
        match e {
            rumqttc::ConnectionError::ConnectionRefused(_) => Problem::Refused,
            _ => Problem::Unreachable,
        }
    }

    pub(super) fn advice(&self) -> String {
        match self {
            Problem::Refused => "broker refused the connection: check mqtt.username, \
                                 mqtt.password_file (or credential mqtt-password), \
                                 mqtt.client_id and the broker's ACL"
                .to_owned(),
            Problem::Tls { sentence, .. } => format!("cannot reach broker: {sentence}"),
            Problem::Unreachable => "cannot reach broker".to_owned(),
        }
    }
}
