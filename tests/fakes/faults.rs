//! What both fakes share to misbehave on purpose: scripted faults, poisoned payloads, the one
//! valid key, and the log of every request with how it was answered.
//!
//! A [`Faults`] is a cheap cloneable handle; a test scripts it while the gateway runs.
//! Faults are checked before the key (an outage does not care who calls), then the key, then
//! poisoned payloads, then the fake handles the request.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One way to misbehave on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` instead of handling the request (nothing is applied). `retry_after` is
    /// sent verbatim as `Retry-After` (seconds `"3"` or an HTTP date); `body` replaces the
    /// vendor's error body for that status.
    Status {
        status: u16,
        retry_after: Option<String>,
        body: Option<String>,
    },
    /// Sleep, then handle the request normally. The write is applied even when the client
    /// gave up meanwhile, as a slow real server would.
    Delay(Duration),
    /// Close the TCP connection without any response; nothing is applied.
    Drop,
    /// Apply the request (commit the write), then close the connection without answering.
    LoseResponse,
}

impl Fault {
    /// `status` with the vendor's error body and no `Retry-After`.
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
            body: None,
        }
    }

    /// `status` with `Retry-After: value` (seconds, or an HTTP date such as
    /// `"Sun, 06 Nov 1994 08:49:37 GMT"`).
    pub fn retry_after(status: u16, value: &str) -> Fault {
        Fault::Status {
            status,
            retry_after: Some(value.to_owned()),
            body: None,
        }
    }

    /// 429 with `Retry-After` in seconds.
    pub fn too_many_requests(after_secs: u64) -> Fault {
        Fault::retry_after(429, &after_secs.to_string())
    }
}

/// Which requests a fault applies to: a method (or any) and a substring of the path (or any).
/// The query string is not part of the path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    method: Option<String>,
    path: Option<String>,
}

impl Match {
    /// Every request.
    pub fn any() -> Match {
        Match::default()
    }

    /// `method` (`"GET"`, `"POST"`, ...) on a path containing `path`.
    pub fn new(method: &str, path: &str) -> Match {
        Match {
            method: Some(method.to_ascii_uppercase()),
            path: Some(path.to_owned()),
        }
    }

    /// Any method on a path containing `path`.
    pub fn path(path: &str) -> Match {
        Match {
            method: None,
            path: Some(path.to_owned()),
        }
    }

    /// Every request with this method.
    pub fn method(method: &str) -> Match {
        Match {
            method: Some(method.to_ascii_uppercase()),
            path: None,
        }
    }

    pub fn get(path: &str) -> Match {
        Match::new("GET", path)
    }
    pub fn post(path: &str) -> Match {
        Match::new("POST", path)
    }
    pub fn put(path: &str) -> Match {
        Match::new("PUT", path)
    }
    pub fn patch(path: &str) -> Match {
        Match::new("PATCH", path)
    }
    pub fn delete(path: &str) -> Match {
        Match::new("DELETE", path)
    }

    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self.path.as_deref().is_none_or(|p| path.contains(p))
    }
}

/// How a logged request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A response with this status was sent.
    Status(u16),
    /// The connection was closed without a response; nothing was applied ([`Fault::Drop`]).
    Dropped,
    /// The request was handled (its write applied) with this status, but the response was
    /// never sent ([`Fault::LoseResponse`]).
    Lost(u16),
}

impl Answer {
    /// The status the client saw, if it saw one.
    pub fn status(self) -> Option<u16> {
        match self {
            Answer::Status(s) => Some(s),
            Answer::Dropped | Answer::Lost(_) => None,
        }
    }
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string.
    pub query: Option<String>,
    /// Lower-case header names.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When the request arrived.
    pub at: Instant,
    pub answer: Answer,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Requests by kind, for a benchmark's "N reads, M writes".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// GET and HEAD.
    pub reads: usize,
    /// Every other method (POST, PUT, PATCH, DELETE).
    pub writes: usize,
}

/// A position in the request log, for "how many requests since then".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(usize);

#[derive(Debug)]
struct Inner {
    /// `(match, fault, remaining)`, first match wins.
    next: Vec<(Match, Fault, usize)>,
    always: Vec<(Match, Fault)>,
    poison: Vec<String>,
    key: String,
    log: Vec<Logged>,
}

