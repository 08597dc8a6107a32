//! Documents as the mirror stores them: JSON text in a column, read back as a value.
//!
//! Shared by every aggregate's SQL ([`super::db`], the write path, [`super::outbox`]); it has
//! no dependencies of its own, so none of them has to import another for it.

use serde_json::Value;

/// A stored document as JSON. Text that is not JSON (never written by this build) comes back
/// as a JSON string holding it, so a damaged row is shown rather than failing the whole read.
pub(super) fn parse_doc(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::String(text.to_owned()))
}
