//! Talking to the service manager: the `sd_notify(3)` protocol.
//!
//! systemd starts us as `Type=notify` and hands over a datagram socket in `NOTIFY_SOCKET`. The
//! daemon uses it in this order:
//!
//! - `READY=1` once the store is open, the CoAP socket is bound and every task is started.
//!   The MQTT client binds nothing: it connects to the broker on its own, with backoff, and
//!   READY does not wait for the broker (a broker that is down must not fail the start).
//!   Until READY `systemctl start` waits, and units ordered `After=nn-gateway.service` do not
//!   start.
//! - `WATCHDOG=1` every [`Notifier::watchdog_interval`] (half of `WatchdogSec=`), and only
//!   while the heartbeat task ([`crate::heartbeat`]) runs and the store thread answers: a
//!   wedged gateway stops pinging and systemd restarts it. Pinging from a free-running timer would defeat the point.
//! - `STATUS=<one line>` every tick and on every link change (devices, queue depth, rejections,
//!   broker link, whether the store can commit); it is what `systemctl status nn-gateway`
//!   prints.
//! - `STOPPING=1` as the first step of a graceful shutdown on SIGTERM, and `RELOADING=1` on
//!   SIGHUP, followed by `READY=1` again when the reload is done.
//!
//! A failed send is logged once per kind of error and otherwise ignored: losing a notification
//! must never stop the gateway (a missed `WATCHDOG=1` is what the watchdog is for). When
//! `NOTIFY_SOCKET` is unset — run from a shell, in tests — every call is a no-op.
//!
//! # Why not `sd_notify::notify`
//!
//! `sd_notify::notify` re-reads `NOTIFY_SOCKET` from the process environment on every call, so
//! it cannot be pointed at a test socket without mutating the environment (unsafe once threads
//! exist), and it passes `@name` to `connect(2)` as a file name, so abstract sockets do not
//! work. Sending the datagram ourselves is a few lines of `std`. We still use the crate for the
//! field spellings ([`NotifyState`]) and for reading `CLOCK_MONOTONIC` (`MONOTONIC_USEC=`), which
//! keeps this module free of `unsafe`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sd_notify::NotifyState;

/// Longest `STATUS=` text we send, in bytes. systemd drops (not truncates) a notification
/// datagram larger than its 4 KiB receive buffer, so an over-long summary would silently blank
/// the status instead of shortening it.
const MAX_STATUS_BYTES: usize = 1024;

/// How long one send may block when the service manager's queue is full. Calls come from async
/// tasks, so this bounds how long a wedged systemd can stall a worker thread.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Handle to the service manager; cheap to clone. Silent (every call a no-op) when
/// `NOTIFY_SOCKET` is unset.
#[derive(Clone, Debug)]
pub struct Notifier {
    /// `None` when there is no service manager to talk to.
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    /// Half of `WATCHDOG_USEC`, if systemd armed a watchdog for this process.
    watchdog_interval: Option<Duration>,
    /// Error kinds already logged, shared by all clones so a dead socket produces one warning,
    /// not one per watchdog tick.
    warned: Mutex<Vec<io::ErrorKind>>,
}

