//! Reconcile benchmark: the library's sync run ([`Syncer::run_once`], built by
//! [`nn_gateway::cloud::sync::syncer`] from the configuration as the daemon builds it) on a
//! real SQLite file, against the fake clouds of `tests/fakes`, each request answered after
//! `RECONCILE_LATENCY_MS` (default 20 ms).
//!
//! Run: `cargo bench --bench reconcile` (release profile). Optional: `RECONCILE_DEVICES`
//! (10,000; a second world of a tenth of it is measured too), `RECONCILE_RUNS` (3),
//! `RECONCILE_LATENCY_MS` (20), `RECONCILE_SETTLE_S` (0; see below).
//!
//! **Set-up** (not timed): devices `dev-0..` that exist in all three places and are linked:
//! in the fake Golioth (name = hardware id = key; every other one with a desired document),
//! in the fake NetNeural (the same name and hardware id, the same desired document in
//! `metadata.desired`, and a `location` key the gateway does not own), and in the mirror
//! (pre-filled by SQL: links to both ids, the desired documents). A first run, without
//! latency, establishes every base: it is timed and reported as **first**. It takes the
//! clouds' names and `enabled` flag into the mirror and writes nothing to the clouds but its
//! `integration_sync_log` row (NetNeural's metadata is seeded with Golioth's `enabled: true`,
//! so the first run does not also measure 10,000 PATCHes of the flag). Then every request of
//! either fake waits `RECONCILE_LATENCY_MS`.
//!
//! Measured, `RECONCILE_RUNS` times, each on the converged state:
//! - **changed**: 1% of the devices get a new desired document in Golioth (LightDB State) and
//!   another 1% one in NetNeural (`metadata.desired`, the rest of the metadata kept), then one
//!   run. Afterwards Golioth, NetNeural and the mirror must agree on each of those devices.
//! - **quiet**: one more run with nothing changed; it must write to neither cloud.
//!
//! Each prints its wall time, the requests each fake answered (reads and writes, and by
//! kind), and the run's report (taken, pushed, conflicts); then a table of medians
//! (min–max) over the runs. The two sizes show what the requests grow with: Golioth's list
//! is every device in pages of 100 (read four pages at a time after the first); NetNeural is
//! read incrementally from a cursor.
//!
//! **Where the time goes.** After each quiet run the reads of a run are timed alone (both
//! spokes' `pull`, at once as a run makes them), with the latency and without it, so that a
//! run's time splits into the reads, the rest of the run, and what the fakes themselves cost
//! (the changed line also prints the fake NetNeural's own cost of one row update).
//!
//! **NetNeural's overlap.** An incremental read asks for rows updated since `OVERLAP` (120 s,
//! in `src/cloud/sync/netneural.rs`) before its cursor, the server's clock at the previous
//! read. The set-up inserts every NetNeural row seconds before the measured runs, so each of
//! them reads every row again (merging to nothing): the default measures runs soon after a
//! mass write. `RECONCILE_SETTLE_S=125` waits after the first run, so that the measured runs
//! read only what changed in the last interval plus two minutes (the steady state).

#[path = "../tests/fakes/mod.rs"]
mod fakes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fakes::rig::{ORG, clouds};
use fakes::{Counts, FakeGolioth, FakeNetNeural, Fault, Faults, Mark, Match};
use nn_gateway::cloud::ApiKey;
use nn_gateway::cloud::sync::{Cursors, RunReport, Syncer};
use nn_gateway::config::{Config, Secret, Source};
use nn_gateway::model::Target;
use nn_gateway::store::{Db, OpenOptions, Store};
use serde_json::{Value, json};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(i: usize) -> String {
    format!("dev-{i}")
}

/// The desired document a device starts with: every other one has none.
fn initial_desired(i: usize) -> Option<Value> {
    i.is_multiple_of(2)
        .then(|| json!({"led": "off", "every": 60, "n": i}))
}

/// The fakes, the mirror and the syncer over them, converged by a first run.
struct World {
    golioth: FakeGolioth,
    nn: FakeNetNeural,
    syncer: Syncer,
    db: PathBuf,
    desired_path: String,
    /// By device index.
    golioth_ids: Vec<String>,
    netneural_ids: Vec<String>,
    /// Holds the database and the key files.
    _dir: tempfile::TempDir,
}

/// The reads of a run alone, per cloud, in seconds: with the latency, and without it (the
/// fakes' own work and the client's decoding).
#[derive(Clone, Copy)]
struct Reads {
    golioth: f64,
    netneural: f64,
    golioth_bare: f64,
    netneural_bare: f64,
}

