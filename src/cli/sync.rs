//! Operator commands of the reconciliation: conflicts (list, show, resolve), `sync now` and
//! the sync log.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{open_writable, to_json};
use crate::store::sync::{ConflictView, Resolution, ResolveError, SyncLogView};
use crate::store::{Db, StoreError};

/// A conflict command that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ConflictCommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("--value is not JSON ({0}); e.g. --value '\"on\"' or --value '{{\"interval\":30}}'")]
    Json(String),
    #[error("say which value wins: --use local, --use remote, or --value JSON")]
    NoChoice,
}

fn show(v: &Option<Value>) -> String {
    v.as_ref()
        .map_or_else(|| "(absent)".to_owned(), Value::to_string)
}

fn render_conflict(out: &mut String, c: &ConflictView, full: bool) {
    let _ = writeln!(
        out,
        "#{:<5} {:<10} {} {}  {}  local {}  {} {}",
        c.id,
        c.status,
        c.device,
        c.field,
        c.target,
        show(&c.local),
        c.target,
        show(&c.remote)
    );
    if full {
        let _ = writeln!(out, "  base (last agreed)  {}", show(&c.base));
        let _ = writeln!(
            out,
            "  local changed       {}",
            c.local_at.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "  {:<19} {}",
            format!("{} changed", c.target),
            c.remote_at.as_deref().unwrap_or("-")
        );
        let _ = writeln!(out, "  detected            {}", c.detected_at);
        if let Some(s) = &c.strategy {
            let _ = writeln!(out, "  strategy            {s}");
        }
        if c.status != "pending" {
            let _ = writeln!(
                out,
                "  resolved            {} by {} at {}",
                show(&c.resolved_value),
                c.resolved_by.as_deref().unwrap_or("-"),
                c.resolved_at.as_deref().unwrap_or("-")
            );
        }
        if let Some(r) = &c.remote_ref {
            let _ = writeln!(out, "  in NetNeural        device_conflicts {r}");
        }
    }
}

/// `nn-gateway conflicts [--all]`.
pub fn conflicts(path: &Path, all: bool, limit: usize, json: bool) -> Result<String, StoreError> {
    let rows = Db::open_readonly(path)?.conflicts(all, limit)?;
    if json {
        return Ok(to_json(&rows));
    }
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str(if all {
            "no conflicts recorded\n"
        } else {
            "no pending conflicts\n"
        });
    }
    for c in &rows {
        render_conflict(&mut out, c, false);
    }
    Ok(out)
}

/// `nn-gateway conflicts show ID`.
pub fn conflict(path: &Path, id: i64, json: bool) -> Result<String, ConflictCommandError> {
    let c = Db::open_readonly(path)?
        .conflict(id)?
        .ok_or(ResolveError::Unknown(id))?;
    if json {
        return Ok(to_json(&c));
    }
    let mut out = String::new();
    render_conflict(&mut out, &c, true);
    Ok(out)
}

/// `nn-gateway conflicts resolve ID --use local|remote | --value JSON`. The mirror takes the
/// value at once; the running daemon is asked to sync now, which writes it to both clouds
/// (and to NetNeural's `device_conflicts`) and publishes a desired change to the device.
pub fn resolve(
    path: &Path,
    id: i64,
    use_side: Option<&str>,
    value: Option<&str>,
) -> Result<String, ConflictCommandError> {
    let choice = match (use_side, value) {
        (_, Some(raw)) => Resolution::Value(
            serde_json::from_str(raw).map_err(|e| ConflictCommandError::Json(e.to_string()))?,
        ),
        (Some("local"), None) => Resolution::Local,
        (Some("remote"), None) => Resolution::Remote,
        _ => return Err(ConflictCommandError::NoChoice),
    };
    let mut db = open_writable(path)?;
    let by = format!("cli:{}", whoami());
    let done = db.resolve_conflict(id, &choice, &by)??;
    let mut out = format!(
        "conflict #{id} resolved: {} {} = {}\n",
        done.conflict.device,
        done.conflict.field,
        show(&done.value)
    );
    out.push_str(&nudge(path));
    Ok(out)
}

