//! The two clouds: what every client shares — the typed error, HTTP set-up, `Retry-After`.
//!
//! Each cloud has its own room (`golioth`, `netneural`) with `client.rs` (requests),
//! `wire.rs` (the only place serde meets the vendor's JSON) and `mapping.rs` (wire ↔ model).
//!
//! **Errors are shaped by the caller's next decision.** A [`CloudError`] names the cloud, the
//! request (method and path, never the key or the query's values), and what went wrong; the
//! outbox lanes ask it [`CloudError::is_retryable`], [`CloudError::is_auth`] and
//! [`CloudError::retry_after`], and its `Display` ends by saying whether it will be retried.
//! No error, log line or `Debug` output ever holds an API key: the key lives in a
//! [`crate::config::Secret`] and is only exposed while a request's headers are built.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::{HttpSettings, Secret};
use crate::metrics::Metrics;
use crate::model::{Target, UnixMillis};

pub mod golioth;
pub mod netneural;
pub mod sync;
pub mod uplink;

/// The longest `Retry-After` honoured: a cloud asking for more (or a clock far off) does not
/// park a lane for a day.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// Bytes of an error body kept in an error message.
const ERROR_BODY_EXCERPT: usize = 300;

/// What failed, as far as it changes what to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer: DNS, connect, TLS, a reset connection, or no response within the timeout.
    Transport { timeout: bool, detail: String },
    /// The cloud answered with an error status. `code` and `message` come from its error body
    /// when it had one (Golioth `{code,message,details}`, PostgREST `{code,message,details,hint}`).
    Status {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// The cloud answered 2xx with a body that does not match its contract.
    Decode { detail: String },
    /// The request could not be built from our data (a value the cloud cannot take).
    Request { detail: String },
    /// The API key cannot be sent at all (it holds bytes an HTTP header cannot carry): an
    /// auth failure of ours, so the lane pauses until a new key comes, rather than every row
    /// being refused for it.
    BadKey,
    /// A conditional write kept losing to concurrent writers (NetNeural's optimistic
    /// `updated_at` check). Nothing is wrong with the request: later it will likely win.
    Contended { detail: String },
}

/// A failed request to a cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudError {
    pub target: Target,
    /// Method and path template, e.g. `POST /v1/projects/{project}/devices` — no query values,
    /// no key.
    pub request: String,
    pub failure: Failure,
    /// From the response's `Retry-After`, capped at [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
}

impl CloudError {
    pub fn transport(target: Target, request: impl Into<String>, e: &reqwest::Error) -> Self {
        CloudError {
            target,
            request: request.into(),
            failure: Failure::Transport {
                timeout: e.is_timeout(),
                detail: transport_detail(e),
            },
            retry_after: None,
        }
    }

    pub fn decode(target: Target, request: impl Into<String>, detail: impl Into<String>) -> Self {
        CloudError {
            target,
            request: request.into(),
            failure: Failure::Decode {
                detail: detail.into(),
            },
            retry_after: None,
        }
    }

    pub fn request(target: Target, request: impl Into<String>, detail: impl Into<String>) -> Self {
        CloudError {
            target,
            request: request.into(),
            failure: Failure::Request {
                detail: detail.into(),
            },
            retry_after: None,
        }
    }

    pub fn contended(
        target: Target,
        request: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        CloudError {
            target,
            request: request.into(),
            failure: Failure::Contended {
                detail: detail.into(),
            },
            retry_after: None,
        }
    }

