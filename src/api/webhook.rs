//! `POST /api/v1/webhooks/golioth`: Golioth Pipelines' webhook destination (directly, or
//! through a relay) says a device sent something; the gateway pulls that device at once
//! ([`crate::cloud::sync::PullRequests`]), so a change made in Golioth reaches it in seconds.
//!
//! Golioth signs nothing, so the request must carry the shared secret (`api.webhook_secret_file`)
//! in `api.webhook_header`, a header set on both sides; a relay that signs may add an
//! HMAC-SHA256 of the body (`api.webhook_hmac_key_file`), then required as
//! `X-Signature-256: sha256=<hex>`. Both compared in constant time. The CloudEvents headers
//! name the device (`Ce-Source`) and the project (`Ce-Subject`, which must be ours). Answers:
//! 202 accepted (the pull is scheduled or was already waiting), 400 no device named, 401 no or
//! a wrong secret or signature, 403 another project, 404 the webhook is off, 409 no Golioth
//! sync runs, 413 too large a body, 503 too many devices waiting. Refusals are logged without
//! the secret.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::same;
use super::{Api, ApiError};
use crate::cloud::sync::{PullRequests, Requested};
use crate::config::Secret;

/// The header a signing relay puts the body's HMAC in.
pub const SIGNATURE_HEADER: &str = "x-signature-256";

/// What the webhook checks requests against.
pub struct Webhook {
    pub header: String,
    pub secret: Secret,
    pub hmac: Option<ring::hmac::Key>,
    pub project_id: String,
    /// `None` when no Golioth sync runs (the webhook then answers 409).
    pub pulls: Option<PullRequests>,
}

impl Webhook {
    pub fn new(config: &crate::config::Config, pulls: Option<PullRequests>) -> Option<Webhook> {
        let api = &config.api;
        Some(Webhook {
            header: api.webhook_header.to_ascii_lowercase(),
            secret: api.webhook_secret.clone()?,
            hmac: api
                .webhook_hmac_key
                .as_ref()
                .map(|k| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.expose().as_bytes())),
            project_id: config.golioth.project_id.clone(),
            pulls,
        })
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn refuse(status: StatusCode, why: &str, device: Option<&str>) -> ApiError {
    tracing::warn!(
        status = status.as_u16(),
        device = device.unwrap_or("-"),
        "Golioth webhook refused: {why}"
    );
    ApiError::new(status, why)
}

/// A device id as Golioth writes it: `Ce-Source` is the id, or a path ending in it.
fn device_of(source: &str) -> Option<&str> {
    let id = source.rsplit('/').next()?;
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(id)
}

pub async fn golioth(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(hook) = &api.inner.webhook else {
        return Err(ApiError::not_found(
            "the Golioth webhook is off: set api.webhook_secret_file (or the credential api-webhook-secret)",
        ));
    };
    let source = header(&headers, "ce-source");
    match header(&headers, &hook.header) {
        None => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                &format!("no {} header", hook.header),
                source,
            ));
        }
        Some(given) if !same(given.as_bytes(), hook.secret.expose().as_bytes()) => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                &format!("wrong secret in {}", hook.header),
                source,
            ));
        }
        Some(_) => {}
    }
    if let Some(key) = &hook.hmac {
        let tag = header(&headers, SIGNATURE_HEADER)
            .and_then(|v| v.strip_prefix("sha256="))
            .and_then(hex);
        let Some(tag) = tag else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "no {SIGNATURE_HEADER}: sha256=<hex> header (api.webhook_hmac_key_file is set)"
                ),
                source,
            ));
        };
        if ring::hmac::verify(key, &body, &tag).is_err() {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                &format!("{SIGNATURE_HEADER} does not match the body"),
                source,
            ));
        }
    }
    let project = header(&headers, "ce-subject").unwrap_or("");
    if project != hook.project_id {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "Ce-Subject {project:?} is not this gateway's project (golioth.project_id = {:?})",
                hook.project_id
            ),
            source,
        ));
    }
    let Some(device) = source.and_then(device_of) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            &format!("Ce-Source {source:?} names no Golioth device id"),
            source,
        ));
    };
    let Some(pulls) = &hook.pulls else {
        return Err(ApiError::conflict(
            "no Golioth sync runs here (golioth.enabled and sync.enabled): nothing to pull",
        ));
    };
    let kind = header(&headers, "ce-type").unwrap_or("-");
    let outcome = match pulls.request(device) {
        Requested::Scheduled => "scheduled",
        Requested::Coalesced => "coalesced",
        Requested::Full => {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many devices wait for a pull; the next full sync run reads them all",
                Some(device),
            ));
        }
    };
    tracing::debug!(device, kind, outcome, "Golioth webhook");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"device": device, "pull": outcome})),
    )
        .into_response())
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_the_source_or_the_last_segment_of_it() {
        assert_eq!(
            device_of("65a1b2c3d4e5f6a7b8c9d0e1"),
            Some("65a1b2c3d4e5f6a7b8c9d0e1")
        );
        assert_eq!(device_of("/devices/abc123"), Some("abc123"));
        assert_eq!(device_of(""), None);
        assert_eq!(device_of("abc/"), None);
        assert_eq!(device_of("a b"), None);
    }

    #[test]
    fn hex_decodes_pairs_only() {
        assert_eq!(hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(hex("0"), None);
        assert_eq!(hex("zz"), None);
    }
}
