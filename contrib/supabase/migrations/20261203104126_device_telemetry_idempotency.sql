-- nn-gateway: exactly-once bulk telemetry into device_telemetry_history.
--
-- The gateway inserts telemetry in batches with
--   POST /rest/v1/device_telemetry_history?on_conflict=idempotency_key
--   Prefer: resolution=ignore-duplicates,return=minimal
-- so that a batch sent again after its first attempt committed (the answer was lost) stores
-- nothing twice. PostgREST's on_conflict needs a unique index on the column: a plain one
-- (not partial, or ON CONFLICT cannot infer it). NULLs never conflict with each other, so
-- NetNeural's own writers (record_device_telemetry, which sets no key) are unaffected.
--
-- Idempotent: safe to apply more than once. Apply with `supabase db push` (after copying it
-- into supabase/migrations/) or `psql "$DATABASE_URL" -f <this file>`.
-- On a large table, build the index first with CREATE UNIQUE INDEX CONCURRENTLY (outside a
-- transaction) to avoid blocking writers; this statement then finds it and does nothing.

alter table public.device_telemetry_history
    add column if not exists idempotency_key text;

create unique index if not exists device_telemetry_history_idempotency_key_key
    on public.device_telemetry_history (idempotency_key);

comment on column public.device_telemetry_history.idempotency_key is
    'Set by nn-gateway: unique per telemetry point, stable across retries. NULL for other writers.';