/// The scripting handle of one fake. Cloning it shares the script.
#[derive(Clone, Debug)]
pub struct Faults(Arc<Mutex<Inner>>);

impl Faults {
    pub(super) fn new(key: &str) -> Faults {
        Faults(Arc::new(Mutex::new(Inner {
            next: Vec::new(),
            always: Vec::new(),
            poison: Vec::new(),
            key: key.to_owned(),
            log: Vec::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `fault` for the next `n` requests that match (scripted faults are used before
    /// [`Faults::always`] ones, in the order they were added).
    pub fn next(&self, m: Match, fault: Fault, n: usize) {
        if n > 0 {
            self.lock().next.push((m, fault, n));
        }
    }

    /// `fault` for every matching request until [`Faults::clear`]: an outage, or with
    /// [`Fault::Delay`] a slow link (each request waits on its own, so concurrent requests
    /// overlap their delays). A request that a [`Faults::next`] fault matches gets only that.
    pub fn always(&self, m: Match, fault: Fault) {
        self.lock().always.push((m, fault));
    }

    /// Ends every scripted and standing fault (poison stays: see [`Faults::clear_poison`]).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.next.clear();
        inner.always.clear();
    }

    /// Scripted faults not yet used up.
    pub fn pending(&self) -> usize {
        self.lock().next.iter().map(|(_, _, n)| n).sum()
    }

    /// A write (POST/PUT/PATCH) whose body contains `needle` is refused with 400 and the
    /// vendor's error body, and nothing of it is applied (a bulk insert fails as a whole).
    pub fn poison(&self, needle: &str) {
        self.lock().poison.push(needle.to_owned());
    }

    pub fn clear_poison(&self) {
        self.lock().poison.clear();
    }

    /// The key requests must carry; changing it revokes the old one.
    pub fn set_key(&self, key: &str) {
        self.lock().key = key.to_owned();
    }

    pub fn key(&self) -> String {
        self.lock().key.clone()
    }

    /// Every request so far, in the order they were answered.
    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// Requests so far that match.
    pub fn count(&self, m: &Match) -> usize {
        self.count_since(Mark(0), m)
    }

    /// The current end of the log.
    pub fn mark(&self) -> Mark {
        Mark(self.lock().log.len())
    }

    /// Requests after `mark` that match.
    pub fn count_since(&self, mark: Mark, m: &Match) -> usize {
        self.lock().log[mark.0..]
            .iter()
            .filter(|l| m.matches(&l.method, &l.path))
            .count()
    }

    /// Every request so far by kind, however it was answered (a faulted or dropped request
    /// counts: the client sent it).
    pub fn counts(&self) -> Counts {
        self.counts_by_kind_since(Mark(0))
    }

    /// Requests after `mark` by kind.
    pub fn counts_by_kind_since(&self, mark: Mark) -> Counts {
        let inner = self.lock();
        let reads = inner.log[mark.0..]
            .iter()
            .filter(|l| matches!(l.method.as_str(), "GET" | "HEAD"))
            .count();
        Counts {
            reads,
            writes: inner.log.len() - mark.0 - reads,
        }
    }

    /// Requests after `mark`.
    pub fn since(&self, mark: Mark) -> Vec<Logged> {
        self.lock().log[mark.0..].to_vec()
    }

    /// The fault for this request, using up one scripted count.
    pub(super) fn take(&self, method: &str, path: &str) -> Option<Fault> {
        let mut inner = self.lock();
        if let Some(i) = inner
            .next
            .iter()
            .position(|(m, _, _)| m.matches(method, path))
        {
            let fault = inner.next[i].1.clone();
            inner.next[i].2 -= 1;
            if inner.next[i].2 == 0 {
                inner.next.remove(i);
            }
            return Some(fault);
        }
        inner
            .always
            .iter()
            .find(|(m, _)| m.matches(method, path))
            .map(|(_, f)| f.clone())
    }

    /// The poison needle `body` contains, if any.
    pub(super) fn poisoned(&self, body: &str) -> Option<String> {
        self.lock()
            .poison
            .iter()
            .find(|n| body.contains(n.as_str()))
            .cloned()
    }

    pub(super) fn record(&self, entry: Logged) {
        self.lock().log.push(entry);
    }
}

/// The reason phrase of a status, for default error messages.
pub(super) fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}