    /// The error code from the cloud's error body (Golioth's gRPC status name, PostgREST's
    /// SQLSTATE or `PGRST…` code), when it sent one.
    pub fn code(&self) -> Option<&str> {
        match &self.failure {
            Failure::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status, when the cloud answered.
    pub fn status(&self) -> Option<u16> {
        match &self.failure {
            Failure::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether trying the same request again later can succeed: no answer, 408, 429, 5xx.
    /// A 2xx whose body we cannot read is not retried (the same body would come back), nor
    /// is any other 4xx.
    pub fn is_retryable(&self) -> bool {
        match &self.failure {
            Failure::Transport { .. } => true,
            Failure::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Failure::Contended { .. } => true,
            Failure::Decode { .. } | Failure::Request { .. } | Failure::BadKey => false,
        }
    }

    /// 401 or 403: the key is wrong, revoked or lacks a permission. Retrying every row cannot
    /// help; the lane pauses until the key changes or a slow recheck succeeds.
    pub fn is_auth(&self) -> bool {
        matches!(self.status(), Some(401 | 403)) || self.failure == Failure::BadKey
    }

    /// The key in the key file cannot go into a header (a stray control byte, say).
    pub fn bad_key(target: Target, request: impl Into<String>) -> Self {
        CloudError {
            target,
            request: request.into(),
            failure: Failure::BadKey,
            retry_after: None,
        }
    }

    /// No answer at all (the cloud is unreachable), as opposed to an answer that says no.
    pub fn is_unreachable(&self) -> bool {
        matches!(self.failure, Failure::Transport { .. })
            || matches!(self.status(), Some(502..=504))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The error as one step of a sync run sees it: what failed, then that the next run tries
    /// again (whatever the outbox would do with it), or, for a refused key, what to check.
    pub fn for_sync(&self) -> String {
        struct What<'a>(&'a CloudError);
        impl fmt::Display for What<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt_failure(f)
            }
        }
        if self.is_auth() {
            format!("{}; check the API key", What(self))
        } else {
            format!("{}; the next sync run tries again", What(self))
        }
    }

    fn fmt_failure(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: ", self.target.as_str(), self.request)?;
        match &self.failure {
            Failure::Transport { timeout: true, .. } => f.write_str("no response in time")?,
            Failure::Transport { detail, .. } => write!(f, "no response ({detail})")?,
            Failure::Status {
                status,
                code,
                message,
            } => {
                write!(f, "HTTP {status}")?;
                if let Some(code) = code {
                    write!(f, " [{code}]")?;
                }
                if !message.is_empty() {
                    write!(f, " {message}")?;
                }
            }
            Failure::Decode { detail } => write!(f, "unexpected response body: {detail}")?,
            Failure::Request { detail } => write!(f, "cannot build the request: {detail}")?,
            Failure::BadKey => {
                f.write_str("the API key holds bytes an HTTP header cannot carry")?
            }
            Failure::Contended { detail } => write!(f, "lost to concurrent writers: {detail}")?,
        }
        Ok(())
    }
}

impl fmt::Display for CloudError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_failure(f)?;
        if self.is_auth() {
            f.write_str("; check the API key (the lane pauses until it works)")
        } else if self.is_retryable() {
            match self.retry_after {
                Some(after) => write!(f, "; will be retried after {}s", after.as_secs()),
                None => f.write_str("; will be retried"),
            }
        } else {
            f.write_str("; not retried")
        }
    }
}

impl std::error::Error for CloudError {}

/// The chain of a reqwest error without the URL (which may carry query values).
fn transport_detail(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        if e.is_connect() {
            return "cannot connect".into();
        }
        return "connection failed".into();
    }
    parts.join(": ")
}

/// Builds the error for a non-2xx answer. `code_and_message` parses the vendor's error body.
pub fn status_error(
    target: Target,
    request: impl Into<String>,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    code_and_message: impl FnOnce(&[u8]) -> Option<(Option<String>, String)>,
) -> CloudError {
    let (code, message) = code_and_message(body).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let mut text = text.trim().to_owned();
        if text.len() > ERROR_BODY_EXCERPT {
            let mut cut = ERROR_BODY_EXCERPT;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        (None, text)
    });
    CloudError {
        target,
        request: request.into(),
        failure: Failure::Status {
            status,
            code,
            message,
        },
        retry_after,
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3), relative
/// to `now`. A date in the past means "now"; anything unreadable is ignored.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let after = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = std::time::SystemTime::from(http_date(value)?);
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 §5.6.7).
fn http_date(value: &str) -> Option<time::OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    Some(
        time::PrimitiveDateTime::parse(value.trim(), &format)
            .ok()?
            .assume_utc(),
    )
}

/// The server's clock when it answered (its `Date` header), if it sent a readable one.
pub fn server_date_of(headers: &reqwest::header::HeaderMap) -> Option<UnixMillis> {
    let at = http_date(headers.get(reqwest::header::DATE)?.to_str().ok()?)?;
    Some(UnixMillis((at.unix_timestamp_nanos() / 1_000_000) as i64))
}

/// `Retry-After` of a response, if it has a readable one.
pub fn retry_after_of(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
}

/// A vendor's error-body parser for [`status_error`]: `(code, message)`, or `None` when the
/// body is not the vendor's error shape (then an excerpt of the raw body is kept).
pub(crate) type ErrorBody = fn(&[u8]) -> Option<(Option<String>, String)>;

/// Sends one request and reads the whole answer's body. Any non-2xx status becomes a
/// [`Failure::Status`] error (callers that take a 404 or 409 as an answer look at
/// [`CloudError::status`]); no answer, or a body cut off, is a [`Failure::Transport`].
pub(crate) async fn send(
    target: Target,
    request: &str,
    builder: reqwest::RequestBuilder,
    error_body: ErrorBody,
    metrics: &Metrics,
) -> Result<Vec<u8>, CloudError> {
    send_dated(target, request, builder, error_body, metrics)
        .await
        .map(|(body, _)| body)
}

