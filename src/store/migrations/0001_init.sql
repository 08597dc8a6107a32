-- nn-gateway mirror, schema 1. Never edit a released migration: add the next file.
-- Times are unix milliseconds (UTC). JSON documents are stored as TEXT.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE device (
    id             INTEGER PRIMARY KEY,
    key            TEXT NOT NULL UNIQUE,
    hardware_id    TEXT,
    name           TEXT,
    tags           TEXT NOT NULL DEFAULT '[]',
    origin         TEXT NOT NULL CHECK (origin IN ('mqtt','coap','golioth','netneural','local')),
    first_seen     INTEGER NOT NULL,
    last_seen      INTEGER,
    golioth_id     TEXT UNIQUE,
    netneural_id   TEXT UNIQUE,
    deleted_at     INTEGER
) STRICT;

-- The device's own document, merged from partial updates (RFC 7386).
CREATE TABLE reported_state (
    device_id   INTEGER PRIMARY KEY REFERENCES device(id),
    doc         TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

-- What the device should be. `seq` grows with every change across all devices, so the
-- downlink can ask "what changed since N". `published_seq` is the last seq the MQTT broker
-- acknowledged on the device's desired topic.
CREATE TABLE desired_state (
    device_id      INTEGER PRIMARY KEY REFERENCES device(id),
    doc            TEXT NOT NULL,
    version        INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    updated_by     TEXT NOT NULL,
    published_seq  INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX desired_state_unpublished ON desired_state(seq) WHERE published_seq < seq;

-- Per cloud, the last value both sides agreed on (three-way merge base).
CREATE TABLE sync_base (
    device_id   INTEGER NOT NULL REFERENCES device(id),
    target      TEXT NOT NULL CHECK (target IN ('golioth','netneural')),
    field       TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (device_id, target, field)
) STRICT;

CREATE TABLE telemetry (
    id            INTEGER PRIMARY KEY,
    device_id     INTEGER NOT NULL REFERENCES device(id),
    device_ts     INTEGER,
    received_at   INTEGER NOT NULL,
    payload       TEXT NOT NULL,
    content_type  TEXT NOT NULL
) STRICT;
CREATE INDEX telemetry_device ON telemetry(device_id, id);

-- Everything still owed to a cloud: the retry queue.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY,
    target           TEXT NOT NULL CHECK (target IN ('golioth','netneural')),
    operation        TEXT NOT NULL,
    device_id        INTEGER NOT NULL REFERENCES device(id),
    telemetry_id     INTEGER REFERENCES telemetry(id),
    payload          TEXT,
    idempotency_key  TEXT NOT NULL UNIQUE,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending','in_flight','done','dead')),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
) STRICT;
CREATE INDEX outbox_due ON outbox(target, state, next_attempt_at);
-- Retention asks, per telemetry point, whether anything is still owed on it.
CREATE INDEX outbox_telemetry ON outbox(telemetry_id) WHERE telemetry_id IS NOT NULL;
-- Reported state coalesces: at most one pending row per device and cloud.
CREATE UNIQUE INDEX outbox_one_pending_state ON outbox(target, device_id)
    WHERE state = 'pending' AND operation = 'reported_state';

CREATE TABLE sync_log (
    id           INTEGER PRIMARY KEY,
    target       TEXT NOT NULL,
    direction    TEXT NOT NULL CHECK (direction IN ('up','down','both')),
    operation    TEXT NOT NULL,
    device_id    INTEGER REFERENCES device(id),
    count        INTEGER NOT NULL DEFAULT 0,
    outcome      TEXT NOT NULL,
    error        TEXT,
    duration_ms  INTEGER NOT NULL DEFAULT 0,
    at           INTEGER NOT NULL
) STRICT;

CREATE TABLE conflict (
    id           INTEGER PRIMARY KEY,
    device_id    INTEGER NOT NULL REFERENCES device(id),
    target       TEXT NOT NULL,
    field        TEXT NOT NULL,
    local_value  TEXT,
    remote_value TEXT,
    base_value   TEXT,
    detected_at  INTEGER NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending','resolved','ignored','auto_resolved')),
    resolution   TEXT,
    resolved_by  TEXT,
    resolved_at  INTEGER
) STRICT;

-- Messages that could not be used, kept (bounded) for the operator.
CREATE TABLE rejected (
    id           INTEGER PRIMARY KEY,
    received_at  INTEGER NOT NULL,
    origin       TEXT NOT NULL,
    device       TEXT,
    locator      TEXT NOT NULL,
    reason       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    excerpt      BLOB NOT NULL
) STRICT;

-- Running total of rejections (the table above is trimmed).
INSERT INTO meta(key, value) VALUES ('rejected_total', '0');

-- Last stored MQTT delivery per packet id, to recognise the broker's redeliveries (DUP).
-- `seq` counts deliveries (not time), see store::write::DEDUP_SPAN.
CREATE TABLE mqtt_inbound (
    pkid    INTEGER PRIMARY KEY,
    digest  INTEGER NOT NULL,
    seq     INTEGER NOT NULL
) STRICT;
