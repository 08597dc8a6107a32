//! The write path of ingest: one group commit's statements — devices, reported state with its
//! coalesced outbox rows, telemetry (owed to the clouds through their cursors, see
//! [`super::outbox`], so nothing per point for the uplink), rejections, and the recognition of
//! MQTT redeliveries.
//!
//! Blocking; called by [`super::Db::apply_batch`] inside its transaction.

use std::collections::HashMap;

use rusqlite::{CachedStatement, OptionalExtension, Transaction, params};
use serde_json::Value;

use super::doc::parse_doc;
use crate::ingest::merge_object_patch;
use crate::model::{
    DeviceKey, Inbound, MqttDelivery, Origin, Outcome, REJECTED_EXCERPT_LEN, Reading, Rejection,
    Target, WriteOp,
};

/// A redelivery is recognised only if its first delivery is among the last this many MQTT
/// messages stored. Counted in messages, not time, so a clock step (a board without a real-time
/// clock meeting NTP) cannot change the answer.
///
/// **Why half the packet-id space.** What the broker resends after a connection breaks is what
/// it had in flight: messages we read but had not committed (at most the MQTT task's window of
/// 2,000) *and* messages we stored and acknowledged whose PUBACK the broker had not read yet.
/// The second kind is not bounded by us: under four publishers flooding it, Mosquitto 2.0.11
/// read one of our PUBACKs per four PUBLISHes it forwarded and did not hold back to its
/// `max_inflight_messages` (1000), so 16,000–18,000 stored messages were in flight when the
/// connection broke (a SIGKILL, or before the fix a SIGTERM, whose RST made Mosquitto drop the
/// PUBACKs it had not read). Every one of them comes back, with DUP and its packet id.
///
/// The span is measured back from the newest stored delivery, and a redelivery that is not
/// recognised is stored and moves that point on by one, as does the next one's original: so a
/// burst longer than the span is recognised not in part but **not at all**. With the former
/// span of 8,192 that stored 12,000–15,000 duplicates per restart. A true redelivery lies at
/// most "messages in flight" deliveries back; a different message reusing a packet id lies at
/// least 65,535 packet ids back, as Mosquitto counts them up before reusing one. Half of that
/// splits the margin: exact while the broker has fewer than 32,768 of our messages in flight
/// and no more than 32,767 of the packet ids between were spent on messages never stored.
pub const DEDUP_SPAN: i64 = 32_768;

/// Finds or creates the device; `seen` also bumps `last_seen`. Returns (id, created).
pub(super) fn upsert_device(
    tx: &Transaction<'_>,
    device: &DeviceKey,
    origin: Origin,
    now: i64,
    seen: bool,
) -> rusqlite::Result<(i64, bool)> {
    let existing: Option<i64> = tx
        .prepare_cached("SELECT id FROM device WHERE key = ?1")?
        .query_row([device.as_str()], |r| r.get(0))
        .optional()?;
    if let Some(id) = existing {
        if seen {
            tx.prepare_cached("UPDATE device SET last_seen = ?2, deleted_at = NULL WHERE id = ?1")?
                .execute(params![id, now])?;
        }
        return Ok((id, false));
    }
    tx.prepare_cached(
        "INSERT INTO device(key, origin, first_seen, last_seen) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        device.as_str(),
        origin.as_str(),
        now,
        seen.then_some(now)
    ])?;
    Ok((tx.last_insert_rowid(), true))
}

/// Whether a write failed because of what it carries (a constraint, a value SQLite refuses),
/// so that it would fail again however often it is retried. Anything else (a full disk, I/O,
/// a lock, corruption) is the store's trouble: the write is held back and retried, never
/// dropped.
pub(super) fn is_poison(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            matches!(
                f.code,
                C::ConstraintViolation | C::TooBig | C::TypeMismatch | C::ParameterOutOfRange
            )
        }
        rusqlite::Error::ToSqlConversionFailure(_)
        | rusqlite::Error::IntegralValueOutOfRange(..) => true,
        _ => false,
    }
}

/// Everything a write needs besides its [`Group`].
pub(super) struct Writer<'a> {
    pub(super) targets: &'a [Target],
    pub(super) install_id: &'a str,
    pub(super) mqtt_seq: &'a mut i64,
}

