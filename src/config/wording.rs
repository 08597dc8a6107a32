//! How a configuration error is worded: the key the loader's message is about, the line of
//! the file that set it, and what to write instead.

/// The 1-based line where `key` (`section.sub.key`) is set in a TOML text: under its
/// `[section.sub]` header, or as a dotted key under a shorter one.
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let mut table = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("[[") {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let header = header.split(']').next().unwrap_or("");
            table = header
                .split('.')
                .map(|p| p.trim().trim_matches('"'))
                .collect::<Vec<_>>()
                .join(".");
            continue;
        }
        let Some((lhs, _)) = line.split_once('=') else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let lhs: Vec<&str> = lhs.split('.').map(|p| p.trim().trim_matches('"')).collect();
        let full = if table.is_empty() {
            lhs.join(".")
        } else {
            format!("{table}.{}", lhs.join("."))
        };
        if full == key {
            return Some(i + 1);
        }
    }
    None
}

/// The field of an "unknown field `x`" message.
pub(super) fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// What to write instead, for the mistakes the deserializer's words leave unclear.
pub(super) fn hint(message: &str, key: Option<&str>) -> String {
    let allowed = match key {
        Some("storage.synchronous") => Some("\"full\" or \"normal\""),
        Some("log.format") => Some("\"auto\", \"text\" or \"journald\""),
        Some(k) if k.ends_with("_format") => Some("\"auto\", \"json\" or \"cbor\""),
        _ => None,
    };
    if message.contains("variant")
        && let Some(allowed) = allowed
    {
        return format!("; allowed: {allowed}");
    }
    if message.contains("socket address") {
        return "; write it as \"host:port\", e.g. \"0.0.0.0:5683\"".into();
    }
    if message.contains("expected a duration") {
        return "; write durations as strings with a unit, e.g. \"30s\", \"500ms\", \"5m\"".into();
    }
    String::new()
}

/// The key a value refused while deserializing sits at (a topic template that does not parse,
/// a number out of range), when the loader knows it.
pub(super) fn failed_key(e: &config::ConfigError) -> Option<String> {
    match e {
        config::ConfigError::At { key, .. } | config::ConfigError::Type { key, .. } => key.clone(),
        _ => None,
    }
}
