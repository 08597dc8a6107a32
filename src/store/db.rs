//! [`Db`], a plain rusqlite connection: opening and migrations, the group commit's transaction
//! (its statements are in `write.rs`), status, rejections and the heartbeat. Each other
//! aggregate's SQL sits in its own file, also on `Db`: devices and desired state
//! (`devices.rs`), the outbox and telemetry cursors ([`super::outbox`]), retention
//! ([`super::retention`]).
//!
//! Blocking. Inside the daemon a `Db` lives on the store thread ([`super::Store`]); the
//! operator CLI opens its own `Db` on the same file (WAL lets both work at once).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::StoreError;
use super::views::{DaemonBeat, OutboxCount, RejectedView, Status};
use super::write::{Group, Writer, is_poison, trim_rejected};
use crate::config::Synchronous;
use crate::model::{Outcome, Reading, RejectCause, Rejection, Target, UnixMillis, WriteOp};

/// Migrations, in order; `PRAGMA user_version` counts how many are applied.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_telemetry_cursor.sql"),
    include_str!("migrations/0003_reconcile.sql"),
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Options fixed when the database is opened by the daemon.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub synchronous: Synchronous,
    /// Clouds that get outbox rows.
    pub targets: Vec<Target>,
    pub rejected_keep: u32,
}

pub struct Db {
    pub(super) conn: Connection,
    path: PathBuf,
    targets: Vec<Target>,
    rejected_keep: u32,
    /// Random per database, prefix of telemetry idempotency keys.
    install_id: String,
    /// Counts MQTT deliveries recorded in `mqtt_inbound` (see [`DEDUP_SPAN`]).
    mqtt_seq: i64,
}

