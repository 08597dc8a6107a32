-- nn-gateway mirror, schema 2: telemetry is delivered by a per-cloud cursor, not by outbox rows.
--
-- Telemetry is an append-only log ordered by id, so it needs no queue row per point: each cloud
-- that takes telemetry has a cursor, every point with an id at or below it is settled for that
-- cloud (delivered, skipped by the device's sync direction, or dead-lettered below). A batch is
-- the id range above the cursor; its per-point idempotency key is derived from the id
-- ("tm:<install_id>:<id>"), not stored. Ingest then writes nothing per point for the uplink.

CREATE TABLE telemetry_cursor (
    target             TEXT PRIMARY KEY CHECK (target IN ('golioth','netneural')),
    delivered_through  INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
) STRICT;

-- Points a cloud refused for what they carry (found by bisecting a refused batch). The
-- cursor moves past them; `nn-gateway queue retry` can send them again.
CREATE TABLE telemetry_dead (
    target        TEXT NOT NULL CHECK (target IN ('golioth','netneural')),
    telemetry_id  INTEGER NOT NULL,
    device_id     INTEGER NOT NULL REFERENCES device(id),
    error         TEXT NOT NULL,
    at            INTEGER NOT NULL,
    -- Set by `queue retry --all-dead`: the lane sends it again.
    retry         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (target, telemetry_id)
) STRICT;

-- Carry over what schema 1 owed: each cursor starts just below the oldest point still owed.
INSERT INTO telemetry_cursor(target, delivered_through, updated_at)
    SELECT target, min(telemetry_id) - 1, 0 FROM outbox
    WHERE operation = 'telemetry' AND state IN ('pending', 'in_flight') AND telemetry_id IS NOT NULL
    GROUP BY target;
INSERT INTO telemetry_dead(target, telemetry_id, device_id, error, at)
    SELECT target, telemetry_id, device_id, coalesce(last_error, 'dead'), updated_at FROM outbox
    WHERE operation = 'telemetry' AND state = 'dead' AND telemetry_id IS NOT NULL
      AND EXISTS (SELECT 1 FROM telemetry t WHERE t.id = outbox.telemetry_id);
DELETE FROM outbox WHERE operation = 'telemetry';
DROP INDEX outbox_telemetry;
-- The lane picks due rows per cloud in order.
CREATE INDEX outbox_device ON outbox(target, device_id, state);