/// What one group commit holds for the length of its transaction, so that the work per message
/// is its own rows and nothing else: each device is looked up once per group and its
/// `last_seen` written once, at the end ([`Group::finish`]); the statements every message runs
/// are prepared once and held, not looked up in the statement cache per row; telemetry payloads
/// are serialised into one reused buffer.
///
/// It lives and dies with one transaction: when the transaction rolls back, what it learned
/// (device ids) goes with it, so there is no cache to invalidate.
pub(super) struct Group<'tx, 'op> {
    tx: &'tx Transaction<'tx>,
    /// Devices written in this group, by key.
    devices: HashMap<&'op str, Seen>,
    mqtt_record: Option<CachedStatement<'tx>>,
    telemetry: Option<CachedStatement<'tx>>,
    state_read: Option<CachedStatement<'tx>>,
    state_write: Option<CachedStatement<'tx>>,
    state_outbox: Option<CachedStatement<'tx>>,
    payload: Vec<u8>,
}

/// A device written in this group.
struct Seen {
    id: i64,
    /// The newest reception time of its messages in this group.
    last_seen: i64,
}

/// The statement in `slot`, prepared (through the connection's cache) on first use.
fn held<'s, 'tx>(
    slot: &'s mut Option<CachedStatement<'tx>>,
    tx: &'tx Transaction<'tx>,
    sql: &str,
) -> rusqlite::Result<&'s mut CachedStatement<'tx>> {
    match slot {
        Some(stmt) => Ok(stmt),
        None => Ok(slot.insert(tx.prepare_cached(sql)?)),
    }
}

impl<'tx, 'op> Group<'tx, 'op> {
    pub(super) fn new(tx: &'tx Transaction<'tx>) -> Self {
        Group {
            tx,
            devices: HashMap::new(),
            mqtt_record: None,
            telemetry: None,
            state_read: None,
            state_write: None,
            state_outbox: None,
            payload: Vec::new(),
        }
    }

    /// The device's id, creating the device on its first message. Returns (id, created).
    fn device(
        &mut self,
        key: &'op DeviceKey,
        origin: Origin,
        now: i64,
    ) -> rusqlite::Result<(i64, bool)> {
        if let Some(seen) = self.devices.get_mut(key.as_str()) {
            seen.last_seen = seen.last_seen.max(now);
            return Ok((seen.id, false));
        }
        // `seen = false`: last_seen (and the undelete) is written once, by `finish`.
        let (id, created) = upsert_device(self.tx, key, origin, now, false)?;
        self.devices
            .insert(key.as_str(), Seen { id, last_seen: now });
        Ok((id, created))
    }

    /// Writes what the group learned about its devices: each one's `last_seen` (the newest of
    /// its messages here) and its return if it had been deleted. Runs once, before the commit.
    pub(super) fn finish(self) -> rusqlite::Result<()> {
        if self.devices.is_empty() {
            return Ok(());
        }
        let mut stmt = self
            .tx
            .prepare_cached("UPDATE device SET last_seen = ?2, deleted_at = NULL WHERE id = ?1")?;
        for seen in self.devices.values() {
            stmt.execute(params![seen.id, seen.last_seen])?;
        }
        Ok(())
    }
}

impl Writer<'_> {
    pub(super) fn apply<'op>(
        &mut self,
        group: &mut Group<'_, 'op>,
        op: &'op WriteOp,
    ) -> rusqlite::Result<Outcome> {
        let delivery = match op {
            WriteOp::Ingest(msg) => msg.mqtt.as_ref(),
            WriteOp::Reject(rej) => rej.mqtt.as_ref(),
        };
        if let Some(d) = delivery
            && self.is_redelivery(group, d)?
        {
            return Ok(Outcome::Duplicate);
        }
        match op {
            WriteOp::Ingest(msg) => ingest(group, msg, self.targets, self.install_id),
            WriteOp::Reject(rej) => reject(group.tx, rej),
        }
    }

    /// True when this delivery is the broker resending a message already stored. Records the
    /// delivery otherwise.
    fn is_redelivery(
        &mut self,
        group: &mut Group<'_, '_>,
        d: &MqttDelivery,
    ) -> rusqlite::Result<bool> {
        let tx = group.tx;
        // The digest is stored as the i64 with the same bits.
        let digest = d.digest as i64;
        let seen = d.dup
            && tx
                .prepare_cached(
                    "SELECT 1 FROM mqtt_inbound WHERE pkid = ?1 AND digest = ?2 AND seq > ?3",
                )?
                .query_row(params![d.pkid, digest, *self.mqtt_seq - DEDUP_SPAN], |_| {
                    Ok(())
                })
                .optional()?
                .is_some();
        if seen {
            tx.prepare_cached(
                "INSERT INTO meta(key, value) VALUES ('redeliveries_total', '1')
                 ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            )?
            .execute([])?;
        } else {
            *self.mqtt_seq += 1;
            held(
                &mut group.mqtt_record,
                tx,
                "INSERT INTO mqtt_inbound(pkid, digest, seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT(pkid) DO UPDATE SET digest = excluded.digest, seq = excluded.seq",
            )?
            .execute(params![d.pkid, digest, *self.mqtt_seq])?;
        }
        Ok(seen)
    }
}