fn whoami() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "operator".into())
}

/// Asks the running daemon to sync now (SIGUSR1); says what happened.
pub(super) fn nudge(path: &Path) -> String {
    match signal_daemon(path) {
        Ok(pid) => format!("asked the daemon (pid {pid}) to sync now\n"),
        Err(why) => format!("{why}; the next scheduled sync run carries it\n"),
    }
}

fn signal_daemon(path: &Path) -> Result<i32, String> {
    if !crate::store::daemon_running(path) {
        return Err("no daemon is running on this database".into());
    }
    let pid: i32 = crate::store::running_daemon_pid(path)
        .and_then(|p| p.parse().ok())
        .ok_or("the daemon's pid is unknown")?;
    // SAFETY: kill(2) with a pid read from the daemon's lock file and a signal the daemon
    // handles; no memory is involved.
    let rc = unsafe { libc::kill(pid, libc::SIGUSR1) };
    if rc == 0 {
        Ok(pid)
    } else {
        Err(format!(
            "cannot signal the daemon (pid {pid}): {} (run as root or as the daemon's user)",
            std::io::Error::last_os_error()
        ))
    }
}

/// `nn-gateway sync now`: signals the daemon and waits (up to `wait`) for the run to finish,
/// then prints what it came to.
pub fn sync_now(path: &Path, wait: Duration) -> Result<String, StoreError> {
    let asked = crate::model::UnixMillis::now().0;
    let pid = signal_daemon(path).map_err(|reason| StoreError::Open {
        path: path.to_owned(),
        reason,
    })?;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        // A run that started after the signal (one in progress when it came may have read
        // the clouds before the edit this command is meant to carry).
        let last = Db::open_readonly(path)?.sync_last_run()?;
        if let Some(run) = last
            && run["started_ms"].as_i64().is_some_and(|t| t >= asked)
        {
            let mut out = format!("sync run done (daemon pid {pid}):\n");
            for key in [
                "devices",
                "imported",
                "taken",
                "pushed",
                "push_failed",
                "conflicts",
                "removed",
                "duration_ms",
            ] {
                let _ = writeln!(out, "  {key:<12} {}", run[key]);
            }
            if let Some(errors) = run["errors"].as_array().filter(|e| !e.is_empty()) {
                for e in errors {
                    let _ = writeln!(out, "  error        {}", e.as_str().unwrap_or_default());
                }
            }
            return Ok(out);
        }
    }
    Ok(format!(
        "asked the daemon (pid {pid}) to sync; no run finished within {}s (see `nn-gateway sync-log`)\n",
        wait.as_secs()
    ))
}

fn render_log(out: &mut String, r: &SyncLogView) {
    let _ = writeln!(
        out,
        "{}  {:<9} {:<18} {:<8} {:<16} n={} conflicts={} {}ms{}{}",
        r.at,
        r.outcome,
        r.target,
        r.operation,
        r.device.as_deref().unwrap_or("-"),
        r.count,
        r.conflicts,
        r.duration_ms,
        r.details
            .as_ref()
            .map(|d| format!("  {d}"))
            .unwrap_or_default(),
        r.error
            .as_ref()
            .map(|e| format!("\n    error: {e}"))
            .unwrap_or_default(),
    );
}

/// `nn-gateway sync-log`.
pub fn sync_log(
    path: &Path,
    target: Option<&str>,
    outcome: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<String, StoreError> {
    let rows = Db::open_readonly(path)?.sync_log(target, outcome, None, limit)?;
    if json {
        return Ok(to_json(&rows));
    }
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no sync log rows\n");
    }
    for r in &rows {
        render_log(&mut out, r);
    }
    Ok(out)
}
