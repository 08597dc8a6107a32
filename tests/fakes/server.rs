//! The HTTP side both fakes share: a listener on 127.0.0.1 port 0, one hyper connection task
//! per TCP connection (so a fault can close exactly that connection without a response), and
//! the order every request goes through: faults, key, poison, then the fake's handler.
//!
//! Each request is handled in its own task, so a [`Fault::Delay`]ed write is applied even
//! when the client stops waiting and closes the connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::faults::{Answer, Fault, Faults, Logged};

/// One request, read completely.
#[derive(Debug)]
pub(super) struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header that may repeat (`Prefer`).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Decoded query pairs in order; a key may repeat.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH")
    }
}

/// One response.
#[derive(Clone, Debug)]
pub(super) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Bytes>,
}

impl Response {
    pub fn json(status: u16, body: &Value) -> Response {
        Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(Bytes::from(body.to_string())),
        }
    }

    pub fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut builder = hyper::Response::builder().status(self.status);
        for (k, v) in &self.headers {
            builder = builder.header(k, v);
        }
        builder
            .body(Full::new(self.body.unwrap_or_default()))
            .expect("a valid response")
    }
}

/// A fake cloud's own behaviour behind the shared fault handling.
pub(super) trait Api: Send + Sync + 'static {
    /// `Err` with the vendor's 401 when the request lacks the valid `key` (or carries it
    /// where this vendor does not look).
    fn check_key(&self, req: &Request, key: &str) -> Result<(), Response>;
    /// The vendor's error response for `status`.
    fn error(&self, status: u16, message: &str) -> Response;
    /// Handles a request that passed faults, key and poison checks.
    fn handle(&self, req: &Request) -> Response;
}

/// What became of one request.
enum Outcome {
    Respond(Response),
    /// Close the connection without answering.
    Drop,
}

async fn dispatch(api: Arc<dyn Api>, faults: Faults, req: Request) -> Outcome {
    let at = Instant::now();
    let log = |req: &Request, answer: Answer| {
        faults.record(Logged {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers: req.headers.clone(),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            at,
            answer,
        })
    };
    let mut lose = false;
    match faults.take(&req.method, &req.path) {
        Some(Fault::Status {
            status,
            retry_after,
            body,
        }) => {
            let mut resp = match body {
                Some(b) => Response {
                    status,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: Some(Bytes::from(b)),
                },
                None => api.error(status, super::faults::reason(status)),
            };
            if let Some(after) = retry_after {
                resp = resp.with_header("retry-after", &after);
            }
            log(&req, Answer::Status(status));
            return Outcome::Respond(resp);
        }
        Some(Fault::Drop) => {
            log(&req, Answer::Dropped);
            return Outcome::Drop;
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::LoseResponse) => lose = true,
        None => {}
    }
    let resp = if let Err(denied) = api.check_key(&req, &faults.key()) {
        denied
    } else if let Some(needle) = req
        .is_write()
        .then(|| faults.poisoned(&String::from_utf8_lossy(&req.body)))
        .flatten()
    {
        api.error(400, &format!("invalid input (poisoned value {needle:?})"))
    } else {
        api.handle(&req)
    };
    if lose {
        log(&req, Answer::Lost(resp.status));
        Outcome::Drop
    } else {
        log(&req, Answer::Status(resp.status));
        Outcome::Respond(resp)
    }
}

/// A running fake: its address; stops accepting (and closes its connections) on drop.
#[derive(Debug)]
pub(super) struct Server {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Server {
    /// Binds 127.0.0.1 port 0 and serves `api` on the current tokio runtime.
    pub async fn start(api: Arc<dyn Api>, faults: Faults) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, api, faults, shutdown.clone()));
        Server { addr, shutdown }
    }
}

async fn accept_loop(
    listener: TcpListener,
    api: Arc<dyn Api>,
    faults: Faults,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        // Cancelled by a handler to close this one connection without a response.
        let kill = CancellationToken::new();
        let service = {
            let (api, faults, kill) = (api.clone(), faults.clone(), kill.clone());
            service_fn(move |req: hyper::Request<Incoming>| {
                let (api, faults, kill) = (api.clone(), faults.clone(), kill.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = match body.collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => {
                            kill.cancel();
                            return std::future::pending().await;
                        }
                    };
                    let req = Request {
                        method: parts.method.as_str().to_owned(),
                        path: parts.uri.path().to_owned(),
                        query: parts.uri.query().map(str::to_owned),
                        headers: parts
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect(),
                        body,
                    };
                    match tokio::spawn(dispatch(api, faults, req)).await {
                        Ok(Outcome::Respond(resp)) => Ok::<_, Infallible>(resp.into_hyper()),
                        Ok(Outcome::Drop) | Err(_) => {
                            kill.cancel();
                            std::future::pending().await
                        }
                    }
                }
            })
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // Dropping the connection future closes the socket: no response is written.
            tokio::select! {
                _ = conn => {}
                _ = kill.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}