fn reject(tx: &Transaction<'_>, rej: &Rejection) -> rusqlite::Result<Outcome> {
    let excerpt = &rej.excerpt[..rej.excerpt.len().min(REJECTED_EXCERPT_LEN)];
    tx.prepare_cached(
        "INSERT INTO rejected(received_at, origin, device, locator, reason, size, excerpt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        rej.received_at.0,
        rej.origin.as_str(),
        rej.device,
        rej.locator,
        rej.reason,
        rej.size as i64,
        excerpt
    ])?;
    tx.prepare_cached(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'rejected_total'",
    )?
    .execute([])?;
    Ok(Outcome::Rejected)
}

fn ingest<'op>(
    group: &mut Group<'_, 'op>,
    msg: &'op Inbound,
    targets: &[Target],
    install_id: &str,
) -> rusqlite::Result<Outcome> {
    let now = msg.received_at.0;
    let (device_id, new_device) = group.device(&msg.device, msg.origin, now)?;
    let tx = group.tx;
    match &msg.reading {
        Reading::State(patch) => {
            let current: Option<(String, i64)> = held(
                &mut group.state_read,
                tx,
                "SELECT doc, version FROM reported_state WHERE device_id = ?1",
            )?
            .query_row([device_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
            let (mut doc, version) = match current {
                Some((text, v)) => (parse_doc(&text), v + 1),
                None => (Value::Object(Default::default()), 1),
            };
            merge_object_patch(&mut doc, patch);
            let text = doc.to_string();
            held(
                &mut group.state_write,
                tx,
                "INSERT INTO reported_state(device_id, doc, version, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(device_id) DO UPDATE SET doc = excluded.doc, version = excluded.version,
                     updated_at = excluded.updated_at",
            )?
            .execute(params![device_id, text, version, now])?;
            for target in targets {
                // Coalesce: a pending row for this device and cloud takes the newest document.
                held(
                    &mut group.state_outbox,
                    tx,
                    "INSERT INTO outbox(target, operation, device_id, payload, idempotency_key,
                                        next_attempt_at, created_at, updated_at)
                     VALUES (?1, 'reported_state', ?2, ?3, ?4, ?5, ?5, ?5)
                     ON CONFLICT(target, device_id) WHERE state = 'pending' AND operation = 'reported_state'
                     DO UPDATE SET payload = excluded.payload, idempotency_key = excluded.idempotency_key,
                                   updated_at = excluded.updated_at",
                )?
                .execute(params![
                    target.as_str(),
                    device_id,
                    text,
                    format!("st:{install_id}:{device_id}:{version}:{}", target.as_str()),
                    now
                ])?;
            }
        }
        Reading::Telemetry(points) => {
            let stmt = held(
                &mut group.telemetry,
                tx,
                "INSERT INTO telemetry(device_id, device_ts, received_at, payload, content_type)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for point in points {
                group.payload.clear();
                serde_json::to_writer(&mut group.payload, &point.data)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
                // serde_json writes UTF-8 only; checked rather than assumed.
                let payload = std::str::from_utf8(&group.payload)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
                stmt.execute(params![
                    device_id,
                    point.device_ts.map(|t| t.0),
                    now,
                    payload,
                    msg.format.content_type()
                ])?;
            }
        }
    }
    Ok(Outcome::Stored { new_device })
}

/// Keeps the rejected table to its configured size; runs once per group commit.
pub(super) fn trim_rejected(
    tx: &Transaction<'_>,
    ops: &[WriteOp],
    keep: u32,
) -> rusqlite::Result<()> {
    if ops.iter().any(|op| matches!(op, WriteOp::Reject(_))) {
        tx.prepare_cached("DELETE FROM rejected WHERE id <= (SELECT max(id) FROM rejected) - ?1")?
            .execute([i64::from(keep)])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::model::{Format, MqttDelivery, Point, UnixMillis};
    use crate::store::{Db, OpenOptions};

    fn telemetry(n: i64, pkid: u16, dup: bool) -> WriteOp {
        WriteOp::Ingest(Inbound {
            device: DeviceKey::parse("meter").unwrap(),
            origin: Origin::Mqtt,
            format: Format::Json,
            received_at: UnixMillis::now(),
            reading: Reading::Telemetry(vec![Point {
                device_ts: None,
                data: serde_json::json!({"n": n}).as_object().unwrap().clone(),
            }]),
            mqtt: Some(MqttDelivery {
                pkid,
                dup,
                // Stands in for the digest of topic and payload: one per message.
                digest: n as u64,
            }),
        })
    }

    fn point(device: &str, n: i64, at: i64) -> WriteOp {
        let WriteOp::Ingest(mut msg) = telemetry(n, 0, false) else {
            unreachable!()
        };
        msg.device = DeviceKey::parse(device).unwrap();
        msg.received_at = UnixMillis(at);
        msg.mqtt = None;
        WriteOp::Ingest(msg)
    }

    fn seen(db: &Db, device: &str) -> (Option<i64>, Option<i64>) {
        db.conn()
            .query_row(
                "SELECT last_seen, deleted_at FROM device WHERE key = ?1",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    }

    fn open(dir: &tempfile::TempDir) -> Db {
        let opts = OpenOptions {
            synchronous: Synchronous::Normal,
            targets: vec![],
            rejected_keep: 3,
        };
        Db::open(&dir.path().join("g.db"), &opts).unwrap()
    }

    #[test]
    fn a_group_looks_each_device_up_once_and_leaves_it_seen_at_its_newest_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open(&dir);
        db.apply_batch(&[point("old", 0, 50)]);
        db.conn()
            .execute("UPDATE device SET deleted_at = 60 WHERE key = 'old'", [])
            .unwrap();
        let outcomes: Vec<Outcome> = db
            .apply_batch(&[
                point("new", 1, 100),
                point("old", 2, 120),
                point("new", 3, 300),
                point("new", 4, 200),
            ])
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Stored { new_device: true },
                Outcome::Stored { new_device: false },
                Outcome::Stored { new_device: false },
                Outcome::Stored { new_device: false },
            ]
        );
        assert_eq!(seen(&db, "new"), (Some(300), None));
        assert_eq!(seen(&db, "old"), (Some(120), None), "a message undeletes");
        let ns = |key| -> Vec<i64> {
            db.telemetry_payloads(&DeviceKey::parse(key).unwrap())
                .unwrap()
                .iter()
                .map(|p| p["n"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(ns("new"), [1, 3, 4], "in order");
        assert_eq!(ns("old"), [0, 2]);
    }

    #[test]
    fn a_group_that_rolls_back_forgets_the_devices_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open(&dir);
        // Fails the group at its third write; alone, that write becomes a rejection.
        db.conn()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN NEW.payload = '{\"n\":13}'
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
            .unwrap();
        let outcomes: Vec<Outcome> = db
            .apply_batch(&[
                point("a", 1, 100),
                point("b", 2, 110),
                point("a", 13, 120),
                point("a", 4, 130),
            ])
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Stored { new_device: true },
                Outcome::Stored { new_device: true },
                Outcome::Rejected,
                Outcome::Stored { new_device: false },
            ],
            "the writes retried one by one create their devices again"
        );
        assert_eq!(seen(&db, "a"), (Some(130), None));
        assert_eq!(seen(&db, "b"), (Some(110), None));
        assert_eq!(db.status().unwrap().telemetry_points, 3);
    }

    /// The field report: 13,516 stored messages resent at once after a stop, none recognised.
    #[test]
    fn a_resent_burst_of_fifteen_thousand_stored_messages_is_recognised_whole() {
        const STORED: i64 = 20_000;
        const IN_FLIGHT: i64 = 15_000;
        let dir = tempfile::tempdir().unwrap();
        let mut db = open(&dir);
        let first: Vec<WriteOp> = (1..=STORED)
            .map(|n| telemetry(n, n as u16, false))
            .collect();
        for batch in first.chunks(1000) {
            assert!(db.apply_batch(batch).iter().all(Result::is_ok));
        }
        // The broker resends what it had in flight, oldest first, with DUP.
        let resent: Vec<WriteOp> = (STORED - IN_FLIGHT + 1..=STORED)
            .map(|n| telemetry(n, n as u16, true))
            .collect();
        let mut duplicates = 0;
        for batch in resent.chunks(1000) {
            for outcome in db.apply_batch(batch) {
                duplicates += i64::from(outcome.unwrap() == Outcome::Duplicate);
            }
        }
        assert_eq!(duplicates, IN_FLIGHT, "every resent message recognised");
        assert_eq!(db.status().unwrap().telemetry_points, STORED);
    }
}