/// Where notifications go, as parsed from `NOTIFY_SOCKET`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A socket in the file system, e.g. `/run/systemd/notify`.
    Path(PathBuf),
    /// A Linux abstract socket; `NOTIFY_SOCKET=@name` carries the name without the `@`.
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` once.
    ///
    /// The variables are left set: removing them is unsound once threads exist, and the gateway
    /// spawns no children that could misuse them.
    pub fn from_env() -> Notifier {
        let notify_socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog_usec = std::env::var_os("WATCHDOG_USEC");
        let watchdog_pid = std::env::var_os("WATCHDOG_PID");
        Notifier::from_values(
            notify_socket.as_deref(),
            watchdog_usec.as_deref(),
            watchdog_pid.as_deref(),
            std::process::id(),
        )
    }

    /// A notifier that never sends anything.
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// A notifier that sends to the datagram socket at `path`, with no watchdog. For tests that
    /// play the service manager.
    pub fn to_socket(path: impl Into<PathBuf>) -> Notifier {
        Notifier::enabled(Target::Path(path.into()), None)
    }

    /// Whether notifications go anywhere, i.e. we run under a service manager.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// `READY=1`: start-up is complete (store open, listeners bound), or a reload finished.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `WATCHDOG=1`: the gateway is healthy. Send every [`Notifier::watchdog_interval`].
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STATUS=<line>`: a one-line summary for `systemctl status`. Line breaks and other control
    /// characters become spaces, and the text is cut at 1 KiB.
    pub fn status(&self, line: &str) {
        if self.inner.is_none() {
            return;
        }
        self.send(&[NotifyState::Status(&one_line(line))]);
    }

    /// `STOPPING=1`: graceful shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (which systemd 253+ requires for
    /// `Type=notify-reload`, and older versions ignore). Send [`Notifier::ready`] when the
    /// reload is done.
    pub fn reloading(&self) {
        if self.inner.is_none() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(error) => {
                self.warn_once(&error, "MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// How often to send [`Notifier::watchdog`]: half of `WATCHDOG_USEC`, as
    /// `sd_watchdog_enabled(3)` recommends. `None` when there is no watchdog, or it is meant for
    /// another process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.inner.as_ref()?.watchdog_interval
    }

    /// [`Notifier::from_env`] with the environment passed in, so it can be tested without
    /// mutating the process environment.
    fn from_values(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        our_pid: u32,
    ) -> Notifier {
        let Some(notify_socket) = notify_socket.filter(|value| !value.is_empty()) else {
            return Notifier::disabled();
        };
        let Some(target) = parse_notify_socket(notify_socket) else {
            tracing::warn!(
                notify_socket = %notify_socket.to_string_lossy(),
                "NOTIFY_SOCKET is neither an absolute path nor @abstract; \
                 not notifying the service manager"
            );
            return Notifier::disabled();
        };
        let watchdog_interval = watchdog_interval(watchdog_usec, watchdog_pid, our_pid);
        Notifier::enabled(target, watchdog_interval)
    }

    fn enabled(target: Target, watchdog_interval: Option<Duration>) -> Notifier {
        Notifier {
            inner: Some(Arc::new(Inner {
                target,
                watchdog_interval,
                warned: Mutex::new(Vec::new()),
            })),
        }
    }

    /// Sends `states` as one datagram, one `KEY=value` per line.
    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(inner) = &self.inner else {
            return;
        };
        let message = states
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        if let Err(error) = send_datagram(&inner.target, message.as_bytes()) {
            self.warn_once(&error, &message);
        }
    }

    fn warn_once(&self, error: &io::Error, message: &str) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut warned = inner.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.contains(&error.kind()) {
            return;
        }
        warned.push(error.kind());
        // Only the first field: a STATUS line can be long and says nothing about the failure.
        let what = message.split(['=', '\n']).next().unwrap_or_default();
        tracing::warn!(
            target = ?inner.target,
            notification = what,
            %error,
            "cannot notify the service manager; further errors of this kind are not logged"
        );
    }
}

/// Sends one datagram from a fresh unbound socket, as `sd_notify(3)` does. A socket kept
/// connected across calls would break when systemd re-executes and recreates its socket.
fn send_datagram(target: &Target, message: &[u8]) -> io::Result<()> {
    let address = match target {
        Target::Path(path) => SocketAddr::from_pathname(path)?,
        Target::Abstract(name) => abstract_address(name)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = socket.send_to_addr(message, &address)?;
    if sent == message.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram truncated",
        ))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// Parses `NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract socket. Anything else
/// (relative paths, `vsock:` addresses of systemd 253+) is not supported and yields `None`.
fn parse_notify_socket(value: &OsStr) -> Option<Target> {
    let bytes = value.as_bytes();
    match bytes.first()? {
        b'/' => Some(Target::Path(PathBuf::from(value))),
        b'@' if bytes.len() > 1 => Some(Target::Abstract(bytes[1..].to_vec())),
        _ => None,
    }
}

