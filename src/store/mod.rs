//! The SQLite mirror: schema, SQL, and the thread that owns the daemon's connection.
//!
//! SQL lives here in `store/` and nowhere else, one file per aggregate: [`db`] (opening,
//! migrations, status, rejections, heartbeat), `write.rs` (the ingest write path),
//! `devices.rs` (desired state and the device views), [`outbox`] (the rows owed to the
//! clouds), `cursor.rs` (the telemetry cursors and dead letters), [`retention`] (bounded
//! disk) and [`gauges`] (what `/metrics` reads at a scrape), all as methods on or helpers of
//! [`Db`]. Migrations sit beside them in `migrations/`
//! as numbered files.
//! rusqlite blocks, so inside the daemon one dedicated thread owns the connection and the
//! async side talks to it through [`Store`], a cheap cloneable handle over a bounded channel.
//!
//! **Group commit.** Ingest writes queue up while a transaction commits; the thread then takes
//! everything waiting (up to [`MAX_BATCH`]) into the next transaction and answers each write
//! only after that commit. Callers acknowledge a message to its device only after their answer
//! arrives, so a crash at any instant loses nothing that was acknowledged, and one fsync
//! covers a whole batch.

mod conflict;
mod cursor;
pub mod db;
mod devices;
mod doc;
pub mod gauges;
pub mod outbox;
pub mod retention;
pub mod sync;
mod sync_log;
#[cfg(test)]
mod tests;
pub mod views;
mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::model::{Outcome, WriteOp};

pub use db::{Db, OpenOptions, SCHEMA_VERSION};
pub use gauges::{Gauges, TelemetryBacklog};
pub use outbox::{DeviceIdent, OutboxRow, QueueRow, QueueView, Requeue, TelemetryItem};
pub use views::{DaemonBeat, DeviceLinks, DeviceView, RejectedView, Status, TelemetryView};
pub use write::DEDUP_SPAN;

/// Most writes committed in one transaction. Large enough that one fsync (with
/// `synchronous = full`) is spread over many messages, small enough that a batch commits in
/// milliseconds and the first message in it is not kept waiting.
pub const MAX_BATCH: usize = 1000;

/// Capacity of the channel to the store thread. Senders wait when it is full, which is the
/// back-pressure that slows MQTT reads and makes CoAP answer 5.03.
pub const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "database {path} has schema version {found}, newer than this build knows ({known}); \
         it was written by a newer nn-gateway and is left untouched: run that version or restore a backup"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database migration {version} failed: {source}")]
    Migration {
        version: i64,
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database content is not what this build expects: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    #[error("not stored, held back behind an earlier write that failed ({0}); it will be retried")]
    Held(String),
}

impl StoreError {
    fn open(path: &std::path::Path, e: rusqlite::Error) -> StoreError {
        StoreError::Open {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    }

    /// The disk (or the database's size limit) is full: the write can succeed later.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DiskFull)
    }

    /// Whether the same work can succeed later without anyone fixing anything: a full disk
    /// (retention or the operator frees space), a busy or locked database, an I/O error, memory,
    /// a write held back behind one of those. Not transient: a corrupt or foreign file, a
    /// schema newer than this build, a failed migration, a value SQLite refuses, a read-only
    /// or forbidden file, a closed store. (The store's counterpart of
    /// [`crate::cloud::CloudError::is_retryable`].)
    ///
    /// An [`StoreError::Open`] failure counts as not transient: opening happens once, at
    /// start-up, and it is systemd's `Restart=` that tries again, not the daemon.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                C::DiskFull
                    | C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::FileLockingProtocolFailed
                    | C::OutOfMemory
                    | C::OperationInterrupted
                    | C::SchemaChanged
            ),
            StoreError::Held(_) => true,
            StoreError::Sqlite(_)
            | StoreError::Open { .. }
            | StoreError::NewerSchema { .. }
            | StoreError::Migration { .. }
            | StoreError::Corrupt(_)
            | StoreError::Closed => false,
        }
    }
}

