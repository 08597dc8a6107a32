//! The `[api]` section: the local HTTP API, console, `/metrics` and the Golioth webhook (see
//! `crate::api`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secret::read_secret;
use super::{ConfigError, Secret};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    /// Where the API and console listen. A non-loopback address needs a configured token
    /// (`token_file` or the credential `api-token`): a generated one would guard a port the
    /// whole site network reaches with a secret nobody was given.
    pub bind: SocketAddr,
    /// File holding the bearer token (first line); or the systemd credential `api-token`.
    /// Without either, the daemon makes one at first start: `api-token` beside the database
    /// (mode 0600), its path logged, never the token.
    pub token_file: Option<PathBuf>,
    #[serde(skip)]
    pub token: Option<Secret>,
    /// File holding the secret the Golioth webhook sends in `webhook_header`; or the credential
    /// `api-webhook-secret`. Without it the webhook route answers 404.
    pub webhook_secret_file: Option<PathBuf>,
    #[serde(skip)]
    pub webhook_secret: Option<Secret>,
    /// The header that carries the webhook secret (set the same one on Golioth's side).
    pub webhook_header: String,
    /// Optional HMAC-SHA256 key (a relay that signs): the body's MAC is then required in
    /// `X-Signature-256: sha256=<hex>`; or the credential `api-webhook-hmac-key`.
    pub webhook_hmac_key_file: Option<PathBuf>,
    #[serde(skip)]
    pub webhook_hmac_key: Option<Secret>,
    /// A device's webhooks closer together than this make one pull, not many.
    #[serde(with = "humantime_serde")]
    pub webhook_min_interval: Duration,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token_file: None,
            token: None,
            webhook_secret_file: None,
            webhook_secret: None,
            webhook_header: "x-nngw-webhook-secret".into(),
            webhook_hmac_key_file: None,
            webhook_hmac_key: None,
            webhook_min_interval: Duration::from_secs(2),
            max_body_bytes: 64 * 1024,
        }
    }
}

impl ApiConfig {
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::at(
                origin,
                "api.max_body_bytes",
                self.max_body_bytes,
                "must be at least 1024",
            ));
        }
        let header = self.webhook_header.as_str();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::at(
                origin,
                "api.webhook_header",
                format!("{header:?}"),
                "must be an HTTP header name (letters, digits, '-')",
            ));
        }
        Ok(())
    }

    /// Reads the token and the webhook secrets, then refuses a non-loopback bind without a
    /// token.
    pub(super) fn read_secrets(
        &mut self,
        origin: &str,
        creds: Option<&Path>,
    ) -> Result<(), ConfigError> {
        // A credential holding nothing but whitespace is absent: the unit gives each a blank
        // default (`SetCredential=`) so that a missing file does not fail the start.
        let has = |name: &str| {
            creds.is_some_and(|d| {
                std::fs::read_to_string(d.join(name)).is_ok_and(|t| !t.trim().is_empty())
            })
        };
        let read = |key: &str, file: Option<&Path>, credential: &str| {
            if file.is_some() || has(credential) {
                read_secret(origin, key, file, creds, credential).map(Some)
            } else {
                Ok(None)
            }
        };
        if !self.enabled {
            return Ok(());
        }
        self.token = read("api.token_file", self.token_file.as_deref(), "api-token")?;
        self.webhook_secret = read(
            "api.webhook_secret_file",
            self.webhook_secret_file.as_deref(),
            "api-webhook-secret",
        )?;
        self.webhook_hmac_key = read(
            "api.webhook_hmac_key_file",
            self.webhook_hmac_key_file.as_deref(),
            "api-webhook-hmac-key",
        )?;
        if !self.bind.ip().is_loopback() && self.token.is_none() {
            return Err(ConfigError::at(
                origin,
                "api.bind",
                format!("\"{}\"", self.bind),
                "is reachable from the network: set api.token_file (or the credential \
                 `api-token`) to a token you chose, or bind 127.0.0.1 and use an SSH tunnel",
            ));
        }
        Ok(())
    }
}