impl Db {
    /// Opens (creating if needed) and migrates the database.
    ///
    /// # Errors
    /// When the file cannot be opened, was written by a newer version, or a migration fails.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Db, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_owned(),
                reason: format!("cannot create directory {}: {e}", dir.display()),
            })?;
        }
        let conn = Connection::open(path).map_err(|e| StoreError::open(path, e))?;
        // Another process may hold the write lock (migrating, or committing a batch).
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| StoreError::open(path, e))?;
        let deadline = Instant::now() + BUSY_TIMEOUT;
        // Check the version before any statement that writes (even journal_mode does).
        let found = user_version(&conn).map_err(|e| StoreError::open(path, e))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_owned(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        // On a file still in rollback mode this upgrades the statement's read lock to an
        // exclusive one. SQLite does not run the busy handler for such an upgrade (waiting
        // could deadlock with another reader doing the same), so when another connection opens
        // the same fresh file at once this fails with "database is locked" at the first try.
        // Try again until the busy timeout is spent: once one of them has switched the file
        // to WAL, the others find it switched.
        retry_locked(deadline, || conn.pragma_update(None, "journal_mode", "WAL"))
            .map_err(|e| StoreError::open(path, e))?;
        let sync = match opts.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(|e| StoreError::open(path, e))?;
        // Truncate the WAL after checkpoints instead of leaving it at its high-water mark.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(|e| StoreError::open(path, e))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| StoreError::open(path, e))?;
        let mut db = Db {
            conn,
            path: path.to_owned(),
            targets: opts.targets.clone(),
            rejected_keep: opts.rejected_keep,
            install_id: String::new(),
            mqtt_seq: 0,
        };
        db.migrate(found)?;
        db.ensure_telemetry_cursors()?;
        db.install_id = db.meta("install_id")?.unwrap_or_default();
        db.mqtt_seq =
            db.conn
                .query_row("SELECT coalesce(max(seq), 0) FROM mqtt_inbound", [], |r| {
                    r.get(0)
                })?;
        Ok(db)
    }

    /// Opens an existing database without writing to it (operator commands).
    ///
    /// # Errors
    /// When the file is missing, unreadable, or of another schema version.
    pub fn open_readonly(path: &Path) -> Result<Db, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Open {
                path: path.to_owned(),
                reason: "no database here yet; start the daemon (nn-gateway run) first, or check [storage] path".into(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::open(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| StoreError::open(path, e))?;
        let found = user_version(&conn).map_err(|e| StoreError::open(path, e))?;
        if found != SCHEMA_VERSION {
            return Err(StoreError::Open {
                path: path.to_owned(),
                reason: format!(
                    "schema version {found}, this build reads {SCHEMA_VERSION}; run the matching nn-gateway"
                ),
            });
        }
        let mut db = Db {
            conn,
            path: path.to_owned(),
            targets: Vec::new(),
            rejected_keep: 0,
            install_id: String::new(),
            mqtt_seq: 0,
        };
        db.install_id = db.meta("install_id")?.unwrap_or_default();
        Ok(db)
    }

    /// Applies the missing migrations, each in an IMMEDIATE transaction that re-reads the
    /// version first, so two processes opening a fresh file at once (the daemon and an operator
    /// command) cannot both apply the same migration.
    fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            let version = i as i64 + 1;
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if user_version(&tx)? >= version {
                continue;
            }
            tx.execute_batch(sql)
                .map_err(|e| StoreError::Migration { version, source: e })?;
            if version == 1 {
                let id = format!("{:016x}", fastrand::u64(..));
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES ('install_id', ?1)",
                    [id],
                )?;
            }
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(path = %self.path.display(), version, "applied database migration");
        }
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// The raw connection, for tests that need to arrange unusual states.
    #[cfg(test)]
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The clouds this database owes data to (those enabled when the daemon opened it).
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Random per database: the prefix of derived idempotency keys.
    pub fn install_id(&self) -> &str {
        &self.install_id
    }

    /// A write transaction that takes the lock at once, so a commit by another connection in
    /// between cannot turn it into SQLITE_BUSY_SNAPSHOT (which the busy timeout does not cover).
    pub(super) fn write_tx(&mut self) -> rusqlite::Result<rusqlite::Transaction<'_>> {
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
    }

    /// Applies a group of writes in one transaction.
    ///
    /// If the group fails as a whole, the writes are applied one by one, in order, to find the
    /// one at fault. A write that fails alone because of what it carries ([`is_poison`]) is
    /// recorded as a rejection instead, so one poisonous message cannot block the queue. At the
    /// first write that fails for any other reason (a full disk, I/O, a lock, corruption) the
    /// rest are not tried: they fail too ([`StoreError::Held`]), so nothing behind a failed
    /// write is stored before it and per-device order holds when the sender retries.
    ///
    /// # Errors
    /// Per write, the error that kept it from being stored.
    pub fn apply_batch(&mut self, ops: &[WriteOp]) -> Vec<Result<Outcome, StoreError>> {
        let seq_before = self.mqtt_seq;
        let error = match self.apply_together(ops) {
            Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
            Err(e) => e,
        };
        self.mqtt_seq = seq_before;
        if ops.len() == 1 && is_poison(&error) {
            return vec![self.keep_as_rejection(&ops[0], error)];
        }
        if ops.len() == 1 || !is_poison(&error) {
            let first = StoreError::from(error);
            let held = first.to_string();
            let mut results = vec![Err(first)];
            results.extend((1..ops.len()).map(|_| Err(StoreError::Held(held.clone()))));
            return results;
        }
        tracing::warn!(error = %error, writes = ops.len(), "group commit failed; finding the write at fault");
        let mut results = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let result = self.apply_batch(std::slice::from_ref(op)).remove(0);
            let stop = result.is_err();
            results.push(result);
            if stop {
                let held = results[i]
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                results.extend((i + 1..ops.len()).map(|_| Err(StoreError::Held(held.clone()))));
                break;
            }
        }
        results
    }

    fn apply_together(&mut self, ops: &[WriteOp]) -> rusqlite::Result<Vec<Outcome>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut ctx = Writer {
            targets: &self.targets,
            install_id: &self.install_id,
            mqtt_seq: &mut self.mqtt_seq,
        };
        let outcomes = {
            let mut group = Group::new(&tx);
            let outcomes = ops
                .iter()
                .map(|op| ctx.apply(&mut group, op))
                .collect::<Result<Vec<_>, _>>()?;
            group.finish()?;
            outcomes
        };
        trim_rejected(&tx, ops, self.rejected_keep)?;
        tx.commit()?;
        Ok(outcomes)
    }

    /// A single write failed because of what it carries: keep it as a rejection, with the
    /// reading itself, so it is visible and acknowledged instead of being retried forever.
    fn keep_as_rejection(
        &mut self,
        op: &WriteOp,
        error: rusqlite::Error,
    ) -> Result<Outcome, StoreError> {
        let WriteOp::Ingest(msg) = op else {
            return Err(error.into());
        };
        tracing::error!(device = %msg.device, error = %error, "message cannot be stored; kept as rejected");
        let reading = match &msg.reading {
            Reading::State(patch) => Value::Object(patch.clone()),
            Reading::Telemetry(points) => Value::Array(
                points
                    .iter()
                    .map(|p| Value::Object(p.data.clone()))
                    .collect(),
            ),
        };
        let text = reading.to_string().into_bytes();
        let rejection = WriteOp::Reject(Rejection {
            origin: msg.origin,
            device: Some(msg.device.to_string()),
            locator: format!("{} message", msg.origin.as_str()),
            cause: RejectCause::Unstorable,
            reason: format!("cannot be stored: {error}"),
            size: text.len(),
            excerpt: text,
            received_at: msg.received_at,
            mqtt: msg.mqtt,
        });
        let seq_before = self.mqtt_seq;
        match self.apply_together(std::slice::from_ref(&rejection)) {
            Ok(mut outcomes) => Ok(outcomes.remove(0)),
            Err(_) => {
                self.mqtt_seq = seq_before;
                Err(error.into())
            }
        }
    }

    /// Outbox rows per cloud and state (`status`, and the metrics' gauges).
    pub fn outbox_counts(&self) -> Result<Vec<OutboxCount>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT target, state, count(*) FROM outbox GROUP BY target, state ORDER BY target, state",
            )?
            .query_map([], |r| {
                Ok(OutboxCount {
                    target: r.get(0)?,
                    state: r.get(1)?,
                    rows: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?)
    }

    pub fn status(&self) -> Result<Status, StoreError> {
        let c = &self.conn;
        let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
        let outbox = self.outbox_counts()?;
        let file_size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Status {
            path: self.path.clone(),
            schema_version: SCHEMA_VERSION,
            devices: count("SELECT count(*) FROM device WHERE deleted_at IS NULL")?,
            telemetry_points: count("SELECT count(*) FROM telemetry")?,
            reported_states: count("SELECT count(*) FROM reported_state")?,
            desired_unpublished: count(
                "SELECT count(*) FROM desired_state WHERE published_seq < seq",
            )?,
            outbox,
            telemetry_backlog: self.queue(0)?.telemetry_backlog,
            telemetry_dead: count("SELECT count(*) FROM telemetry_dead")?,
            rejected_total: self
                .meta("rejected_total")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            rejected_kept: count("SELECT count(*) FROM rejected")?,
            redeliveries_total: self
                .meta("redeliveries_total")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            conflicts_pending: count("SELECT count(*) FROM conflict WHERE status = 'pending'")?,
            db_bytes: file_size(self.path.clone()),
            wal_bytes: file_size(PathBuf::from(wal)),
            used_bytes: super::retention::used_bytes(&self.conn)?,
            telemetry_dropped_undelivered: self
                .meta("telemetry_dropped_undelivered")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            daemon: self
                .meta("daemon")?
                .and_then(|v| serde_json::from_str(&v).ok()),
            sync_last_run: self.sync_last_run()?,
        })
    }

    /// The newest rejected messages, newest first.
    pub fn rejected(&self, limit: usize) -> Result<Vec<RejectedView>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT received_at, origin, device, locator, reason, size, excerpt FROM rejected
             ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(RejectedView {
                received_at: UnixMillis(r.get(0)?),
                origin: r.get(1)?,
                device: r.get(2)?,
                locator: r.get(3)?,
                reason: r.get(4)?,
                size: r.get(5)?,
                excerpt: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(6)?).into_owned(),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records the daemon's heartbeat (see [`DaemonBeat`]). A write, so a heartbeat that
    /// succeeds proves the store can still commit.
    pub fn record_heartbeat(&mut self, beat: &DaemonBeat) -> Result<(), StoreError> {
        let text = serde_json::to_string(beat).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('daemon', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [text],
        )?;
        Ok(())
    }

    /// Deletes telemetry past its age or beyond the size ceiling (see [`super::retention`]).
    pub fn enforce_retention(
        &mut self,
        policy: &super::retention::Policy,
    ) -> Result<super::retention::Report, StoreError> {
        Ok(super::retention::enforce(
            &mut self.conn,
            policy,
            &self.targets,
        )?)
    }

    /// Folds the WAL back into the main file; used at clean shutdown.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }
}

/// How long opening waits for another connection's lock, in SQLite's busy handler or in
/// [`retry_locked`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `step` until it does not fail with "busy" or "locked", or `deadline` passes: for
/// statements that SQLite fails at once instead of running the busy handler.
fn retry_locked<T>(
    deadline: Instant,
    mut step: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && Instant::now() < deadline =>
            {
                // Jittered, so two openers do not retry in lockstep.
                std::thread::sleep(Duration::from_millis(1 + fastrand::u64(..5)));
            }
            other => return other,
        }
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}
