//! The API's bearer token: where it comes from, and the check every API route passes.
//!
//! The token is `api.token_file`, else the systemd credential `api-token` (both read with the
//! configuration), else `api-token` beside the database, made at the first start (32 random
//! bytes as hex, mode 0600, created exclusively so two starts cannot race to two tokens) and
//! read again at every later one. Its path is logged, the token never.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Api, ApiError};
use crate::config::Secret;

/// The token file the daemon makes when none is configured.
pub const GENERATED_NAME: &str = "api-token";

/// Why the API has no token.
#[derive(Debug, thiserror::Error)]
#[error("API token file {}: {reason}", path.display())]
pub struct TokenError {
    pub path: PathBuf,
    pub reason: String,
}

/// The configured token, or the one beside the database (made now if missing).
///
/// # Errors
/// A token file that cannot be made or read.
pub fn token(configured: Option<&Secret>, database: &Path) -> Result<Secret, TokenError> {
    if let Some(t) = configured {
        return Ok(t.clone());
    }
    let dir = database.parent().unwrap_or(Path::new("."));
    let path = dir.join(GENERATED_NAME);
    let err = |reason: String| TokenError {
        path: path.clone(),
        reason,
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            let mut bytes = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| err("no random bytes from the system".into()))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            file.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| err(format!("cannot write it: {e}")))?;
            tracing::info!(file = %path.display(), "made an API token (give it to the console or use it as a Bearer token)");
            Ok(Secret::new(token))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read it: {e}")))?;
            let token = text.lines().next().unwrap_or("").trim();
            if token.is_empty() {
                return Err(err(
                    "it is empty; delete it to have a new one made, or set api.token_file".into(),
                ));
            }
            tracing::info!(file = %path.display(), "API token read");
            Ok(Secret::new(token))
        }
        Err(e) => Err(err(format!("cannot create it: {e}"))),
    }
}

/// Equal in time that does not depend on where the bytes differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware of every `/api/v1` route and `/metrics`: `Authorization: Bearer <token>`.
pub async fn require_token(State(api): State<Api>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(t) if same(t.as_bytes(), api.inner.token.expose().as_bytes()) => next.run(req).await,
        Some(_) => unauthorized("wrong API token"),
        None => unauthorized("this route needs the API token: Authorization: Bearer <token>"),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_token_is_made_once_with_mode_0600_and_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gateway.db");
        let first = token(None, &db).unwrap();
        assert_eq!(first.expose().len(), 64);
        let mode = std::fs::metadata(dir.path().join(GENERATED_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(token(None, &db).unwrap(), first);
        let configured = Secret::new("chosen");
        assert_eq!(token(Some(&configured), &db).unwrap(), configured);
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }
}
