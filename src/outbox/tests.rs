//! Lanes against scripted clouds on a real SQLite file: what a failure in the middle of a
//! drain does to the rows and the telemetry cursor.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::config::Synchronous;
use crate::store::OpenOptions;

/// A database at `path` owed to NetNeural, with `devices` (key, NetNeural id) and `points`
/// telemetry points given as the index of their device in `devices`.
fn database(
    path: &std::path::Path,
    devices: &[(&str, Option<&str>)],
    points: &[usize],
) -> OpenOptions {
    let opts = OpenOptions {
        synchronous: Synchronous::Normal,
        targets: vec![Target::NetNeural],
        rejected_keep: 3,
    };
    drop(crate::store::Db::open(path, &opts).unwrap());
    let c = rusqlite::Connection::open(path).unwrap();
    for (key, remote) in devices {
        c.execute(
            "INSERT INTO device(key, origin, first_seen, netneural_id) VALUES (?1, 'mqtt', 0, ?2)",
            rusqlite::params![key, remote],
        )
        .unwrap();
    }
    for device in points {
        insert_point(&c, *device as i64 + 1);
    }
    opts
}

fn insert_point(c: &rusqlite::Connection, device_id: i64) {
    c.execute(
        "INSERT INTO telemetry(device_id, device_ts, received_at, payload, content_type)
         VALUES (?1, NULL, 1, '{\"t\":1}', 'application/json')",
        [device_id],
    )
    .unwrap();
}

/// A running lane and what stops it.
struct Running {
    store: Store,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    fn start<U: Uplink>(
        uplink: U,
        path: &std::path::Path,
        opts: &OpenOptions,
        config: LaneConfig,
    ) -> Running {
        let store = Store::open(path, opts).unwrap();
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        spawn(
            uplink,
            config,
            LaneLinks {
                store: store.clone(),
                health: Health::default(),
                bell: store.bells().of(Target::NetNeural),
                key_changed: Arc::new(Notify::new()),
                shutdown: shutdown.clone(),
            },
            &tracker,
        );
        Running {
            store,
            shutdown,
            tracker,
        }
    }