/// Half of `WATCHDOG_USEC`, if it is a positive number of microseconds and `WATCHDOG_PID` is
/// unset or names `our_pid`. Unparsable values count as "no watchdog", like
/// `sd_watchdog_enabled(3)`, which reports them as errors its callers treat as disabled.
fn watchdog_interval(
    watchdog_usec: Option<&OsStr>,
    watchdog_pid: Option<&OsStr>,
    our_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = watchdog_pid {
        let pid: u32 = pid.to_str()?.parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    let usec: u64 = watchdog_usec?.to_str()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

/// Makes `line` a single status line of at most [`MAX_STATUS_BYTES`]: a newline would start a
/// new `KEY=value` field in the datagram.
fn one_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(MAX_STATUS_BYTES));
    for c in line.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_STATUS_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the service manager: a datagram socket bound in a temporary directory.
    struct FakeManager {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl FakeManager {
        fn new() -> FakeManager {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).expect("bind notify socket");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("set read timeout");
            FakeManager {
                _dir: dir,
                path,
                socket,
            }
        }

        fn recv(&self) -> String {
            let mut buf = [0u8; 8192];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).expect("utf-8 notification")
        }

        fn assert_nothing_pending(&self) {
            self.socket.set_nonblocking(true).expect("set nonblocking");
            let mut buf = [0u8; 8192];
            match self.socket.recv(&mut buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("expected no notification, got {other:?}"),
            }
        }
    }

    fn os(value: &str) -> Option<&OsStr> {
        Some(OsStr::new(value))
    }

    #[test]
    fn each_call_sends_exactly_its_datagram() {
        let manager = FakeManager::new();
        let notifier = Notifier::to_socket(&manager.path);

        notifier.ready();
        notifier.status("queue 3, golioth up, netneural backing off");
        notifier.watchdog();
        notifier.stopping();

        assert_eq!(manager.recv(), "READY=1");
        assert_eq!(
            manager.recv(),
            "STATUS=queue 3, golioth up, netneural backing off"
        );
        assert_eq!(manager.recv(), "WATCHDOG=1");
        assert_eq!(manager.recv(), "STOPPING=1");
        manager.assert_nothing_pending();
    }

    #[test]
    fn clones_send_to_the_same_manager() {
        let manager = FakeManager::new();
        let notifier = Notifier::to_socket(&manager.path);
        let clone = notifier.clone();

        clone.watchdog();

        assert_eq!(manager.recv(), "WATCHDOG=1");
    }

    #[test]
    fn status_never_spans_lines() {
        let manager = FakeManager::new();
        let notifier = Notifier::to_socket(&manager.path);

        notifier.status("queue 3\ncloud down\r\nREADY=1");

        assert_eq!(manager.recv(), "STATUS=queue 3 cloud down  READY=1");
    }

    #[test]
    fn an_overlong_status_is_cut_on_a_character_boundary() {
        let manager = FakeManager::new();
        let notifier = Notifier::to_socket(&manager.path);

        notifier.status(&"é".repeat(MAX_STATUS_BYTES));

        let received = manager.recv();
        let text = received.strip_prefix("STATUS=").expect("a status");
        assert_eq!(text, "é".repeat(MAX_STATUS_BYTES / 2));
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let manager = FakeManager::new();
        let notifier = Notifier::to_socket(&manager.path);

        notifier.reloading();

        let received = manager.recv();
        let mut lines = received.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec = lines
            .next()
            .and_then(|line| line.strip_prefix("MONOTONIC_USEC="))
            .expect("a MONOTONIC_USEC line");
        assert!(usec.parse::<u64>().expect("a number") > 0);
        assert_eq!(lines.next(), None);
    }

    #[test]
    fn a_disabled_notifier_sends_nothing() {
        let manager = FakeManager::new();
        let notifier = Notifier::disabled();

        notifier.ready();
        notifier.status("anything");
        notifier.watchdog();
        notifier.reloading();
        notifier.stopping();

        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        manager.assert_nothing_pending();
    }

    #[test]
    fn no_or_empty_notify_socket_means_disabled() {
        for value in [None, os("")] {
            let notifier = Notifier::from_values(value, os("30000000"), None, 42);
            assert!(!notifier.is_enabled());
            assert_eq!(notifier.watchdog_interval(), None);
        }
    }

    #[test]
    fn from_values_reads_the_watchdog() {
        let manager = FakeManager::new();
        let notifier =
            Notifier::from_values(Some(manager.path.as_os_str()), os("30000000"), os("42"), 42);

        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(15)));
        notifier.ready();
        assert_eq!(manager.recv(), "READY=1");
    }

    #[test]
    fn notify_socket_forms() {
        let cases: [(&str, Option<Target>); 6] = [
            (
                "/run/systemd/notify",
                Some(Target::Path("/run/systemd/notify".into())),
            ),
            ("@sd-notify", Some(Target::Abstract(b"sd-notify".to_vec()))),
            ("@", None),
            ("relative/notify", None),
            ("vsock:2:1234", None),
            ("", None),
        ];
        for (value, expected) in cases {
            assert_eq!(
                parse_notify_socket(OsStr::new(value)),
                expected,
                "{value:?}"
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets_work() {
        use std::os::linux::net::SocketAddrExt;

        let name = format!("nn-gateway-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let receiver = UnixDatagram::bind_addr(&address).expect("bind abstract socket");
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set read timeout");
        let value = format!("@{name}");
        let notifier = Notifier::from_values(os(&value), None, None, 1);

        notifier.ready();

        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("a notification");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_missing_socket_is_warned_about_once_and_never_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let notifier = Notifier::to_socket(dir.path().join("nobody-listens"));

        notifier.ready();
        notifier.watchdog();
        notifier.clone().watchdog();

        let inner = notifier.inner.as_ref().expect("enabled");
        let warned = inner.warned.lock().expect("not poisoned");
        assert_eq!(*warned, vec![io::ErrorKind::NotFound]);
    }

    #[test]
    fn watchdog_interval_rules() {
        let cases: [(Option<&str>, Option<&str>, Option<Duration>); 9] = [
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("42"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("7"), None),
            (Some("30000000"), Some("not-a-pid"), None),
            (Some("1"), None, Some(Duration::from_nanos(500))),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("30s"), None, None),
            (None, Some("42"), None),
        ];
        for (usec, pid, expected) in cases {
            assert_eq!(
                watchdog_interval(usec.map(OsStr::new), pid.map(OsStr::new), 42),
                expected,
                "WATCHDOG_USEC={usec:?} WATCHDOG_PID={pid:?}"
            );
        }
    }
}
