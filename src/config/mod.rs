//! Configuration: one typed struct, loaded from TOML and `NNGW_` environment variables.
//!
//! Precedence, lowest first: the defaults on the structs below (`Default` impls sit next to
//! each struct), then the file (`-c FILE`, or the embedded `config/gateway.toml` when no file
//! is given), then the environment (`NNGW_MQTT__PORT=18830` sets `mqtt.port`; `__` separates
//! levels). Unknown keys are errors, durations are humantime strings (`"30s"`, `"5m"`), and
//! every error names the file, the key and what is wrong with the value.
//!
//! Secrets (the MQTT password, the cloud API keys) never live in this file: they are read from
//! a file named by `*_file` keys or from systemd credentials (`$CREDENTIALS_DIRECTORY/<name>`),
//! held in [`Secret`], and printed as `<redacted>` everywhere. The MQTT TLS client key is read
//! from `mqtt.tls.key_file` the same way, at load time, and only its path is ever shown
//! (see [`MqttTlsConfig`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::FormatChoice;

mod api;
mod cloud;
mod secret;
mod sync;
mod tls;
pub mod topics;
mod wording;

use wording::{failed_key, hint, line_of, unknown_field};

pub use api::ApiConfig;
pub use cloud::{GoliothConfig, HttpSettings, IdTemplate, NetNeuralConfig};

pub use secret::Secret;
use secret::read_secret;
pub use sync::{RuleSetting, StrategySetting, SyncConfig};
pub use tls::{MqttTlsConfig, TlsClient};

/// The annotated default configuration, embedded so `nn-gateway run` works with no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/gateway.toml");

/// Name used for the embedded file in error messages.
pub const EMBEDDED_NAME: &str = "<embedded config/gateway.toml>";

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "NNGW";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub storage: StorageConfig,
    pub mqtt: MqttConfig,
    pub coap: CoapConfig,
    pub golioth: GoliothConfig,
    pub netneural: NetNeuralConfig,
    pub sync: SyncConfig,
    pub api: ApiConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// How long shutdown may take to finish acknowledging what is already stored before it
    /// abandons the rest (which the broker or device then sends again).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How often the daemon polls the store for desired-state changes (from `desired set`,
    /// conflict resolutions and sync runs).
    #[serde(with = "humantime_serde")]
    pub downlink_poll: Duration,
    /// Names this site in the clouds, which a whole fleet shares: `{site}` in `cloud_id`.
    pub site_id: String,
    /// The hardware id and name a device gets in both clouds, from `{site}` (`site_id`) and
    /// `{device}` (the local key). Two sites with a `sensor-1` each need `"{site}-{device}"`.
    pub cloud_id: IdTemplate,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            shutdown_timeout: Duration::from_secs(10),
            downlink_poll: Duration::from_secs(1),
            site_id: String::new(),
            cloud_id: IdTemplate::default(),
        }
    }
}

/// `PRAGMA synchronous` for the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged message survives a power cut. Commits are grouped,
    /// so this costs one fsync per batch, not per message.
    Full,
    /// Survives a process crash, but the last commits may be lost in a power cut.
    Normal,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The SQLite database file; its directory is created if missing.
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// How many rejected messages are kept for inspection (oldest dropped first).
    pub rejected_keep: u32,
    /// Ceiling on the space the database uses, in MiB; past it the oldest telemetry goes
    /// (delivered first). See `store::retention`.
    pub max_size_mib: u64,
    /// Delivered telemetry older than this is deleted; "0s" keeps it until the size ceiling.
    #[serde(with = "humantime_serde")]
    pub telemetry_max_age: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("data/gateway.db"),
            synchronous: Synchronous::Full,
            rejected_keep: 1000,
            max_size_mib: 1024,
            telemetry_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Must be stable across restarts: the broker keeps our persistent session (and the
    /// messages queued while we were away) under this id.
    pub client_id: String,
    pub username: Option<String>,
    /// File holding the broker password (first line); or credential `mqtt-password`.
    pub password_file: Option<PathBuf>,
    /// Read from `password_file` or the credential at load time.
    /// Never written out either: `check-config` prints a configuration that loads again.
    #[serde(skip)]
    pub password: Option<Secret>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with full jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Larger messages are acknowledged, refused and recorded as rejected. At most
    /// [`MAX_WIRE_PACKET`].
    pub max_message_size: usize,
    /// `[mqtt.tls]`: TLS to a broker on another host (off: plain TCP).
    pub tls: MqttTlsConfig,
    pub topics: TopicsConfig,
}

