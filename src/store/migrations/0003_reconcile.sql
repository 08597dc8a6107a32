-- nn-gateway mirror, schema 3: reconciliation with both clouds (see src/reconcile and
-- src/cloud/sync). The merge itself needs `sync_base` (schema 1); this adds what a pull
-- learns and what an operator sees.

-- Metadata the clouds share with the mirror, beside `name` and `tags` (schema 1).
ALTER TABLE device ADD COLUMN enabled INTEGER;            -- NULL: never set anywhere
ALTER TABLE device ADD COLUMN meta_updated_at INTEGER;    -- last change of name, tags or enabled
-- A device removed in a cloud is kept here, marked: its data stays and `devices` shows it.
ALTER TABLE device ADD COLUMN golioth_removed_at INTEGER;
ALTER TABLE device ADD COLUMN netneural_removed_at INTEGER;
-- `device_service_assignments.sync_direction` for this integration (NULL: no assignment,
-- which syncs both ways: the gateway registered the device itself).
ALTER TABLE device ADD COLUMN netneural_direction TEXT
    CHECK (netneural_direction IN ('import','export','bidirectional','none'));

-- What each cloud held when it was last read: the device's syncable document as JSON
-- Pointer fields (a JSON object). NetNeural is read incrementally (rows changed since a
-- cursor), so a device it did not send this time is merged against this copy. `version` is
-- the cloud's own version of the row (NetNeural's exact `updated_at`: the write guard) and
-- `extra` what a write must carry back (NetNeural's whole `metadata`).
CREATE TABLE sync_remote (
    device_id  INTEGER NOT NULL REFERENCES device(id),
    target     TEXT NOT NULL CHECK (target IN ('golioth','netneural')),
    doc        TEXT NOT NULL,
    remote_at  INTEGER,
    version    TEXT,
    extra      TEXT,
    PRIMARY KEY (device_id, target)
) STRICT;

-- Where each incremental read resumes (the cloud's own timestamps, as it wrote them).
CREATE TABLE sync_cursor (
    target      TEXT NOT NULL CHECK (target IN ('golioth','netneural')),
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (target, kind)
) STRICT;

-- Conflicts: the times each side changed, how one was settled, the value chosen, and its
-- row in NetNeural's `device_conflicts` (`remote_ref`; `reported` = NetNeural has been told
-- of its current status).
ALTER TABLE conflict ADD COLUMN local_at INTEGER;
ALTER TABLE conflict ADD COLUMN remote_at INTEGER;
ALTER TABLE conflict ADD COLUMN strategy TEXT;
ALTER TABLE conflict ADD COLUMN resolved_value TEXT;
ALTER TABLE conflict ADD COLUMN remote_ref TEXT;
ALTER TABLE conflict ADD COLUMN reported INTEGER NOT NULL DEFAULT 0;
-- One pending conflict per field and cloud: a field held by one is not merged again.
CREATE UNIQUE INDEX conflict_pending ON conflict(device_id, target, field) WHERE status = 'pending';
CREATE INDEX conflict_unreported ON conflict(reported) WHERE reported = 0;

-- Sync log: a run's rows share its id; counts of conflicts; details as JSON.
ALTER TABLE sync_log ADD COLUMN run_id INTEGER;
ALTER TABLE sync_log ADD COLUMN conflicts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_log ADD COLUMN details TEXT;
CREATE INDEX sync_log_at ON sync_log(at);