/// [`send`], also returning the server's clock when it answered ([`server_date_of`]).
///
/// Every request of both clients passes here, so this is where `metrics` counts them
/// (cloud, `request` as the operation, status or "error") and times them, up to the whole
/// body read. A request abandoned mid-flight (its future dropped at shutdown) is not counted.
pub(crate) async fn send_dated(
    target: Target,
    request: &str,
    builder: reqwest::RequestBuilder,
    error_body: ErrorBody,
    metrics: &Metrics,
) -> Result<(Vec<u8>, Option<UnixMillis>), CloudError> {
    let started = std::time::Instant::now();
    let answer = async {
        let response = builder.send().await?;
        let status = response.status().as_u16();
        let retry_after = retry_after_of(response.headers());
        let date = server_date_of(response.headers());
        let body = response.bytes().await?;
        Ok::<_, reqwest::Error>((status, retry_after, date, body))
    }
    .await;
    let (status, retry_after, date, body) = match answer {
        Ok(answer) => {
            metrics.cloud_request(target, request, Some(answer.0), started.elapsed());
            answer
        }
        Err(e) => {
            metrics.cloud_request(target, request, None, started.elapsed());
            return Err(CloudError::transport(target, request, &e));
        }
    };
    if !(200..300).contains(&status) {
        return Err(status_error(
            target,
            request,
            status,
            retry_after,
            &body,
            error_body,
        ));
    }
    Ok((body.to_vec(), date))
}

/// Parses a 2xx body into a wire type; a mismatch is a [`Failure::Decode`].
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    target: Target,
    request: &str,
    body: &[u8],
) -> Result<T, CloudError> {
    serde_json::from_slice(body).map_err(|e| CloudError::decode(target, request, e.to_string()))
}

/// An RFC 3339 timestamp (Golioth's `…Z`, Postgres' `…+00:00` with microseconds) as
/// milliseconds; `None` if unreadable, since every timestamp the clouds send is optional to us.
pub fn parse_rfc3339(raw: &str) -> Option<UnixMillis> {
    let t =
        time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .ok()
        .map(UnixMillis)
}

/// A request URL: `base`, then `segments` appended as path segments (each percent-encoded, so
/// an id can never add a path level or a query), then `query` pairs (form-encoded).
pub(crate) fn url_of(base: &url::Url, segments: &[&str], query: &[(&str, &str)]) -> url::Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url
}

/// A header value holding a credential, marked sensitive so that HTTP tracing never prints it.
pub(crate) fn secret_header(value: &str) -> Option<reqwest::header::HeaderValue> {
    let mut v = reqwest::header::HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Makes ring the process's TLS crypto provider (reqwest is built without one, so that no C
/// crypto library is needed for cross builds). Calling it again does nothing.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// One client per cloud: connection reuse (keep-alive pool), connect and request timeouts,
/// rustls. No redirects: an API that redirects is misconfigured, and following one could
/// send the key somewhere else.
///
/// # Errors
/// When the TLS stack cannot be set up (no root certificates can be loaded).
/// The request named by a [`http_client`] failure.
pub const CLIENT_SET_UP: &str = "client set-up";

pub fn http_client(target: Target, settings: HttpSettings) -> Result<reqwest::Client, CloudError> {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("nn-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            // rustls-platform-verifier reads the system's CA store: a bare root has none.
            let hint = if std::path::Path::new("/etc/ssl/certs").is_dir() {
                ""
            } else {
                " (no CA certificates in /etc/ssl/certs: install the ca-certificates package)"
            };
            CloudError::request(target, CLIENT_SET_UP, format!("{e}{hint}"))
        })
}

/// An API key that SIGHUP can replace while the lanes run. Read for every request.
#[derive(Clone, Debug)]
pub struct ApiKey(Arc<RwLock<Secret>>);

impl ApiKey {
    pub fn new(key: Secret) -> ApiKey {
        ApiKey(Arc::new(RwLock::new(key)))
    }

    /// The current key.
    pub fn get(&self) -> Secret {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the key; returns whether it changed.
    pub fn replace(&self, key: Secret) -> bool {
        let mut slot = match self.0.write() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        let changed = *slot != key;
        *slot = key;
        changed
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> CloudError {
        status_error(Target::Golioth, "GET /x", code, None, b"", |_| None)
    }

    #[test]
    fn retryable_is_no_answer_408_429_and_5xx() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(status(code).is_retryable(), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert!(!status(code).is_retryable(), "{code}");
        }
        assert!(status(401).is_auth() && status(403).is_auth() && !status(404).is_auth());
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn messages_name_cloud_request_status_and_whether_retried() {
        let e = status_error(
            Target::NetNeural,
            "POST /rest/v1/devices",
            503,
            Some(Duration::from_secs(7)),
            b"upstream down",
            |_| None,
        );
        assert_eq!(
            e.to_string(),
            "netneural: POST /rest/v1/devices: HTTP 503 upstream down; will be retried after 7s"
        );
        let e = status_error(Target::Golioth, "GET /v1/x", 400, None, b"{}", |_| {
            Some((Some("InvalidArgument".into()), "bad name".into()))
        });
        assert_eq!(
            e.to_string(),
            "golioth: GET /v1/x: HTTP 400 [InvalidArgument] bad name; not retried"
        );
        assert!(status(401).to_string().contains("check the API key"));
    }

    #[test]
    fn long_error_bodies_are_cut() {
        let body = "x".repeat(5000);
        let e = status_error(
            Target::Golioth,
            "GET /x",
            500,
            None,
            body.as_bytes(),
            |_| None,
        );
        assert!(e.to_string().len() < 500);
    }
}