/// What one run cost and came to.
struct Figures {
    seconds: f64,
    golioth: Counts,
    netneural: Counts,
    report: RunReport,
    breakdown: String,
}

const GOLIOTH_KINDS: &[(&str, &str)] = &[
    ("GET", "/tags"),
    ("GET", "/devices"),
    ("PATCH", "/devices"),
    ("PUT", "/data/"),
    ("DELETE", "/data/"),
    ("POST", "/tags"),
];

const NETNEURAL_KINDS: &[(&str, &str)] = &[
    ("GET", "/devices"),
    ("GET", "device_service_assignments"),
    ("PATCH", "/devices"),
    ("GET", "device_conflicts"),
    ("POST", "device_conflicts"),
    ("PATCH", "device_conflicts"),
    ("POST", "integration_sync_log"),
];

/// Requests since `mark` by kind (those that occurred).
fn breakdown(faults: &Faults, mark: Mark, kinds: &[(&str, &str)]) -> String {
    kinds
        .iter()
        .map(|(m, p)| (m, p, faults.count_since(mark, &Match::new(m, p))))
        .filter(|k| k.2 > 0)
        .map(|(m, p, n)| format!("{m} {p}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the database at `db` and fills it in one transaction: each device linked to both
/// clouds, with its desired document (already published to the device).
fn prefill(db: &Path, opts: &OpenOptions, golioth_ids: &[String], netneural_ids: &[String]) {
    drop(Db::open(db, opts).expect("a new database"));
    let mut conn = rusqlite::Connection::open(db).expect("the database");
    let now = nn_gateway::model::UnixMillis::now().0;
    let tx = conn.transaction().unwrap();
    {
        let mut device = tx
            .prepare(
                "INSERT INTO device(key, origin, first_seen, last_seen, golioth_id, netneural_id)
                 VALUES (?1, 'mqtt', ?2, ?2, ?3, ?4)",
            )
            .unwrap();
        let mut desired = tx
            .prepare(
                "INSERT INTO desired_state(device_id, doc, version, seq, updated_at, updated_by,
                                           published_seq)
                 VALUES (?1, ?2, 1, ?3, ?4, 'local', ?3)",
            )
            .unwrap();
        let mut seq = 0;
        for (i, (gid, nid)) in golioth_ids.iter().zip(netneural_ids).enumerate() {
            device
                .execute(rusqlite::params![key(i), now, gid, nid])
                .unwrap();
            let id = tx.last_insert_rowid();
            if let Some(doc) = initial_desired(i) {
                seq += 1;
                desired
                    .execute(rusqlite::params![id, doc.to_string(), seq, now])
                    .unwrap();
            }
        }
    }
    tx.commit().unwrap();
}

async fn world(devices: usize) -> (World, Figures) {
    let golioth = FakeGolioth::start().await;
    let nn = FakeNetNeural::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg =
        Config::load_with(&Source::Embedded, &[], None).expect("the embedded configuration");
    let defaults = (cfg.golioth.request_timeout, cfg.netneural.request_timeout);
    clouds(&mut cfg, dir.path(), Some(&golioth), Some(&nn));
    // The daemon's request timeouts, not the tests' 2 s: the fake NetNeural's PATCHes queue
    // behind its lock (see above), and a push that times out would fail the run.
    (cfg.golioth.request_timeout, cfg.netneural.request_timeout) = defaults;
    let desired_path = cfg.golioth.desired_path.clone();

    let mut golioth_ids = Vec::with_capacity(devices);
    let mut netneural_ids = Vec::with_capacity(devices);
    for i in 0..devices {
        let key = key(i);
        let gid = golioth.create_device(&key, &[&key]);
        // `enabled` as Golioth has it: see the module doc on why the first run writes nothing.
        let mut metadata = json!({"location": format!("hall {}", i % 7), "enabled": true});
        if let Some(doc) = initial_desired(i) {
            golioth.set_state(&gid, &desired_path, doc.clone());
            metadata["desired"] = doc;
        }
        let row = nn.insert(
            "devices",
            json!({"organization_id": ORG, "name": key, "hardware_ids": [key], "metadata": metadata}),
        );
        golioth_ids.push(gid);
        netneural_ids.push(row["id"].as_str().expect("an id").to_owned());
    }

    let db = dir.path().join("gateway.db");
    let opts = OpenOptions {
        synchronous: cfg.storage.synchronous,
        targets: vec![Target::Golioth, Target::NetNeural],
        rejected_keep: cfg.storage.rejected_keep,
    };
    prefill(&db, &opts, &golioth_ids, &netneural_ids);
    let store = Store::open(&db, &opts).expect("the store");
    let golioth_key = ApiKey::new(Secret::new(fakes::golioth::DEFAULT_KEY));
    let netneural_key = ApiKey::new(Secret::new(fakes::netneural::DEFAULT_KEY));
    let syncer = nn_gateway::cloud::sync::syncer(
        &cfg,
        store,
        Some(golioth_key),
        Some(netneural_key),
        &nn_gateway::metrics::Metrics::new(),
    )
    .expect("the cloud clients")
    .expect("sync enabled with both clouds");

    let w = World {
        golioth,
        nn,
        syncer,
        db,
        desired_path,
        golioth_ids,
        netneural_ids,
        _dir: dir,
    };
    let first = w.run().await;
    assert!(
        first.report.errors.is_empty(),
        "the first run failed: {:?}",
        first.report.errors
    );
    (w, first)
}

impl World {
    /// One run, timed, with the requests it made.
    async fn run(&self) -> Figures {
        let (g0, n0) = (self.golioth.faults().mark(), self.nn.faults().mark());
        let started = Instant::now();
        let report = self.syncer.run_once().await.expect("the store");
        let seconds = started.elapsed().as_secs_f64();
        let (gf, nf) = (self.golioth.faults(), self.nn.faults());
        Figures {
            seconds,
            golioth: gf.counts_by_kind_since(g0),
            netneural: nf.counts_by_kind_since(n0),
            breakdown: format!(
                "Golioth {}; NetNeural {}",
                breakdown(gf, g0, GOLIOTH_KINDS),
                breakdown(nf, n0, NETNEURAL_KINDS)
            ),
            report,
        }
    }

    /// Times the reads a run makes (both clouds at once, as a run reads them), nothing else.
    async fn pulls(&self) -> (f64, f64) {
        // The cursor kinds of src/cloud/sync/netneural.rs (its constants are not exported).
        let cursors = self
            .syncer
            .store
            .call(|db| {
                Ok(Cursors {
                    devices: db.sync_cursor(Target::NetNeural, "devices")?,
                    assignments: db.sync_cursor(Target::NetNeural, "assignments")?,
                })
            })
            .await
            .expect("the store");
        let golioth = self.syncer.golioth.as_ref().expect("Golioth");
        let netneural = self.syncer.netneural.as_ref().expect("NetNeural");
        tokio::join!(
            async {
                let started = Instant::now();
                golioth.pull().await.expect("Golioth's read");
                started.elapsed().as_secs_f64()
            },
            async {
                let started = Instant::now();
                netneural.pull(&cursors).await.expect("NetNeural's read");
                started.elapsed().as_secs_f64()
            }
        )
    }

    /// The reads alone, with `latency` and without.
    async fn reads(&self, latency: Duration) -> Reads {
        let (golioth, netneural) = self.pulls().await;
        for faults in [self.golioth.faults(), self.nn.faults()] {
            faults.clear();
        }
        let (golioth_bare, netneural_bare) = self.pulls().await;
        for faults in [self.golioth.faults(), self.nn.faults()] {
            faults.always(Match::any(), Fault::Delay(latency));
        }
        Reads {
            golioth,
            netneural,
            golioth_bare,
            netneural_bare,
        }
    }

    fn devices(&self) -> usize {
        self.golioth_ids.len()
    }

    /// 1% of the devices (at least one), every 100th from `offset`.
    fn picked(&self, offset: usize) -> Vec<usize> {
        let n = self.devices();
        (0..(n / 100).max(1))
            .map(|k| (k * 100 + offset) % n)
            .collect()
    }

    /// Edits run `run`'s devices in each cloud (different ones), as their operators would;
    /// returns each edited device with the desired document all three places must end with.
    /// Also returns what one NetNeural row update cost the fake itself, in milliseconds.
    fn edit(&self, run: usize) -> (Vec<(usize, Value)>, f64) {
        let in_golioth = self.picked((2 * run) % 100);
        let in_netneural = self.picked((2 * run + 51) % 100);
        assert!(
            in_golioth.iter().all(|i| !in_netneural.contains(i)),
            "too few devices to change different ones in each cloud"
        );
        let mut want = Vec::new();
        for &i in &in_golioth {
            let doc = json!({"led": "on", "every": 30 + run, "n": i});
            self.golioth
                .set_state(&self.golioth_ids[i], &self.desired_path, doc.clone());
            want.push((i, doc));
        }
        let rows = self.netneural_rows();
        let started = Instant::now();
        for &i in &in_netneural {
            let id = &self.netneural_ids[i];
            let mut metadata = rows[id]["metadata"].clone();
            let doc = json!({"led": "blink", "every": 10 + run, "n": i});
            metadata["desired"] = doc.clone();
            self.nn.edit_device(id, json!({ "metadata": metadata }));
            want.push((i, doc));
        }
        let per_update = started.elapsed().as_secs_f64() * 1000.0 / in_netneural.len() as f64;
        (want, per_update)
    }

    /// NetNeural's device rows by id.
    fn netneural_rows(&self) -> HashMap<String, Value> {
        self.nn
            .rows("devices")
            .into_iter()
            .map(|r| (r["id"].as_str().expect("an id").to_owned(), r))
            .collect()
    }

    /// Panics unless Golioth, NetNeural and the mirror hold `want` for each device (and
    /// NetNeural kept the metadata the gateway does not own).
    fn check_agreement(&self, want: &[(usize, Value)]) {
        let rows = self.netneural_rows();
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("the database");
        let mut stmt = conn
            .prepare("SELECT v.key, d.doc FROM device v JOIN desired_state d ON d.device_id = v.id")
            .unwrap();
        let local: HashMap<String, Value> = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .map(|r| {
                let (k, doc) = r.unwrap();
                (k, serde_json::from_str(&doc).unwrap())
            })
            .collect();
        let mut wrong = Vec::new();
        for (i, doc) in want {
            let g = self
                .golioth
                .state(&self.golioth_ids[*i], &self.desired_path);
            let row = &rows[&self.netneural_ids[*i]];
            let n = row["metadata"].get("desired").cloned();
            let l = local.get(&key(*i)).cloned();
            let kept = row["metadata"]["location"] == format!("hall {}", i % 7);
            let want = Some(doc.clone());
            if g != want || n != want || l != want || !kept {
                wrong.push(format!(
                    "{}: want {doc}; Golioth {g:?}, NetNeural {n:?} (metadata {}), mirror {l:?}",
                    key(*i),
                    row["metadata"]
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} changed devices disagree after the run:\n{}",
            wrong.len(),
            want.len(),
            wrong.join("\n")
        );
    }
}

fn print_run(what: &str, f: &Figures) {
    let r = &f.report;
    println!(
        "{what}: {:.2} s; Golioth {} reads + {} writes, NetNeural {} reads + {} writes; \
         devices {}, taken {}, pushed {}, push_failed {}, conflicts {}, desired_changed {}",
        f.seconds,
        f.golioth.reads,
        f.golioth.writes,
        f.netneural.reads,
        f.netneural.writes,
        r.devices,
        r.taken,
        r.pushed,
        r.push_failed,
        r.conflicts,
        r.desired_changed
    );
    println!("  {}", f.breakdown);
}

/// Everything measured on one world.
struct Size {
    devices: usize,
    first: Figures,
    changed: Vec<Figures>,
    quiet: Vec<Figures>,
    reads: Vec<Reads>,
    /// The fake NetNeural's own cost of one row update, per run, in milliseconds.
    fake_update_ms: Vec<f64>,
}

async fn measure(devices: usize, runs: usize, latency: Duration, settle: Duration) -> Size {
    let (w, first) = world(devices).await;
    print_run(
        &format!("{devices} devices, first reconcile (no latency)"),
        &first,
    );
    if !settle.is_zero() {
        println!("  waiting {settle:?} (RECONCILE_SETTLE_S) before measuring");
        tokio::time::sleep(settle).await;
    }
    for faults in [w.golioth.faults(), w.nn.faults()] {
        faults.always(Match::any(), Fault::Delay(latency));
    }
    let mut changed = Vec::new();
    let mut quiet = Vec::new();
    let mut reads = Vec::new();
    let mut fake_update_ms = Vec::new();
    for run in 0..runs {
        let (want, fake_ms) = w.edit(run);
        let c = w.run().await;
        print_run(&format!("{devices} devices, run {}, changed", run + 1), &c);
        println!(
            "  (the fake NetNeural's own cost of one row update at {devices} rows: {fake_ms:.1} ms, serialised)"
        );
        assert!(c.report.errors.is_empty(), "{:?}", c.report.errors);
        assert_eq!(
            c.report.conflicts, 0,
            "different devices changed in each cloud"
        );
        w.check_agreement(&want);
        changed.push(c);

        let q = w.run().await;
        print_run(&format!("{devices} devices, run {}, quiet", run + 1), &q);
        assert_eq!(
            (q.golioth.writes, q.netneural.writes),
            (0, 0),
            "a quiet run wrote to a cloud: {}",
            q.breakdown
        );
        assert!(
            q.report.is_quiet(),
            "a quiet run did something: {:?}",
            q.report
        );
        quiet.push(q);

        let r = w.reads(latency).await;
        println!(
            "{devices} devices, run {}, the reads alone: Golioth {:.2} s ({:.2} s without latency), \
             NetNeural {:.2} s ({:.2} s without latency)",
            run + 1,
            r.golioth,
            r.golioth_bare,
            r.netneural,
            r.netneural_bare
        );
        reads.push(r);
        fake_update_ms.push(fake_ms);
    }
    w.syncer.store.close().await;
    Size {
        devices,
        first,
        changed,
        quiet,
        reads,
        fake_update_ms,
    }
}

/// `median (min-max)`, or the one value.
fn spread(mut v: Vec<f64>, decimals: usize) -> String {
    v.sort_by(f64::total_cmp);
    let (lo, mid, hi) = (v[0], v[v.len() / 2], v[v.len() - 1]);
    if lo == hi {
        format!("{mid:.decimals$}")
    } else {
        format!("{mid:.decimals$} ({lo:.decimals$}-{hi:.decimals$})")
    }
}

fn table(sizes: &[Size], runs: usize, latency: Duration) {
    let header = [
        "devices",
        "run",
        "seconds",
        "Golioth reads",
        "Golioth writes",
        "NetNeural reads",
        "NetNeural writes",
        "taken",
        "pushed",
        "conflicts",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for s in sizes {
        let phases: [(&str, &[Figures]); 3] = [
            ("first (no latency)", std::slice::from_ref(&s.first)),
            ("changed", &s.changed),
            ("quiet", &s.quiet),
        ];
        for (name, figs) in phases {
            let col = |g: fn(&Figures) -> f64, d: usize| spread(figs.iter().map(g).collect(), d);
            rows.push(vec![
                s.devices.to_string(),
                name.to_owned(),
                col(|f| f.seconds, 2),
                col(|f| f.golioth.reads as f64, 0),
                col(|f| f.golioth.writes as f64, 0),
                col(|f| f.netneural.reads as f64, 0),
                col(|f| f.netneural.writes as f64, 0),
                col(|f| f.report.taken as f64, 0),
                col(|f| f.report.pushed as f64, 0),
                col(|f| f.report.conflicts as f64, 0),
            ]);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    println!();
    println!(
        "reconcile, {latency:?} per request (first run without), {runs} runs: median (min-max)"
    );
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                if c < 2 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  "));
    }
}

/// Where a run's time goes: its reads alone (with and without the latency), the rest of a
/// quiet run (merging every device, the commit), and the fake NetNeural's row updates.
fn time_table(sizes: &[Size]) {
    println!();
    println!("where the time goes, seconds unless said: median (min-max)");
    for s in sizes {
        let reads = |g: fn(&Reads) -> f64| spread(s.reads.iter().map(g).collect(), 2);
        let rest: Vec<f64> = s
            .quiet
            .iter()
            .zip(&s.reads)
            .map(|(q, r)| q.seconds - r.golioth.max(r.netneural))
            .collect();
        println!(
            "{} devices: reads alone: Golioth {} (without latency {}), NetNeural {} (without \
             latency {}); quiet run less its longer read {}; fake NetNeural row update {} ms",
            s.devices,
            reads(|r| r.golioth),
            reads(|r| r.golioth_bare),
            reads(|r| r.netneural),
            reads(|r| r.netneural_bare),
            spread(rest, 2),
            spread(s.fake_update_ms.clone(), 1)
        );
    }
}

fn main() {
    let devices: usize = env_or("RECONCILE_DEVICES", 10_000);
    let runs: usize = env_or::<usize>("RECONCILE_RUNS", 3).max(1);
    let latency = Duration::from_millis(env_or("RECONCILE_LATENCY_MS", 20));
    let settle = Duration::from_secs(env_or("RECONCILE_SETTLE_S", 0));
    nn_gateway::cloud::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut sizes = Vec::new();
    for n in [devices, devices / 10] {
        if n == 0 {
            continue;
        }
        sizes.push(rt.block_on(measure(n, runs, latency, settle)));
    }
    table(&sizes, runs, latency);
    time_table(&sizes);
}
