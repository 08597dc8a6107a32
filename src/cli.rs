//! Operator commands. Each opens the database on its own connection (WAL lets it work while
//! the daemon runs) and prints for people, or JSON with `--json`.

mod sync;

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::model::{DeviceKey, Origin};
use crate::store::{Db, OpenOptions, Status, StoreError};
pub use sync::{ConflictCommandError, conflict, conflicts, resolve, sync_log, sync_now};

/// Where the shipped unit keeps the daemon's state (`StateDirectory=nn-gateway`).
pub const STATE_DIRECTORIES: &[&str] = &["/var/lib/nn-gateway"];

/// The database an operator command opens. The daemon resolves a relative `storage.path`
/// against systemd's `$STATE_DIRECTORY` (already applied to `configured` when it is set) or
/// else its working directory; an operator's shell has neither the unit's environment nor,
/// usually, its directory. So a relative path that names no file here is looked for in the
/// unit's state directories, and the first one holding it is used. Otherwise the path stays
/// as it is (and commands that need the file say it is missing: none creates one).
pub fn locate_database(configured: &Path, state_dirs: &[&str]) -> std::path::PathBuf {
    if configured.is_absolute() || configured.exists() {
        return configured.to_owned();
    }
    state_dirs
        .iter()
        .map(|d| Path::new(d).join(configured))
        .find(|p| p.exists())
        .unwrap_or_else(|| configured.to_owned())
}

/// Human-readable byte count.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn render_status(s: &Status, running: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "database       {} (schema {})",
        s.path.display(),
        s.schema_version
    );
    let _ = writeln!(out, "daemon         {}", daemon(running, s.daemon.as_ref()));
    let _ = writeln!(
        out,
        "size           {} + {} WAL, {} in use",
        bytes(s.db_bytes),
        bytes(s.wal_bytes),
        bytes(s.used_bytes)
    );
    let _ = writeln!(out, "devices        {}", s.devices);
    let _ = writeln!(out, "reported docs  {}", s.reported_states);
    let _ = writeln!(out, "telemetry      {} points", s.telemetry_points);
    if s.telemetry_dropped_undelivered > 0 {
        let _ = writeln!(
            out,
            "               {} deleted undelivered at the size ceiling (storage.max_size_mib)",
            s.telemetry_dropped_undelivered
        );
    }
    let _ = writeln!(
        out,
        "desired        {} not yet acknowledged by the broker",
        s.desired_unpublished
    );
    let _ = writeln!(
        out,
        "rejected       {} total, {} kept (nn-gateway rejected)",
        s.rejected_total, s.rejected_kept
    );
    let _ = writeln!(
        out,
        "redeliveries   {} recognised as already stored",
        s.redeliveries_total
    );
    let _ = writeln!(out, "conflicts      {} pending", s.conflicts_pending);
    if let Some(run) = &s.sync_last_run {
        let errors = run["errors"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "last sync      {}: {} devices, {} taken, {} pushed ({} failed), {} conflicts, {} ms{}",
            run["at"].as_str().unwrap_or("?"),
            run["devices"],
            run["taken"],
            run["pushed"],
            run["push_failed"],
            run["conflicts"],
            run["duration_ms"],
            if errors > 0 {
                format!(", {errors} errors (see `nn-gateway sync-log`)")
            } else {
                String::new()
            }
        );
    }
    if let Some(b) = s.daemon.as_ref().filter(|b| running && !b.stopped) {
        for (target, c) in &b.clouds {
            let ago = |t: i64| {
                let secs = (crate::model::UnixMillis::now().0 - t).max(0) / 1000;
                format!("{secs}s ago")
            };
            let _ = writeln!(
                out,
                "{:<14} {}; last success {}{}",
                target.as_str(),
                c.state.as_str(),
                c.last_success_at.map_or("never".to_owned(), ago),
                match (&c.last_error, c.last_error_at) {
                    (Some(e), Some(at)) => format!("; last error {}: {e}", ago(at)),
                    _ => String::new(),
                }
            );
        }
    }
    if s.outbox.is_empty() {
        let _ = writeln!(out, "outbox         empty");
    } else {
        let _ = writeln!(out, "outbox");
        for c in &s.outbox {
            let _ = writeln!(out, "  {:<10} {:<10} {}", c.target, c.state, c.rows);
        }
    }
    for (target, n) in &s.telemetry_backlog {
        let _ = writeln!(out, "telemetry owed {n} points to {target}");
    }
    if s.telemetry_dead > 0 {
        let _ = writeln!(
            out,
            "telemetry dead {} points refused by a cloud (nn-gateway queue)",
            s.telemetry_dead
        );
    }
    out
}

