//! The `[sync]` section: reconciliation with the clouds (see `crate::reconcile` for the rule,
//! `crate::cloud::sync` for the runs).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::reconcile::{FieldRule, Policy, Strategy};

/// A conflict strategy as the file spells it (`local_wins`, `remote_wins`, `newest_wins`,
/// `manual`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct StrategySetting(pub Strategy);

impl TryFrom<String> for StrategySetting {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        Strategy::parse(&raw).map(StrategySetting)
    }
}

impl From<StrategySetting> for String {
    fn from(s: StrategySetting) -> String {
        s.0.as_str().to_owned()
    }
}

/// A field policy as the file spells it: a strategy, or `merge` (sets such as tags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct RuleSetting(pub FieldRule);

impl TryFrom<String> for RuleSetting {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        FieldRule::parse(&raw).map(RuleSetting)
    }
}

impl From<RuleSetting> for String {
    fn from(s: RuleSetting) -> String {
        s.0.as_str().to_owned()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Reconcile with the enabled clouds (nothing runs while no cloud is enabled).
    pub enabled: bool,
    /// Time between two runs; each wait is shortened by up to a fifth at random, so a fleet of
    /// gateways started together does not pull in lockstep.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// What settles a field changed on both sides to different values, unless a field policy
    /// says otherwise.
    pub conflict_strategy: StrategySetting,
    /// Sync log rows older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
    /// Field policies, opt-in: JSON Pointer of a field (or of a part of the desired document)
    /// → strategy or `merge`. The longest pointer that covers a field governs it.
    pub fields: BTreeMap<String, RuleSetting>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            enabled: true,
            interval: Duration::from_secs(60),
            conflict_strategy: StrategySetting(Strategy::Manual),
            log_retention: Duration::from_secs(30 * 24 * 3600),
            fields: BTreeMap::new(),
        }
    }
}

/// The fields a policy may name: the metadata, and anything in the desired document.
const METADATA_FIELDS: &[&str] = &["/name", "/tags", "/enabled"];

impl SyncConfig {
    pub fn policy(&self) -> Policy {
        Policy {
            strategy: self.conflict_strategy.0,
            fields: self
                .fields
                .iter()
                .map(|(field, rule)| (field.clone(), rule.0))
                .collect(),
        }
    }

    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if self.interval < Duration::from_secs(1) {
            return Err(ConfigError::at(
                origin,
                "sync.interval",
                humantime::format_duration(self.interval),
                "must be at least 1s, e.g. \"60s\"",
            ));
        }
        if self.log_retention < Duration::from_secs(3600) {
            return Err(ConfigError::at(
                origin,
                "sync.log_retention",
                humantime::format_duration(self.log_retention),
                "must be at least 1h, e.g. \"30d\"",
            ));
        }
        for field in self.fields.keys() {
            let ok = METADATA_FIELDS.contains(&field.as_str())
                || field == "/desired"
                || (field.starts_with("/desired/") && !field.ends_with('/'));
            if !ok {
                return Err(ConfigError::at(
                    origin,
                    &format!("sync.fields.\"{field}\""),
                    format!("{field:?}"),
                    "not a field: use /name, /tags, /enabled, /desired or a JSON Pointer into it such as \"/desired/firmware_version\"",
                ));
            }
        }
        Ok(())
    }
}
