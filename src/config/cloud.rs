//! The `[golioth]` and `[netneural]` sections and the device identity template.
//!
//! URLs are parsed here (`https://` required, except `http://` to a loopback address for
//! tests and local proxies), so the clients never see an unusable one.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, Secret};

/// Timeouts of one cloud's HTTP client (read by `cloud::http_client`; defined here so the
/// configuration imports nothing of the clients).
#[derive(Clone, Copy, Debug)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// The hardware id (and name) a device gets in the clouds: a template over `{site}` and
/// `{device}`, which must contain `{device}` so that two devices never share one.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdTemplate(String);

impl IdTemplate {
    /// Longest id a template may produce for the longest device key, well within both clouds'
    /// limits on names.
    const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<IdTemplate, String> {
        if !raw.contains("{device}") {
            return Err("must contain {device}, or two devices would share one cloud id".into());
        }
        let rest = raw.replace("{device}", "").replace("{site}", "");
        if rest.contains(['{', '}']) {
            return Err("only {site} and {device} may appear in braces".into());
        }
        if let Some(bad) = rest
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(format!(
                "contains {bad:?}; allowed around the placeholders are letters, digits and - _ . :"
            ));
        }
        if rest.len() + crate::model::MAX_DEVICE_KEY_LEN > Self::MAX_LEN {
            return Err(format!(
                "too long (at most {} bytes with a full device key)",
                Self::MAX_LEN
            ));
        }
        Ok(IdTemplate(raw.to_owned()))
    }

    pub fn uses_site(&self) -> bool {
        self.0.contains("{site}")
    }

    /// The cloud id of `device` at `site`.
    pub fn render(&self, site: &str, device: &str) -> String {
        self.0.replace("{site}", site).replace("{device}", device)
    }
}

impl Default for IdTemplate {
    fn default() -> Self {
        IdTemplate("{device}".into())
    }
}

impl TryFrom<String> for IdTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        IdTemplate::parse(&s)
    }
}

impl From<IdTemplate> for String {
    fn from(t: IdTemplate) -> String {
        t.0
    }
}

impl fmt::Display for IdTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `https://`, or `http://` to a loopback address.
fn check_url(origin: &str, key: &str, url: &Url) -> Result<(), ConfigError> {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    let ok = match url.scheme() {
        "https" => url.host().is_some(),
        "http" => loopback,
        _ => false,
    };
    if !ok {
        return Err(ConfigError::at(
            origin,
            key,
            format!("{:?}", url.as_str()),
            "must be an https:// URL (http:// only to a loopback address)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::at(
            origin,
            key,
            format!("{:?}", url.as_str()),
            "must be a base URL without ?query or #fragment",
        ));
    }
    Ok(())
}

