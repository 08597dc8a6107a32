//! The web console: three static files embedded in the binary and served at `/`.
//!
//! `index.html`, `app.js` and `app.css` (in `console/` beside this file) are plain HTML,
//! JavaScript and CSS with no build step, no framework and nothing fetched from elsewhere: a
//! gateway often has no internet, and an operator on site opens the console through the
//! loopback address or an SSH tunnel. The page is a client of the JSON API under `/api/v1/`;
//! it asks for the API token at the first 401 and keeps it in the tab's `sessionStorage`.
//! These static files need no token: they hold no data.
//!
//! Each file is answered with its content type, `Cache-Control: no-cache` (the browser
//! revalidates on every load, so an upgraded daemon never runs a stale script) and an `ETag`
//! computed at compile time, so that revalidation is a `304 Not Modified` without a body.
//! The page carries a Content-Security-Policy that allows only its own origin: it has no
//! inline script or style, and the JavaScript puts API data into the DOM as text only.
//!
//! The browser tests (`tests/console.rs` driving `tests/browser/console.mjs`) cover the
//! screens against a real daemon.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// The strong `ETag`, quotes included (a hash of the body, made at compile time).
    etag: &'static str,
}

macro_rules! asset {
    ($file:literal, $content_type:literal) => {{
        const BODY: &str = include_str!(concat!("console/", $file));
        const HASH: [u8; 18] = etag(fnv1a(BODY.as_bytes()));
        Asset {
            body: BODY,
            content_type: $content_type,
            etag: match std::str::from_utf8(&HASH) {
                Ok(s) => s,
                Err(_) => panic!("an ETag is ASCII"),
            },
        }
    }};
}

static INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
static APP_JS: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static APP_CSS: Asset = asset!("app.css", "text/css; charset=utf-8");

/// Only this origin, no inline code, no framing: what the console needs and nothing more.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The console's routes: `/` (the page), `/console/app.js` and `/console/app.css`, for the
/// API to merge into its router in front of its authentication (these files need none).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/console/app.js",
            get(|h: HeaderMap| async move { serve(&APP_JS, &h) }),
        )
        .route(
            "/console/app.css",
            get(|h: HeaderMap| async move { serve(&APP_CSS, &h) }),
        )
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == asset.etag || t == "*");
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    let set = |headers: &mut HeaderMap, name, value| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(&mut headers, header::CONTENT_TYPE, asset.content_type);
    set(&mut headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if std::ptr::eq(asset, &INDEX) {
        set(&mut headers, header::CONTENT_SECURITY_POLICY, CSP);
        set(&mut headers, header::REFERRER_POLICY, "no-referrer");
    }
    (headers, asset.body).into_response()
}

/// 64-bit FNV-1a: not cryptographic, only a change detector for the `ETag`.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 lower-case hex digits + `"`.
const fn etag(hash: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the console's routes alone on a loopback port.
    async fn serve_console() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, routes::<()>()).await });
        format!("http://{addr}")
    }

    fn client() -> reqwest::Client {
        crate::cloud::install_crypto_provider();
        reqwest::Client::new()
    }

    #[tokio::test]
    async fn each_file_is_served_with_its_type_and_no_cache() {
        let base = serve_console().await;
        for (path, asset) in [
            ("/", &INDEX),
            ("/console/app.js", &APP_JS),
            ("/console/app.css", &APP_CSS),
        ] {
            let r = client().get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let h = r.headers().clone();
            assert_eq!(h[header::CONTENT_TYPE], asset.content_type, "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
            assert_eq!(h[header::ETAG], asset.etag, "{path}");
            assert_eq!(r.text().await.unwrap(), asset.body, "{path}");
        }
    }

    #[tokio::test]
    async fn a_matching_etag_is_answered_304_without_a_body() {
        let base = serve_console().await;
        let url = format!("{base}/console/app.js");
        let r = client()
            .get(&url)
            .header(header::IF_NONE_MATCH, format!("\"0\", {}", APP_JS.etag))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304);
        assert_eq!(r.headers()[header::ETAG], APP_JS.etag);
        assert!(r.text().await.unwrap().is_empty());
        let r = client()
            .get(&url)
            .header(header::IF_NONE_MATCH, "\"0000000000000000\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "a stale tag gets the file");
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        for needle in ["/console/app.js", "/console/app.css"] {
            assert!(INDEX.body.contains(needle), "index.html names {needle}");
        }
        for body in [INDEX.body, APP_JS.body, APP_CSS.body] {
            assert!(!body.contains("http://") && !body.contains("https://"));
            assert!(
                !body.contains("innerHTML"),
                "data goes into the DOM as text only"
            );
        }
        assert!(!INDEX.body.contains("<script>") && !INDEX.body.contains("style="));
        assert_ne!(INDEX.etag, APP_JS.etag);
    }
}
