//! Golioth's wire types ↔ the gateway's: ids as newtypes, timestamps as [`UnixMillis`],
//! error bodies as `(code, message)` for [`crate::cloud::status_error`].

use std::fmt;

use serde_json::Value;

use super::wire;
use crate::cloud::parse_rfc3339;
use crate::model::UnixMillis;

/// A Golioth device id (assigned by Golioth on create; not the hardware id).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub String);

/// A Golioth tag id. Devices reference tags by id; [`super::Golioth::resolve_tags`] turns
/// names into ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagId(pub String);

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TagId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for TagId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device as Golioth holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteDevice {
    pub id: DeviceId,
    /// Unique within the project.
    pub name: String,
    pub hardware_ids: Vec<String>,
    pub tag_ids: Vec<TagId>,
    /// `None` when Golioth left the field out.
    pub enabled: Option<bool>,
    pub created_at: Option<UnixMillis>,
    pub updated_at: Option<UnixMillis>,
    /// Latest device activity (`metadata.lastReport`).
    pub last_report: Option<UnixMillis>,
    /// When the device was last online (`metadata.lastSeenOnline`). Golioth's `status` is
    /// deprecated (always `"-"`): online-ness is derived from these two timestamps.
    pub last_seen_online: Option<UnixMillis>,
    /// The LightDB State document at the list's `state_path`, when the list asked for one
    /// (`None` also when the device has nothing there).
    pub state: Option<Value>,
}

/// A tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    pub id: TagId,
    pub name: String,
}

/// What a device list is narrowed to, and whether each device carries a state document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Full match on one of the device's hardware ids.
    pub hardware_id: Option<String>,
    /// Devices having all of these tags.
    pub tag_ids: Vec<TagId>,
    /// A LightDB State path (e.g. the desired path) to fill [`RemoteDevice::state`] with, so
    /// that every device's desired document comes in the same pages as the registry.
    pub state_path: Option<String>,
}

/// A device to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDevice {
    pub name: String,
    pub hardware_ids: Vec<String>,
    pub tag_ids: Vec<TagId>,
}

/// A change to a device: `None` fields stay as they are; `Some` sets replace the whole set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevicePatch {
    pub name: Option<String>,
    pub hardware_ids: Option<Vec<String>>,
    pub tag_ids: Option<Vec<TagId>>,
    pub enabled: Option<bool>,
}

impl DevicePatch {
    pub fn is_empty(&self) -> bool {
        *self == DevicePatch::default()
    }
}

fn time_of(raw: Option<&String>) -> Option<UnixMillis> {
    raw.and_then(|s| parse_rfc3339(s))
}

impl From<wire::Device> for RemoteDevice {
    fn from(d: wire::Device) -> RemoteDevice {
        let metadata = d.metadata.unwrap_or_default();
        RemoteDevice {
            id: DeviceId(d.id),
            name: d.name,
            hardware_ids: d.hardware_ids,
            tag_ids: d.tag_ids.into_iter().map(TagId).collect(),
            enabled: d.enabled,
            created_at: time_of(d.created_at.as_ref()),
            updated_at: time_of(d.updated_at.as_ref()),
            last_report: time_of(metadata.last_report.as_ref()),
            last_seen_online: time_of(metadata.last_seen_online.as_ref()),
            state: d.data.filter(|v| !v.is_null()),
        }
    }
}

impl From<wire::Tag> for Tag {
    fn from(t: wire::Tag) -> Tag {
        Tag {
            id: TagId(t.id),
            name: t.name,
        }
    }
}

/// Tag ids as Golioth takes them.
pub(crate) fn tag_strings(ids: &[TagId]) -> Vec<String> {
    ids.iter().map(|t| t.0.clone()).collect()
}

/// gRPC's canonical status names, by code, for error messages (`HTTP 409 [ALREADY_EXISTS] …`).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Reads Golioth's error body `{code, message, details}`; `None` if it is something else
/// (a proxy's HTML page), so that the raw excerpt is kept instead.
pub(crate) fn error_body(body: &[u8]) -> Option<(Option<String>, String)> {
    let status: wire::Status = serde_json::from_slice(body).ok()?;
    if status.code.is_none() && status.message.is_none() {
        return None;
    }
    let code = status.code.map(|c| {
        usize::try_from(c)
            .ok()
            .and_then(|i| GRPC_CODES.get(i))
            .map_or_else(|| c.to_string(), |name| (*name).to_owned())
    });
    Some((code, status.message.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wire_device_maps_ids_and_timestamps_and_tolerates_bad_ones() {
        let d: wire::Device = serde_json::from_str(
            r#"{"id": "d1", "name": "n", "hardwareIds": ["h"], "tagIds": ["t"],
                "createdAt": "2024-05-01T10:00:00.123Z", "updatedAt": "not a time",
                "metadata": {"lastSeenOnline": "2024-05-01T10:00:01Z"}, "data": null}"#,
        )
        .unwrap();
        let d = RemoteDevice::from(d);
        assert_eq!(d.id, DeviceId("d1".into()));
        assert_eq!(d.tag_ids, [TagId("t".into())]);
        assert_eq!(d.created_at, Some(UnixMillis(1_714_557_600_123)));
        assert_eq!(d.updated_at, None);
        assert_eq!(d.last_seen_online, Some(UnixMillis(1_714_557_601_000)));
        assert_eq!((d.last_report, d.state), (None, None));
    }

    #[test]
    fn error_bodies_become_grpc_names_and_messages() {
        assert_eq!(
            error_body(br#"{"code": 6, "message": "name taken", "details": []}"#),
            Some((Some("ALREADY_EXISTS".into()), "name taken".into()))
        );
        assert_eq!(
            error_body(br#"{"code": 99}"#),
            Some((Some("99".into()), String::new()))
        );
        assert_eq!(error_body(b"<html>bad gateway</html>"), None);
        assert_eq!(error_body(b"{}"), None);
    }
}