/// Checks the request limits shared by both clouds.
#[allow(clippy::too_many_arguments)]
fn check_limits(
    origin: &str,
    section: &str,
    connect_timeout: Duration,
    request_timeout: Duration,
    concurrency: usize,
    retry_min: Duration,
    retry_max: Duration,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let human = |d: Duration| humantime::format_duration(d).to_string();
    if connect_timeout.is_zero() {
        return Err(ConfigError::at(
            origin,
            &key("connect_timeout"),
            "0s",
            "must be above zero, e.g. \"5s\"",
        ));
    }
    if request_timeout < connect_timeout {
        return Err(ConfigError::at(
            origin,
            &key("request_timeout"),
            human(request_timeout),
            &format!("must be at least {section}.connect_timeout, e.g. \"30s\""),
        ));
    }
    if !(1..=64).contains(&concurrency) {
        return Err(ConfigError::at(
            origin,
            &key("concurrency"),
            concurrency,
            "must be 1-64",
        ));
    }
    if retry_min.is_zero() || retry_min > retry_max {
        return Err(ConfigError::at(
            origin,
            &key("retry_min"),
            human(retry_min),
            &format!("must be above zero and at most {section}.retry_max"),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoliothConfig {
    pub enabled: bool,
    pub api_url: Url,
    pub project_id: String,
    /// File holding the API key; or credential `golioth-api-key`.
    pub api_key_file: Option<PathBuf>,
    /// LightDB State path of the device's reported state.
    pub reported_path: String,
    /// LightDB State path of the desired state the device observes.
    pub desired_path: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Whole request, connect to last byte; a slower answer counts as no answer (retried).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight at once (different devices; one device's rows go in order).
    pub concurrency: usize,
    /// Per-row retry backoff: doubles from `retry_min` to `retry_max`, with full jitter.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Read from `api_key_file` or the credential at load time; never written out.
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

impl Default for GoliothConfig {
    fn default() -> Self {
        GoliothConfig {
            enabled: false,
            api_url: Url::parse("https://api.golioth.io").expect("a valid URL"),
            project_id: String::new(),
            api_key_file: None,
            reported_path: "state".into(),
            desired_path: "desired".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            concurrency: 32,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            api_key: None,
        }
    }
}

impl GoliothConfig {
    pub fn http(&self) -> HttpSettings {
        HttpSettings {
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
        }
    }

    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        check_url(origin, "golioth.api_url", &self.api_url)?;
        check_limits(
            origin,
            "golioth",
            self.connect_timeout,
            self.request_timeout,
            self.concurrency,
            self.retry_min,
            self.retry_max,
        )?;
        if self.enabled && self.project_id.is_empty() {
            return Err(ConfigError::at(
                origin,
                "golioth.project_id",
                "\"\"",
                "required when golioth.enabled = true",
            ));
        }
        for (key, path) in [
            ("golioth.reported_path", &self.reported_path),
            ("golioth.desired_path", &self.desired_path),
        ] {
            let bad = path.is_empty()
                || path.starts_with('/')
                || path.ends_with('/')
                || path.split('/').any(|seg| {
                    seg.is_empty()
                        || !seg
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                });
            if bad {
                return Err(ConfigError::at(
                    origin,
                    key,
                    format!("{path:?}"),
                    "must be a LightDB path like \"state\" or \"gw/state\" (letters, digits, - _)",
                ));
            }
        }
        if self.reported_path == self.desired_path {
            return Err(ConfigError::at(
                origin,
                "golioth.desired_path",
                format!("{:?}", self.desired_path),
                "must differ from golioth.reported_path",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetNeuralConfig {
    pub enabled: bool,
    /// The Supabase project URL, `https://<ref>.supabase.co`.
    pub url: Option<Url>,
    pub organization_id: String,
    /// The NetNeural integration row this gateway writes as (`integration_id` in its tables).
    pub integration_id: String,
    /// File holding the service key; or credential `netneural-api-key`.
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Telemetry points per bulk insert.
    pub telemetry_batch: usize,
    /// Read from `api_key_file` or the credential at load time; never written out.
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

impl Default for NetNeuralConfig {
    fn default() -> Self {
        NetNeuralConfig {
            enabled: false,
            url: None,
            organization_id: String::new(),
            integration_id: String::new(),
            api_key_file: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            concurrency: 32,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            telemetry_batch: 500,
            api_key: None,
        }
    }
}

impl NetNeuralConfig {
    /// Most telemetry points in one request: PostgREST takes the array in one statement, and
    /// 5,000 JSON rows stay around a megabyte.
    pub const MAX_TELEMETRY_BATCH: usize = 5000;

    pub fn http(&self) -> HttpSettings {
        HttpSettings {
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
        }
    }

    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        check_limits(
            origin,
            "netneural",
            self.connect_timeout,
            self.request_timeout,
            self.concurrency,
            self.retry_min,
            self.retry_max,
        )?;
        if !(1..=Self::MAX_TELEMETRY_BATCH).contains(&self.telemetry_batch) {
            return Err(ConfigError::at(
                origin,
                "netneural.telemetry_batch",
                self.telemetry_batch,
                &format!("must be 1-{}", Self::MAX_TELEMETRY_BATCH),
            ));
        }
        match &self.url {
            Some(url) => check_url(origin, "netneural.url", url)?,
            None if self.enabled => {
                return Err(ConfigError::at(
                    origin,
                    "netneural.url",
                    "(unset)",
                    "required when netneural.enabled = true: the project URL, https://<ref>.supabase.co",
                ));
            }
            None => {}
        }
        if self.enabled {
            for (key, value) in [
                ("netneural.organization_id", &self.organization_id),
                ("netneural.integration_id", &self.integration_id),
            ] {
                if value.is_empty() {
                    return Err(ConfigError::at(
                        origin,
                        key,
                        "\"\"",
                        "required when netneural.enabled = true (a uuid from the NetNeural console)",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_templates_need_the_device_and_render_site_and_device() {
        let t = IdTemplate::parse("{site}-{device}").unwrap();
        assert!(t.uses_site());
        assert_eq!(t.render("berlin", "sensor-1"), "berlin-sensor-1");
        assert_eq!(IdTemplate::default().render("x", "s"), "s");
        assert!(IdTemplate::parse("{site}").is_err());
        assert!(IdTemplate::parse("{device}/{site}").is_err());
        assert!(IdTemplate::parse("{device}{x}").is_err());
    }

    #[test]
    fn urls_need_https_except_to_loopback() {
        let check = |u: &str| check_url("f", "k", &Url::parse(u).unwrap()).is_ok();
        assert!(check("https://api.golioth.io"));
        assert!(check("http://127.0.0.1:8080"));
        assert!(check("http://[::1]:1/"));
        assert!(check("http://localhost:9"));
        assert!(!check("http://api.golioth.io"));
        assert!(!check("ftp://x"));
        assert!(!check("https://x/?apikey=1"));
    }

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<super::super::Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, toml).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        super::super::Config::load_with(&super::super::Source::File(path), &env, None)
    }

    #[test]
    fn cloud_settings_come_from_file_and_environment_and_bad_ones_are_named() {
        let cfg = load(
            "[golioth]\napi_url = \"http://127.0.0.1:9\"\n",
            &[
                ("NNGW_NETNEURAL__URL", "http://127.0.0.1:8"),
                ("NNGW_NETNEURAL__INTEGRATION_ID", "int-1"),
                ("NNGW_GOLIOTH__API_URL", "http://127.0.0.1:7"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.golioth.api_url.as_str(), "http://127.0.0.1:7/");
        assert_eq!(cfg.netneural.url.unwrap().as_str(), "http://127.0.0.1:8/");
        assert_eq!(cfg.netneural.integration_id, "int-1");

        let e = load("[golioth]\napi_url = \"http://api.golioth.io\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("golioth.api_url"), "{e}");
        assert!(e.to_string().contains("https://"), "{e}");
        let e = load("[netneural]\nconcurrency = 0\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("netneural.concurrency"), "{e}");
        let e = load("[gateway]\ncloud_id = \"{site}-{device}\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("gateway.site_id"), "{e}");
        let e = load("[gateway]\ncloud_id = \"x\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("cloud_id"), "{e}");
        let e = load("[netneural]\nenabled = true\nurl = \"https://x.supabase.co\"\norganization_id = \"o\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("netneural.integration_id"), "{e}");
    }

    #[test]
    fn check_config_output_loads_again_with_every_secret_set_and_shows_none() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "SECRET-VALUE\n").unwrap();
        let key = format!("{:?}", key.display().to_string());
        let cfg = load(
            &format!(
                "[mqtt]\nusername = \"u\"\npassword_file = {key}\n\
                 [golioth]\nenabled = true\nproject_id = \"p\"\napi_key_file = {key}\n\
                 [netneural]\nenabled = true\nurl = \"https://x.supabase.co\"\n\
                 organization_id = \"o\"\nintegration_id = \"i\"\napi_key_file = {key}\n"
            ),
            &[],
        )
        .unwrap();
        assert!(cfg.mqtt.password.is_some() && cfg.golioth.api_key.is_some());
        let shown = cfg.to_toml();
        assert!(!shown.contains("SECRET"), "{shown}");
        let again = load(&shown, &[]).unwrap();
        assert_eq!(
            again.to_toml(),
            shown,
            "check-config output is a config that loads"
        );
    }

    #[test]
    fn a_log_level_run_would_refuse_is_refused_at_load_naming_the_key() {
        let e = load("[log]\nlevel = \"nn_gateway=loud\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("log.level"), "{e}");
        assert!(e.to_string().contains("g.toml"), "{e}");
        assert!(load("[log]\nlevel = \"nn_gateway=debug,rumqttc=warn\"\n", &[]).is_ok());
    }
}