/// Largest packet the MQTT client will read. A larger one would make rumqttc drop the
/// connection and the broker resend it forever, so this is far above `mqtt.max_message_size`:
/// such messages are read, acknowledged and rejected by the router instead. Set the broker's
/// `max_packet_size` below it.
pub const MAX_WIRE_PACKET: usize = 16 * 1024 * 1024;

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "nn-gateway".into(),
            username: None,
            password_file: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(60),
            max_message_size: 256 * 1024,
            tls: MqttTlsConfig::default(),
            topics: TopicsConfig::default(),
        }
    }
}

/// Topic templates; `{device}` stands for one topic level holding the device key. Parsed as
/// they are read, so a bad one is refused at load time, naming its key and value.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub state: topics::Template,
    pub telemetry: topics::Template,
    pub desired: topics::Template,
    pub state_format: FormatChoice,
    pub telemetry_format: FormatChoice,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            state: topics::Template::under_devices("state"),
            telemetry: topics::Template::under_devices("telemetry"),
            desired: topics::Template::under_devices("desired"),
            state_format: FormatChoice::Auto,
            telemetry_format: FormatChoice::Auto,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    /// Requests handled at once; beyond this the server answers 5.03 with Max-Age.
    pub max_concurrent: usize,
    /// Larger payloads get 4.13 Request Entity Too Large.
    pub max_message_size: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            enabled: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 5683)),
            max_concurrent: 64,
            max_message_size: 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// The journal when stderr is connected to it (under systemd), text otherwise.
    Auto,
    Text,
    Journald,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `nn_gateway=debug`, … (`RUST_LOG` wins when set).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// A configuration problem: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    /// The file (or environment variable) the problem came from.
    pub origin: String,
    pub message: String,
    /// The key at fault, when one is.
    pub key: Option<String>,
}

impl ConfigError {
    fn at(origin: &str, key: &str, value: impl fmt::Display, problem: &str) -> ConfigError {
        ConfigError {
            origin: origin.to_owned(),
            message: format!("key `{key}` = {value}: {problem}"),
            key: Some(key.to_owned()),
        }
    }
}

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::Embedded => EMBEDDED_NAME.to_owned(),
            Source::File(p) => p.display().to_string(),
        }
    }
}

