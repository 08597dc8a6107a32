//! Secrets: a value type that never shows itself, and reading one from a file or a systemd
//! credential.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::ConfigError;

/// A credential. Its `Debug` and `Serialize` never show the value, and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Reads a secret from an explicit file, else from the systemd credential `credential`.
pub(super) fn read_secret(
    origin: &str,
    key: &str,
    file: Option<&Path>,
    creds: Option<&Path>,
    credential: &str,
) -> Result<Secret, ConfigError> {
    let path = match (file, creds) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(dir)) if dir.join(credential).is_file() => dir.join(credential),
        _ => {
            return Err(ConfigError {
                origin: origin.to_owned(),
                message: format!(
                    "no secret for `{key}`: set {key} to a file holding it, or pass systemd \
                     credential `{credential}` (LoadCredential=)"
                ),
                key: Some(key.to_owned()),
            });
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::at(
            origin,
            key,
            path.display(),
            &format!("cannot read the secret: {e}"),
        )
    })?;
    let value = text.lines().next().unwrap_or("").trim();
    if value.is_empty() {
        return Err(ConfigError::at(
            origin,
            key,
            path.display(),
            "the secret file is empty",
        ));
    }
    Ok(Secret::new(value))
}