/// The lock file beside a database.
fn lock_path(path: &std::path::Path) -> PathBuf {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    PathBuf::from(lock_path)
}

/// Whether a daemon holds the database (its lock file is locked). Takes no lock that lasts and
/// writes nothing, so operator commands can ask while the daemon runs.
pub fn daemon_running(path: &std::path::Path) -> bool {
    match std::fs::File::open(lock_path(path)) {
        Ok(file) => matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        ),
        Err(_) => false,
    }
}

/// The pid a running daemon wrote into the database's lock file, if a daemon holds it.
pub fn running_daemon_pid(path: &std::path::Path) -> Option<String> {
    if !daemon_running(path) {
        return None;
    }
    let pid = std::fs::read_to_string(lock_path(path)).unwrap_or_default();
    Some(pid.trim().to_owned())
}

/// Takes `<database>.lock` exclusively, for as long as the returned file is open: one daemon
/// per database. Two would ingest the same broker session twice over and fight over its client
/// id. Operator commands do not take it; WAL lets them work beside the daemon.
fn lock_exclusive(path: &std::path::Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let lock_path = lock_path(path);
    let fail = |reason: String| StoreError::Open {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create directory {}: {e}", dir.display())))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            fail(format!(
                "cannot open lock file {}: {e}",
                lock_path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => {
            // The pid is for the message another instance prints; the lock is what counts.
            let _ = file.set_len(0);
            let _ = write!(file, "{}", std::process::id());
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.rewind();
            let _ = file.read_to_string(&mut pid);
            Err(fail(format!(
                "another nn-gateway (pid {}) is running on this database; stop it first",
                pid.trim()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(fail(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}

type Call = Box<dyn FnOnce(&mut Db) + Send>;

type Reply = oneshot::Sender<Result<Outcome, StoreError>>;

enum Job {
    /// A write, the ordered stream it belongs to, and where its answer goes.
    Write(WriteOp, Option<u64>, Reply),
    Call(Call),
    Close(oneshot::Sender<()>),
}

/// One outbox bell per cloud, rung by the store thread after every commit that stored
/// something owed to that cloud. A bell only wakes its lane; the lane reads the work itself.
#[derive(Debug)]
pub struct Bells {
    golioth: Arc<tokio::sync::Notify>,
    netneural: Arc<tokio::sync::Notify>,
    targets: Vec<crate::model::Target>,
}

impl Bells {
    pub fn of(&self, target: crate::model::Target) -> Arc<tokio::sync::Notify> {
        match target {
            crate::model::Target::Golioth => self.golioth.clone(),
            crate::model::Target::NetNeural => self.netneural.clone(),
        }
    }

    /// Rings the clouds owed something by these stored writes: reported state goes to every
    /// cloud, telemetry only to those that take it (Golioth's lane is not woken by telemetry).
    fn ring<'a>(&self, stored: impl Iterator<Item = &'a WriteOp>) {
        let (mut state, mut telemetry) = (false, false);
        for op in stored {
            if let WriteOp::Ingest(msg) = op {
                match msg.reading {
                    crate::model::Reading::State(_) => state = true,
                    crate::model::Reading::Telemetry(_) => telemetry = true,
                }
            }
        }
        for t in &self.targets {
            if state || (telemetry && t.takes_telemetry()) {
                self.of(*t).notify_one();
            }
        }
    }
}

/// Handle to the store thread. Clone it freely.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    healthy: Arc<AtomicBool>,
    bells: Arc<Bells>,
}

/// A write handed to the store, not yet answered. Await it for the commit that holds it.
///
/// # Cancel safety
/// Dropping it does not undo the write; only the answer is lost.
pub struct PendingWrite(oneshot::Receiver<Result<Outcome, StoreError>>);

impl PendingWrite {
    /// Waits for the commit that holds this write.
    pub async fn committed(self) -> Result<Outcome, StoreError> {
        self.await
    }

    /// The answer, if the commit has already happened.
    pub fn try_take(&mut self) -> Option<Result<Outcome, StoreError>> {
        match self.0.try_recv() {
            Ok(result) => Some(result),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(StoreError::Closed)),
        }
    }
}

impl std::future::Future for PendingWrite {
    type Output = Result<Outcome, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

impl Store {
    /// Opens the database (blocking: migrations run here) and starts the store thread, which
    /// counts its commits into a registry of its own (see [`Store::open_with_metrics`]).
    ///
    /// # Errors
    /// See [`Db::open`].
    pub fn open(path: &std::path::Path, opts: &OpenOptions) -> Result<Store, StoreError> {
        Store::open_with_metrics(path, opts, Metrics::new())
    }

    /// [`Store::open`], the store thread counting each group commit into `metrics` (messages
    /// ingested and rejected, commit latency and group size).
    ///
    /// # Errors
    /// See [`Db::open`].
    pub fn open_with_metrics(
        path: &std::path::Path,
        opts: &OpenOptions,
        metrics: Metrics,
    ) -> Result<Store, StoreError> {
        let lock = lock_exclusive(path)?;
        let mut db = Db::open(path, opts)?;
        let requeued = db.requeue_in_flight(None)?;
        if requeued > 0 {
            tracing::info!(
                rows = requeued,
                "outbox rows left in flight by the last run are pending again"
            );
        }
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        let bells = Arc::new(Bells {
            golioth: Arc::default(),
            netneural: Arc::default(),
            targets: opts.targets.clone(),
        });
        let ringer = bells.clone();
        thread::Builder::new()
            .name("store".into())
            .spawn(move || run(db, lock, rx, flag, ringer, metrics))
            .map_err(|e| StoreError::Open {
                path: path.to_owned(),
                reason: format!("cannot start store thread: {e}"),
            })?;
        Ok(Store {
            jobs,
            healthy,
            bells,
        })
    }

    /// Queues a write and returns at once; await [`PendingWrite::committed`] for the answer.
    /// Writes are applied in the order they are queued.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after [`Store::close`].
    ///
    /// # Cancel safety
    /// If cancelled while waiting for queue space, the write was not queued.
    pub async fn enqueue(&self, op: WriteOp) -> Result<PendingWrite, StoreError> {
        self.enqueue_from(op, None).await
    }

    /// [`Store::enqueue`] for an ordered stream of writes (one MQTT connection): once one of
    /// its writes fails, every later write of the same `stream` fails too
    /// ([`StoreError::Held`]) instead of being stored ahead of it. The sender then starts a
    /// new stream (reconnects) and gets everything again, in order.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after [`Store::close`].
    pub async fn enqueue_from(
        &self,
        op: WriteOp,
        stream: Option<u64>,
    ) -> Result<PendingWrite, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Write(op, stream, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(PendingWrite(rx))
    }

    /// Queues a write and waits for its commit.
    pub async fn write(&self, op: WriteOp) -> Result<Outcome, StoreError> {
        self.enqueue(op).await?.committed().await
    }

    /// Runs `f` on the store thread, after every write queued before it.
    ///
    /// # Errors
    /// Whatever `f` returns, or [`StoreError::Closed`].
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Db) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Call = Box::new(move |db| {
            let _ = tx.send(f(db));
        });
        self.jobs
            .send(Job::Call(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// The outbox bells the store thread rings after commits (one per cloud).
    pub fn bells(&self) -> &Bells {
        &self.bells
    }

    /// False once a commit has failed and no later one has succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Finishes every queued job, checkpoints the WAL and closes the connection.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The store thread. `lock` is held until the connection is closed.
fn run(
    mut db: Db,
    lock: std::fs::File,
    mut rx: mpsc::Receiver<Job>,
    healthy: Arc<AtomicBool>,
    bells: Arc<Bells>,
    metrics: Metrics,
) {
    let commit_group = |db: &mut Db, batch: &mut Vec<_>, broken: &mut BrokenStreams| {
        commit(db, batch, broken, &healthy, &bells, &metrics);
    };
    let mut batch: Vec<(WriteOp, Option<u64>, Reply)> = Vec::new();
    let mut broken = BrokenStreams::default();
    let mut deferred: Option<Job> = None;
    loop {
        let job = match deferred.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(job) => job,
                None => break,
            },
        };
        match job {
            Job::Write(op, stream, reply) => {
                batch.push((op, stream, reply));
                // Take whatever else is already waiting, up to the batch limit.
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Job::Write(op, stream, reply)) => batch.push((op, stream, reply)),
                        Ok(other) => {
                            deferred = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut db, &mut batch, &mut broken);
            }
            Job::Call(f) => f(&mut db),
            Job::Close(done) => {
                rx.close();
                // Serve what was queued before the close, then stop.
                while let Ok(job) = rx.try_recv() {
                    match job {
                        Job::Write(op, stream, reply) => {
                            batch.push((op, stream, reply));
                            commit_group(&mut db, &mut batch, &mut broken);
                        }
                        Job::Call(f) => f(&mut db),
                        Job::Close(other) => {
                            let _ = other.send(());
                        }
                    }
                }
                if let Err(e) = db.checkpoint() {
                    tracing::warn!(error = %e, "WAL checkpoint at close failed; SQLite will recover it at next open");
                }
                drop(db);
                drop(lock);
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Streams with a failed write: their later writes are held back, not stored ahead of it.
/// Only the newest few are remembered; a stream's sender moves to a new one at once.
#[derive(Default)]
struct BrokenStreams(std::collections::VecDeque<u64>);

impl BrokenStreams {
    const REMEMBERED: usize = 64;

    fn contains(&self, stream: Option<u64>) -> bool {
        stream.is_some_and(|s| self.0.contains(&s))
    }

    fn insert(&mut self, stream: Option<u64>) {
        if let Some(s) = stream
            && !self.0.contains(&s)
        {
            if self.0.len() == Self::REMEMBERED {
                self.0.pop_front();
            }
            self.0.push_back(s);
        }
    }
}

/// Commits one group and answers each write; drains `batch`.
fn commit(
    db: &mut Db,
    batch: &mut Vec<(WriteOp, Option<u64>, Reply)>,
    broken: &mut BrokenStreams,
    healthy: &AtomicBool,
    bells: &Bells,
    metrics: &Metrics,
) {
    let (held, todo): (Vec<_>, Vec<_>) = batch
        .drain(..)
        .partition(|(_, stream, _)| broken.contains(*stream));
    for (_, _, reply) in held {
        let why = "an earlier message of the same connection was not stored".to_owned();
        let _ = reply.send(Err(StoreError::Held(why)));
    }
    if todo.is_empty() {
        return;
    }
    let mut ops = Vec::with_capacity(todo.len());
    let mut answers = Vec::with_capacity(todo.len());
    for (op, stream, reply) in todo {
        ops.push(op);
        answers.push((stream, reply));
    }
    let started = std::time::Instant::now();
    let results = db.apply_batch(&ops);
    metrics.commit(&ops, &results, started.elapsed());
    let failed = results.iter().filter(|r| r.is_err()).count();
    healthy.store(failed == 0, Ordering::Relaxed);
    if let Some(Err(first)) = results.iter().find(|r| r.is_err()) {
        tracing::error!(writes = failed, error = %first, "writes not stored");
    }
    bells.ring(
        ops.iter()
            .zip(&results)
            .filter(|(_, r)| matches!(r, Ok(Outcome::Stored { .. })))
            .map(|(op, _)| op),
    );
    for ((stream, reply), result) in answers.into_iter().zip(results) {
        if result.is_err() {
            broken.insert(stream);
        }
        let _ = reply.send(result);
    }
}