/// `nn-gateway queue`: telemetry backlog per cloud, then the rows in flight, dead and pending.
pub fn queue(path: &Path, limit: usize, json: bool) -> Result<String, StoreError> {
    let view = Db::open_readonly(path)?.queue(limit)?;
    if json {
        return Ok(to_json(&view));
    }
    let mut out = String::new();
    for (target, n) in &view.telemetry_backlog {
        let _ = writeln!(out, "{target}: {n} telemetry points owed");
    }
    if view.rows.is_empty() {
        let _ = writeln!(out, "no outbox rows");
    }
    for r in &view.rows {
        let _ = writeln!(
            out,
            "{:>8} {:<10} {:<16} {:<20} {:<10} attempts {}{}{}",
            // Dead telemetry points are numbered by their telemetry id, not a row id:
            // `queue retry ID` takes rows; points go back with `--all-dead`.
            if r.kind == "telemetry point" {
                format!("p{}", r.id)
            } else {
                r.id.to_string()
            },
            r.target,
            r.kind,
            r.device,
            r.state,
            r.attempts,
            r.next_attempt_at
                .as_ref()
                .map(|t| format!(", next {t}"))
                .unwrap_or_default(),
            r.last_error
                .as_ref()
                .map(|e| format!("\n         last error: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(out)
}

/// `nn-gateway queue retry ID|--all-dead`: dead rows (and dead-lettered telemetry) go back to
/// pending; the running daemon sends them within its idle recheck.
pub fn queue_retry(path: &Path, which: crate::store::Requeue) -> Result<String, StoreError> {
    let mut db = open_writable(path)?;
    let n = db.requeue(which)?;
    Ok(match which {
        crate::store::Requeue::Row(id) if n == 0 => {
            format!("no dead or pending outbox row {id}\n")
        }
        _ => format!("{n} re-queued\n"),
    })
}

/// The daemon line of `status`: whether it runs comes from its lock, the rest from its last
/// heartbeat.
fn daemon(running: bool, beat: Option<&crate::store::DaemonBeat>) -> String {
    let now = crate::model::UnixMillis::now();
    let ago = |b: &crate::store::DaemonBeat| (now.0 - b.at).max(0) / 1000;
    match (running, beat) {
        (true, Some(b)) if !b.stopped => {
            let why = b
                .mqtt_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!(
                "running (pid {}, heartbeat {}s ago), mqtt {}{why}",
                b.pid,
                ago(b),
                b.mqtt
            )
        }
        (true, _) => "running (starting up)".to_owned(),
        (false, None) => "not running; never ran on this database".to_owned(),
        (false, Some(b)) if b.stopped => format!("not running; stopped cleanly {}s ago", ago(b)),
        (false, Some(b)) => format!(
            "not running; last heartbeat {}s ago from pid {}, without a clean stop (crashed or killed?)",
            ago(b),
            b.pid
        ),
    }
}

/// `nn-gateway status`.
pub fn status(path: &Path, json: bool) -> Result<String, StoreError> {
    let view = crate::view::status(
        &Db::open_readonly(path)?,
        crate::store::daemon_running(path),
    )?;
    Ok(if json {
        to_json(&view)
    } else {
        render_status(&view.status, view.daemon_running)
    })
}

/// `nn-gateway devices`.
pub fn devices(path: &Path, json: bool) -> Result<String, StoreError> {
    let devices = Db::open_readonly(path)?.devices()?;
    if json {
        return Ok(to_json(&devices));
    }
    let mut out = String::new();
    if devices.is_empty() {
        out.push_str("no devices yet\n");
    }
    for d in &devices {
        let last = d
            .last_seen
            .map_or_else(|| "never".to_owned(), |t| t.to_rfc3339());
        let _ = writeln!(
            out,
            "{}  (via {}, last seen {}, {} telemetry points)",
            d.key, d.origin, last, d.telemetry_points
        );
        let _ = writeln!(
            out,
            "  reported: {}",
            doc(d.reported.as_ref(), d.reported_version)
        );
        let _ = writeln!(
            out,
            "  desired:  {}",
            doc(d.desired.as_ref(), d.desired_version)
        );
        if !d.removed_from.is_empty() {
            let _ = writeln!(
                out,
                "  REMOVED in {} (kept here with its data)",
                d.removed_from.join(", ")
            );
        }
    }
    Ok(out)
}

fn doc(value: Option<&Value>, version: Option<i64>) -> String {
    match (value, version) {
        (Some(v), Some(n)) => format!("{v} (v{n})"),
        _ => "-".to_owned(),
    }
}

/// `--since` of `nn-gateway telemetry`: a duration back from now ("1h", "30m") or an RFC 3339
/// time.
///
/// # Errors
/// A sentence naming the value and the two forms.
pub fn parse_since(
    raw: &str,
    now: crate::model::UnixMillis,
) -> Result<crate::model::UnixMillis, String> {
    if let Ok(d) = humantime::parse_duration(raw) {
        let back = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(crate::model::UnixMillis(now.0.saturating_sub(back)));
    }
    time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map(|t| crate::model::UnixMillis((t.unix_timestamp_nanos() / 1_000_000) as i64))
        .map_err(|_| {
            format!("--since {raw:?}: give a duration back from now (\"1h\", \"30m\") or an RFC 3339 time (\"2026-12-03T10:00:00Z\")")
        })
}

/// `nn-gateway telemetry DEVICE`: its newest points, newest first.
///
/// # Errors
/// An unknown device, a bad key, or the store's error.
pub fn telemetry(
    path: &Path,
    device: &str,
    since: Option<crate::model::UnixMillis>,
    limit: usize,
    json: bool,
) -> Result<String, DeviceCommandError> {
    let key = DeviceKey::parse(device).map_err(DeviceCommandError::Device)?;
    let db = Db::open_readonly(path)?;
    if !db.device_exists(&key)? {
        return Err(DeviceCommandError::Unknown(key.to_string()));
    }
    let points = db.telemetry_of(&key, since, limit)?;
    if json {
        return Ok(to_json(&points));
    }
    let mut out = String::new();
    if points.is_empty() {
        out.push_str("no telemetry points\n");
    }
    for p in &points {
        let _ = writeln!(
            out,
            "{}  {}{}",
            p.received_at.to_rfc3339(),
            p.payload,
            p.device_ts
                .map(|t| format!("  (device time {})", t.to_rfc3339()))
                .unwrap_or_default()
        );
    }
    Ok(out)
}

/// `nn-gateway rejected`.
pub fn rejected(path: &Path, limit: usize, json: bool) -> Result<String, StoreError> {
    let rows = Db::open_readonly(path)?.rejected(limit)?;
    if json {
        return Ok(to_json(&rows));
    }
    let mut out = String::new();
    if rows.is_empty() && limit == 0 {
        out.push_str("nothing shown with --limit 0\n");
    } else if rows.is_empty() {
        out.push_str("no rejected messages kept\n");
    }
    for r in &rows {
        let _ = writeln!(
            out,
            "{}  {} {}  device={}  {} bytes\n  reason: {}\n  payload: {:?}",
            r.received_at.to_rfc3339(),
            r.origin,
            r.locator,
            r.device.as_deref().unwrap_or("-"),
            r.size,
            r.reason,
            r.excerpt
        );
    }
    Ok(out)
}

/// Why `desired set` refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCommandError {
    #[error("{0}")]
    Device(String),
    #[error(
        "no device {0} in the database; check the key (nn-gateway devices) or pass --create to make a new one"
    )]
    Unknown(String),
    #[error("desired document is not valid JSON: {0}")]
    Json(String),
    #[error("desired document must be a JSON object, got {0}")]
    NotObject(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `nn-gateway desired set DEVICE JSON [--create]`: the local operator's edit. The running
/// daemon publishes it at its next downlink poll. A device the gateway does not know is refused
/// unless `create` (a typo must not make a phantom device with a retained message); a missing
/// database is refused, never created.
pub fn set_desired(
    path: &Path,
    device: &str,
    json: &str,
    create: bool,
) -> Result<String, DeviceCommandError> {
    let key = DeviceKey::parse(device).map_err(DeviceCommandError::Device)?;
    let doc: Value =
        serde_json::from_str(json).map_err(|e| DeviceCommandError::Json(e.to_string()))?;
    if !doc.is_object() {
        return Err(DeviceCommandError::NotObject(doc.to_string()));
    }
    let mut db = open_writable(path)?;
    if !create && !db.device_exists(&key)? {
        return Err(DeviceCommandError::Unknown(key.to_string()));
    }
    let stored = db.set_desired(&key, &doc, Origin::Local)?;
    let mut out = format!(
        "desired state of {} is now version {}: {}\n",
        stored.device, stored.version, stored.doc
    );
    out.push_str(&sync::nudge(path));
    Ok(out)
}

/// Opens an existing database for an operator's write (never creates one).
fn open_writable(path: &Path) -> Result<Db, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Open {
            path: path.to_owned(),
            reason: format!(
                "no database here (nor in {}); start the daemon (nn-gateway run) first, or give the daemon's config with -c, or an absolute [storage] path",
                STATE_DIRECTORIES.join(", ")
            ),
        });
    }
    Db::open(
        path,
        &OpenOptions {
            synchronous: crate::config::Synchronous::Full,
            targets: Vec::new(),
            rejected_keep: 0,
        },
    )
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UnixMillis;

    #[test]
    fn a_relative_database_path_is_found_in_the_units_state_directory() {
        let here = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let rel = Path::new("data/gateway.db");
        let dirs = [state.path().to_str().unwrap()];
        // Nowhere yet: the path as configured (the command then says it is missing).
        assert_eq!(locate_database(rel, &dirs), rel);
        std::fs::create_dir_all(state.path().join("data")).unwrap();
        std::fs::write(state.path().join(rel), b"").unwrap();
        assert_eq!(locate_database(rel, &dirs), state.path().join(rel));
        // An absolute path is taken as it is.
        let abs = here.path().join("x.db");
        assert_eq!(locate_database(&abs, &dirs), abs);
    }

    #[test]
    fn since_takes_a_duration_back_from_now_or_an_rfc3339_time() {
        let now = UnixMillis(1_700_000_000_000);
        assert_eq!(parse_since("1h", now), Ok(UnixMillis(now.0 - 3_600_000)));
        assert_eq!(
            parse_since("2023-11-14T22:13:20.123Z", now),
            Ok(UnixMillis(1_700_000_000_123))
        );
        let e = parse_since("yesterday", now).unwrap_err();
        assert!(e.contains("\"yesterday\"") && e.contains("1h"), "{e}");
    }
}