    async fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn lane(concurrency: usize, batch: usize, min: Duration, max: Duration) -> LaneConfig {
    LaneConfig {
        concurrency,
        batch,
        schedule: RetrySchedule { min, max },
        install_id: "x".into(),
    }
}

/// A cloud that refuses to register device `bad` (a permanent 4xx) and takes the rest.
struct Refusing {
    registers: Arc<AtomicU64>,
    sent: Arc<Mutex<Vec<i64>>>,
}

impl Uplink for Refusing {
    fn target(&self) -> Target {
        Target::NetNeural
    }
    async fn probe(&self) -> Result<(), CloudError> {
        Ok(())
    }
    async fn register(
        &self,
        device: &DeviceIdent,
        _row: Option<&OutboxRow>,
    ) -> Result<Registered, CloudError> {
        self.registers.fetch_add(1, Ordering::SeqCst);
        if device.key.as_str() != "bad" {
            return Ok(Registered {
                id: format!("nn-{}", device.key),
                delivered: false,
            });
        }
        Err(crate::cloud::status_error(
            Target::NetNeural,
            "POST /rest/v1/devices",
            400,
            None,
            b"bad device",
            |_| None,
        ))
    }
    async fn send_row(&self, _: &str, _: &OutboxRow) -> Result<(), CloudError> {
        Ok(())
    }
    async fn send_telemetry(&self, points: &[OutPoint<'_>]) -> Result<(), CloudError> {
        self.sent
            .lock()
            .unwrap()
            .extend(points.iter().map(|p| p.item.id));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_the_cloud_refuses_dead_letters_its_points_and_holds_up_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    // Points 1..=6 alternate: the refused device's are the odd ones.
    let opts = database(&path, &[("bad", None), ("good", None)], &[0, 1, 0, 1, 0, 1]);
    let registers = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let cloud = Refusing {
        registers: registers.clone(),
        sent: sent.clone(),
    };
    let config = lane(4, 100, Duration::from_secs(1), Duration::from_secs(60));
    let running = Running::start(cloud, &path, &opts, config);
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.stop().await;
    let n = registers.load(Ordering::SeqCst);
    assert!(
        n <= 3,
        "{n} registration attempts in 2 s for one refused device (retry_min 1 s)"
    );
    assert_eq!(
        *sent.lock().unwrap(),
        [2, 4, 6],
        "the other device's points went"
    );
    let store = &running.store;
    let dead: Vec<i64> = store
        .call(|db| Ok(db.queue(10)?.rows.iter().map(|r| r.id).collect()))
        .await
        .unwrap();
    assert_eq!(
        dead,
        [1, 3, 5],
        "the refused device's points are dead letters"
    );
    let cursor = store
        .call(|db| db.telemetry_cursor(Target::NetNeural))
        .await
        .unwrap();
    assert_eq!(cursor, Some(6), "the cursor moved past them");
}

/// A cloud that holds the first batch until the test opens its gate and never answers the
/// second, recording what it stored.
#[derive(Default)]
struct Gated {
    delivered: Mutex<BTreeSet<i64>>,
    seen_first: Mutex<BTreeSet<i64>>,
    gate: Notify,
}

struct GatedCloud(Arc<Gated>);

impl Uplink for GatedCloud {
    fn target(&self) -> Target {
        Target::NetNeural
    }
    async fn probe(&self) -> Result<(), CloudError> {
        Ok(())
    }
    async fn register(
        &self,
        _: &DeviceIdent,
        _: Option<&OutboxRow>,
    ) -> Result<Registered, CloudError> {
        unreachable!("devices are registered")
    }
    async fn send_row(&self, _: &str, _: &OutboxRow) -> Result<(), CloudError> {
        Ok(())
    }
    async fn send_telemetry(&self, points: &[OutPoint<'_>]) -> Result<(), CloudError> {
        let first = points[0].item.id;
        let new = self.0.seen_first.lock().unwrap().insert(first);
        if new && first == 1 {
            self.0.gate.notified().await;
        }
        if new && first == 11 {
            // A slow answer: still in the air when the lane gives up its pump.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        self.0
            .delivered
            .lock()
            .unwrap()
            .extend(points.iter().map(|p| p.item.id));
        Ok(())
    }
}

/// One failed commit (the database busy past the busy timeout) while two batches are in the
/// air: the pump gives up, the other batch is abandoned, and what it carried must still be
/// delivered before the cursor passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_error_while_batches_are_in_the_air_loses_no_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let opts = database(&path, &[("d0", Some("nn-0"))], &[0; 30]);
    let fake = Arc::new(Gated::default());
    let config = lane(2, 10, Duration::from_millis(100), Duration::from_secs(1));
    let running = Running::start(GatedCloud(fake.clone()), &path, &opts, config);
    // Both batches in the air.
    for _ in 0..100 {
        if fake.seen_first.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.seen_first.lock().unwrap().len(), 2);
    // Another writer holds the database for longer than the busy timeout; a point arrives.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let p = path.clone();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        insert_point(&c, 1);
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(7));
        c.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    fake.gate.notify_one();
    holder.join().unwrap();
    let reader = rusqlite::Connection::open(&path).unwrap();
    let mut cursor = 0;
    for _ in 0..100 {
        cursor = reader
            .query_row("SELECT delivered_through FROM telemetry_cursor", [], |r| {
                r.get(0)
            })
            .unwrap();
        if cursor >= 31 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    let delivered = fake.delivered.lock().unwrap().clone();
    let missing: Vec<i64> = (1..=31).filter(|i| !delivered.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "cursor at {cursor}, yet points {missing:?} never reached the cloud"
    );
}
