//! Golioth's JSON, as its Management API sends and takes it — the only place serde meets it.
//!
//! Every field the spec marks optional is optional here, and unknown fields are ignored (no
//! `deny_unknown_fields`): Golioth adds fields, and grpc-gateway omits those at their zero
//! value. The spec types `page`, `perPage`, `total` and the error `code` as integers, but
//! protobuf's JSON mapping writes 64-bit integers as strings, so both are accepted.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// `{"data": …}`: one object.
#[derive(Debug, Deserialize)]
pub struct Data<T> {
    pub data: Option<T>,
}

/// `{"list": […], "page", "perPage", "total"}`: one page of a list.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    #[serde(default = "Vec::new")]
    pub list: Vec<T>,
    #[serde(default, deserialize_with = "lenient_int")]
    pub page: Option<i64>,
    #[serde(default, deserialize_with = "lenient_int")]
    pub per_page: Option<i64>,
    #[serde(default, deserialize_with = "lenient_int")]
    pub total: Option<i64>,
}

/// `goliothDevice`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub hardware_ids: Vec<String>,
    #[serde(default)]
    pub tag_ids: Vec<String>,
    pub enabled: Option<bool>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub metadata: Option<DeviceMetadata>,
    /// The state at the list's `statePath`, when one was asked for.
    pub data: Option<Value>,
}

/// `goliothDeviceMetadata`. (`status` is deprecated and always `"-"`, so it is not read.)
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMetadata {
    pub last_report: Option<String>,
    pub last_seen_online: Option<String>,
}

/// `comgoliothTag`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tag {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// `goliothDevicesCreateBody`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateDevice<'a> {
    pub name: &'a str,
    pub hardware_ids: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub tag_ids: &'a [String],
}

/// `goliothDeviceUpdate`, sent with PATCH: absent fields stay as they are; `hardwareIds` and
/// `tagIds` replace the whole set.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateDevice<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_ids: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_ids: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// `goliothTagsCreateBody`.
#[derive(Debug, Serialize)]
pub struct CreateTag<'a> {
    pub name: &'a str,
}

/// `rpcStatus`: the error body. `code` is a gRPC status code; `details` is a list of
/// `protobufAny` and is not read.
#[derive(Debug, Deserialize)]
pub struct Status {
    #[serde(default, deserialize_with = "lenient_int")]
    pub code: Option<i64>,
    #[serde(default)]
    pub message: Option<String>,
}

/// An integer written as a JSON number or as a string of digits; `null` is absent.
fn lenient_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(i64),
        Text(String),
    }
    match Option::<Int>::deserialize(d)? {
        None => Ok(None),
        Some(Int::Number(n)) => Ok(Some(n)),
        Some(Int::Text(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_list_with_missing_optional_and_unknown_fields_parses() {
        let body = r#"{
          "list": [
            {"id": "d1", "name": "berlin-s1", "hardwareIds": ["berlin-s1"], "tagIds": ["t1"],
             "enabled": true, "createdAt": "2024-05-01T10:00:00.123Z", "status": "-",
             "metadata": {"status": "-", "lastReport": "2024-05-02T00:00:00Z",
                          "lastSeenOnline": "2024-05-02T00:00:01Z", "update": {}},
             "data": {"temp": 1}, "blueprintId": "", "somethingNew": [1, 2]},
            {"id": "d2", "name": "x"}
          ],
          "page": "0", "perPage": 100, "total": "2", "extra": true
        }"#;
        let page: Page<Device> = serde_json::from_str(body).unwrap();
        assert_eq!(
            (page.page, page.per_page, page.total),
            (Some(0), Some(100), Some(2))
        );
        assert_eq!(page.list.len(), 2);
        let d = &page.list[0];
        assert_eq!(d.tag_ids, ["t1"]);
        assert_eq!(
            d.metadata.as_ref().unwrap().last_seen_online.as_deref(),
            Some("2024-05-02T00:00:01Z")
        );
        assert!(page.list[1].hardware_ids.is_empty() && page.list[1].enabled.is_none());
    }

    #[test]
    fn an_empty_list_may_omit_everything() {
        let page: Page<Tag> = serde_json::from_str("{}").unwrap();
        assert!(page.list.is_empty() && page.total.is_none());
    }

    #[test]
    fn error_bodies_parse_with_numeric_or_string_codes() {
        let s: Status = serde_json::from_str(
            r#"{"code": 6, "message": "device already exists", "details": [{"@type": "x"}]}"#,
        )
        .unwrap();
        assert_eq!(
            (s.code, s.message.as_deref()),
            (Some(6), Some("device already exists"))
        );
        let s: Status = serde_json::from_str(r#"{"code": "5"}"#).unwrap();
        assert_eq!(s.code, Some(5));
    }

    #[test]
    fn updates_send_only_what_changes() {
        let tags = vec!["t1".to_owned()];
        let body = serde_json::to_value(UpdateDevice {
            tag_ids: Some(&tags),
            ..UpdateDevice::default()
        })
        .unwrap();
        assert_eq!(body, serde_json::json!({"tagIds": ["t1"]}));
    }
}