impl Config {
    /// Loads, overlays the process environment, validates and reads secrets.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, key and value at fault.
    pub fn load(source: &Source) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Config::load_with(source, &env, creds.as_deref())
    }

    /// [`Config::load`] with the environment passed in, so precedence is testable without
    /// touching the process environment.
    pub fn load_with(
        source: &Source,
        env: &[(String, String)],
        credentials_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let origin = source.name();
        let text = match source {
            Source::Embedded => EMBEDDED_DEFAULT.to_owned(),
            Source::File(path) => std::fs::read_to_string(path).map_err(|e| ConfigError {
                origin: origin.clone(),
                message: format!("cannot read the file: {e}"),
                key: None,
            })?,
        };
        Config::load_str(&text, &origin, env, credentials_dir)
    }

    /// [`Config::load_with`] of a text already read: `origin` names it in errors. The one
    /// code path after reading the file, so a fuzzer can drive the loader without writing files.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `origin`, the key and the value at fault.
    pub fn load_str(
        text: &str,
        origin: &str,
        env: &[(String, String)],
        credentials_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let origin = origin.to_owned();
        let file = config::File::from_str(text, config::FileFormat::Toml);
        let env_map: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
            .cloned()
            .collect();
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(Some(env_map));
        // A value that came from the environment is the environment's fault, not the file's.
        let blame = |mut e: ConfigError| {
            if let Some(key) = &e.key {
                let var = format!("{ENV_PREFIX}_{}", key.replace('.', "__").to_uppercase());
                if env.iter().any(|(k, _)| *k == var) {
                    e.origin = format!("environment variable {var} (over {origin})");
                }
            }
            e
        };
        // A mistake in the file is pointed at by its line, as a compiler would.
        let blame = |e: ConfigError| {
            let mut e = blame(e);
            if e.origin == origin
                && let Some(line) = e.key.as_deref().and_then(|k| line_of(text, k))
            {
                e.origin = format!("{origin}:{line}");
            }
            e
        };
        let mut cfg: Config = config::Config::builder()
            .add_source(file)
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                let key = failed_key(&e);
                let message = e.to_string();
                // An unknown key is reported against its table; name the whole key, so that
                // one set from the environment is blamed on its variable.
                let key = match (unknown_field(&message), &key) {
                    (Some(field), Some(table)) => Some(format!("{table}.{field}")),
                    (Some(field), None) => Some(field.to_owned()),
                    _ => key,
                };
                let hint = hint(&message, key.as_deref());
                blame(ConfigError {
                    origin: origin.clone(),
                    message: format!("{message}{hint}"),
                    key,
                })
            })?;
        cfg.validate(&origin).map_err(blame)?;
        if cfg.mqtt.enabled {
            cfg.mqtt.tls.load(&origin, &cfg.mqtt.host).map_err(blame)?;
        }
        // Under systemd (`StateDirectory=`), a relative database path lives in the state
        // directory, the one place the unit lets the daemon write: the shipped config works
        // unedited. Elsewhere it stays relative to the working directory.
        if cfg.storage.path.is_relative()
            && let Some((_, dirs)) = env.iter().find(|(k, _)| k == "STATE_DIRECTORY")
            && let Some(first) = dirs.split(':').next().filter(|d| !d.is_empty())
        {
            cfg.storage.path = Path::new(first).join(&cfg.storage.path);
        }
        cfg.read_secrets(&origin, credentials_dir).map_err(blame)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let t = &self.mqtt.topics;
        if t.state == t.telemetry {
            return Err(ConfigError::at(
                origin,
                "mqtt.topics.telemetry",
                format!("{:?}", t.telemetry.to_string()),
                "must differ from mqtt.topics.state",
            ));
        }
        if self.mqtt.enabled && self.mqtt.host.trim().is_empty() {
            return Err(ConfigError::at(
                origin,
                "mqtt.host",
                "\"\"",
                "must name the broker",
            ));
        }
        if self.mqtt.enabled && self.mqtt.port == 0 {
            return Err(ConfigError::at(origin, "mqtt.port", 0, "must be 1-65535"));
        }
        if self.mqtt.client_id.is_empty() || self.mqtt.client_id.len() > 64 {
            return Err(ConfigError::at(
                origin,
                "mqtt.client_id",
                format!("{:?}", self.mqtt.client_id),
                "must be 1-64 bytes",
            ));
        }
        if self.mqtt.reconnect_min.is_zero() || self.mqtt.reconnect_min > self.mqtt.reconnect_max {
            return Err(ConfigError::at(
                origin,
                "mqtt.reconnect_min",
                humantime::format_duration(self.mqtt.reconnect_min),
                "must be above zero and at most mqtt.reconnect_max",
            ));
        }
        let keep_alive = self.mqtt.keep_alive;
        if keep_alive < Duration::from_secs(1)
            || keep_alive > Duration::from_secs(u64::from(u16::MAX))
        {
            return Err(ConfigError::at(
                origin,
                "mqtt.keep_alive",
                humantime::format_duration(keep_alive),
                "must be between 1s and 65535s (MQTT counts it in whole seconds; 0 would never notice a dead connection)",
            ));
        }
        if self.mqtt.max_message_size > MAX_WIRE_PACKET {
            return Err(ConfigError::at(
                origin,
                "mqtt.max_message_size",
                self.mqtt.max_message_size,
                &format!("must be at most {MAX_WIRE_PACKET} bytes"),
            ));
        }
        if self.storage.max_size_mib < 16 {
            return Err(ConfigError::at(
                origin,
                "storage.max_size_mib",
                self.storage.max_size_mib,
                "must be at least 16 (MiB)",
            ));
        }
        if self.coap.max_concurrent == 0 {
            return Err(ConfigError::at(
                origin,
                "coap.max_concurrent",
                0,
                "must be at least 1",
            ));
        }
        // The same check `run` makes when it sets up logging, so `check-config` agrees with it.
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::at(
                origin,
                "log.level",
                format!("{:?}", self.log.level),
                &format!(
                    "not a log filter ({e}); e.g. \"info\", \"debug\" or \"nn_gateway=debug,rumqttc=warn\""
                ),
            ));
        }
        if self.gateway.downlink_poll.is_zero() {
            return Err(ConfigError::at(
                origin,
                "gateway.downlink_poll",
                "0s",
                "must be above zero",
            ));
        }
        if self.gateway.cloud_id.uses_site() && self.gateway.site_id.is_empty() {
            return Err(ConfigError::at(
                origin,
                "gateway.site_id",
                "\"\"",
                "required: gateway.cloud_id uses {site}",
            ));
        }
        self.golioth.validate(origin)?;
        self.netneural.validate(origin)?;
        self.sync.validate(origin)?;
        self.api.validate(origin)?;
        Ok(())
    }

    fn read_secrets(&mut self, origin: &str, creds: Option<&Path>) -> Result<(), ConfigError> {
        let read = |key: &str, file: Option<&Path>, credential: &str| {
            read_secret(origin, key, file, creds, credential).map(Some)
        };
        let mqtt_credential = creds.is_some_and(|d| d.join("mqtt-password").is_file());
        if self.mqtt.password_file.is_some() || mqtt_credential {
            self.mqtt.password = read(
                "mqtt.password_file",
                self.mqtt.password_file.as_deref(),
                "mqtt-password",
            )?;
        }
        if self.golioth.enabled {
            self.golioth.api_key = read(
                "golioth.api_key_file",
                self.golioth.api_key_file.as_deref(),
                "golioth-api-key",
            )?;
        }
        if self.netneural.enabled {
            self.netneural.api_key = read(
                "netneural.api_key_file",
                self.netneural.api_key_file.as_deref(),
                "netneural-api-key",
            )?;
        }
        self.api.read_secrets(origin, creds)?;
        Ok(())
    }

    /// The sections (other than `log`, which reloads live) that differ in `new`: they take
    /// effect only after a restart.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let render = |v: &dyn erased::Section| v.render();
        let pairs: [(&'static str, String, String); 8] = [
            ("gateway", render(&self.gateway), render(&new.gateway)),
            ("storage", render(&self.storage), render(&new.storage)),
            ("mqtt", render(&self.mqtt), render(&new.mqtt)),
            ("coap", render(&self.coap), render(&new.coap)),
            ("golioth", render(&self.golioth), render(&new.golioth)),
            ("netneural", render(&self.netneural), render(&new.netneural)),
            ("sync", render(&self.sync), render(&new.sync)),
            ("api", render(&self.api), render(&new.api)),
        ];
        pairs
            .into_iter()
            .filter(|(_, a, b)| a != b)
            .map(|(k, _, _)| k)
            .collect()
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

mod erased {
    /// Any config section, rendered for comparison.
    pub trait Section {
        fn render(&self) -> String;
    }
    impl<T: serde::Serialize> Section for T {
        fn render(&self) -> String {
            toml::to_string(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests;
