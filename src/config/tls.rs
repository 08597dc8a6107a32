//! `[mqtt.tls]`: MQTT over TLS to a site broker on another host.
//!
//! The certificate files are read and parsed when the configuration loads, so `check-config`
//! and `run` refuse a missing, unreadable, empty or non-PEM file (naming the key, the file and
//! the problem) and what runs later holds a ready [`TlsClient`]. The private key is a secret:
//! only its path is ever shown, and no parse error quotes its content.
//!
//! The server's certificate is always verified against the CA in `ca_file` and the name in
//! `server_name` (default: `mqtt.host`): there is deliberately no switch to turn verification
//! off. rumqttc verifies the name it connects to; a verifier of ours checks the configured name
//! instead ([`NameVerifier`]), so that a broker reached by IP address can present a certificate
//! that names it by DNS name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    /// TLS to the broker. Off by default: a broker on the same box is reached over plain TCP.
    pub enabled: bool,
    /// PEM file of the CA certificate(s) that signed the broker's certificate. Required when
    /// enabled; the system's roots are not used (a site broker has its own CA).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain for client authentication (with `key_file`; both or neither).
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`. A secret: only its path is shown.
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry; `mqtt.host` when unset.
    pub server_name: Option<String>,
    /// Built from the files at load time when enabled.
    #[serde(skip)]
    pub client: Option<TlsClient>,
}

/// A ready rustls client configuration and what error messages need to know about it.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    ca_file: PathBuf,
    server_name: String,
    client_cert: bool,
}

impl std::fmt::Debug for TlsClient {
    // ClientConfig's own Debug reaches the client key's signer: show only what is public.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// The rustls configuration, for rumqttc's `TlsConfiguration::Rustls`.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The name the broker's certificate is checked against.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Whether a client certificate is configured.
    pub fn has_client_cert(&self) -> bool {
        self.client_cert
    }
}

impl MqttTlsConfig {
    /// Reads the files and builds the client configuration (when enabled).
    pub(super) fn load(&mut self, origin: &str, host: &str) -> Result<(), ConfigError> {
        self.client = None;
        if !self.enabled {
            return Ok(());
        }
        let Some(ca_file) = self.ca_file.clone() else {
            return Err(ConfigError {
                origin: origin.to_owned(),
                message: "key `mqtt.tls.ca_file` is required when mqtt.tls.enabled = true: \
                          the PEM file of the CA that signed the broker's certificate"
                    .into(),
                key: Some("mqtt.tls.ca_file".into()),
            });
        };
        // rumqttc turns the host it connects to into a TLS name before it connects.
        if ServerName::try_from(host).is_err() {
            return Err(ConfigError::at(
                origin,
                "mqtt.host",
                format!("{host:?}"),
                "with mqtt.tls the host must be a DNS name or an IP address",
            ));
        }
        let name_text = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let name = ServerName::try_from(name_text.clone()).map_err(|_| {
            ConfigError::at(
                origin,
                "mqtt.tls.server_name",
                format!("{name_text:?}"),
                "not a DNS name or IP address",
            )
        })?;

        // What is missing first, then what is in the files.
        let client_files = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert, key)),
            (Some(cert), None) => {
                return Err(ConfigError::at(
                    origin,
                    "mqtt.tls.key_file",
                    "(unset)",
                    &format!(
                        "required with mqtt.tls.cert_file = {}: set both or neither",
                        cert.display()
                    ),
                ));
            }
            (None, Some(key)) => {
                return Err(ConfigError::at(
                    origin,
                    "mqtt.tls.cert_file",
                    "(unset)",
                    &format!(
                        "required with mqtt.tls.key_file = {}: set both or neither",
                        key.display()
                    ),
                ));
            }
        };
        let roots = read_roots(origin, &ca_file)?;
        let client_auth = match client_files {
            Some((cert, key)) => Some((read_chain(origin, cert)?, read_key(origin, key)?)),
            None => None,
        };
        let config = client_config(roots, name, client_auth).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => ConfigError::at(
                origin,
                "mqtt.tls.key_file",
                self.key_file.as_deref().unwrap_or(Path::new("")).display(),
                &format!(
                    "this key does not belong to the certificate in mqtt.tls.cert_file = {}",
                    self.cert_file.as_deref().unwrap_or(Path::new("")).display()
                ),
            ),
            other => ConfigError::at(
                origin,
                "mqtt.tls",
                "{...}",
                &format!("cannot set up TLS: {other}"),
            ),
        })?;
        self.client = Some(TlsClient {
            config,
            ca_file,
            server_name: name_text,
            client_cert: self.cert_file.is_some(),
        });
        Ok(())
    }
}

/// The rustls configuration: ring (the provider the rest of the gateway uses, named here so
/// this does not depend on the process default being installed first), safe protocol
/// versions, our roots, the configured name, and the client certificate if any.
fn client_config(
    roots: RootCertStore,
    name: ServerName<'static>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous() // Not less safe: the same WebPKI checks, against the configured name.
        .with_custom_certificate_verifier(Arc::new(NameVerifier { webpki, name }));
    let config = match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// rustls' WebPKI verifier, checking the configured name rather than the one connected to.
#[derive(Debug)]
struct NameVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn read_file(origin: &str, key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::at(origin, key, path.display(), &format!("cannot read: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::at(
            origin,
            key,
            path.display(),
            "the file is empty",
        ));
    }
    Ok(bytes)
}

/// The certificates of a PEM file: at least one, every one well formed.
fn read_certs(
    origin: &str,
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = read_file(origin, key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::at(origin, key, path.display(), &format!("not valid PEM: {e}"))
        })?;
    if certs.is_empty() {
        return Err(ConfigError::at(
            origin,
            key,
            path.display(),
            "no certificate in it: expected PEM (\"-----BEGIN CERTIFICATE-----\")",
        ));
    }
    Ok(certs)
}

fn read_roots(origin: &str, path: &Path) -> Result<RootCertStore, ConfigError> {
    let key = "mqtt.tls.ca_file";
    let mut roots = RootCertStore::empty();
    for cert in read_certs(origin, key, path)? {
        roots.add(cert).map_err(|e| {
            ConfigError::at(
                origin,
                key,
                path.display(),
                &format!("not a usable CA certificate: {e}"),
            )
        })?;
    }
    Ok(roots)
}

fn read_chain(origin: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    read_certs(origin, "mqtt.tls.cert_file", path)
}

fn read_key(origin: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let key = "mqtt.tls.key_file";
    let bytes = read_file(origin, key, path)?;
    // The parse error is not shown: it can quote a line of the key.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        ConfigError::at(
            origin,
            key,
            path.display(),
            "no private key in it: expected PEM (\"-----BEGIN PRIVATE KEY-----\", \
             \"-----BEGIN RSA PRIVATE KEY-----\" or \"-----BEGIN EC PRIVATE KEY-----\")",
        )
    })
}
