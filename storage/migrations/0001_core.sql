-- Org registry. slot = stable hash(org_id) mod SLOT_COUNT; the slot's shard owns the org.
CREATE TABLE orgs (
    org_id       text PRIMARY KEY,
    email        text NOT NULL,
    billing_mode text NOT NULL CHECK (billing_mode IN ('prepaid', 'postpaid')),
    slot         int  NOT NULL,
    created_at   timestamptz NOT NULL
);

-- Fixed slot space mapped to shards. A shard proves it still owns its slots by the epoch
-- it claimed in shard_owners: each commit reads that row FOR SHARE, and a new owner's
-- claim (UPDATE) waits for in-flight commits and then fences the old owner out.
CREATE TABLE slots (
    slot  int PRIMARY KEY,
    shard int NOT NULL
);
CREATE TABLE shard_owners (
    shard int PRIMARY KEY,
    epoch bigint NOT NULL
);

-- Latest snapshot of each org; the journal holds only the commands after it.
CREATE TABLE org_snapshots (
    org_id     text PRIMARY KEY REFERENCES orgs (org_id),
    seq        bigint NOT NULL,
    state      bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE org_journal (
    org_id text NOT NULL,
    seq    bigint NOT NULL,
    entry  bytea NOT NULL,
    PRIMARY KEY (org_id, seq)
);

-- Money history. Usage debits are rolled up per org and minute (one row, updated in
-- place); every other entry is one row. SUM(amount_micros) per org = its balance.
CREATE TABLE ledger (
    entry_id        text PRIMARY KEY,
    org_id          text NOT NULL,
    kind            text NOT NULL,
    amount_micros   bigint NOT NULL,
    grant_id        text,
    expires_at      timestamptz,
    note            text,
    idempotency_key text,
    request_hash    text,
    usage_minute    timestamptz,
    created_at      timestamptz NOT NULL
) WITH (fillfactor = 70);  -- room for HOT updates of the per-minute usage rows
CREATE UNIQUE INDEX ledger_org_idempotency ON ledger (org_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX ledger_org_usage_minute ON ledger (org_id, usage_minute)
    WHERE usage_minute IS NOT NULL;
CREATE INDEX ledger_org_newest ON ledger (org_id, created_at DESC, entry_id DESC);

-- Tick ids seen (16-byte hash of org_id and tick_id), kept >= 24 h for dedupe across restarts.
CREATE TABLE tick_ids (
    id      bytea PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tick_ids_seen_at ON tick_ids USING brin (seen_at);

-- Usage detail, rolled up per lease and minute of the tick's start.
CREATE TABLE usage_rollups (
    org_id       text NOT NULL,
    lease_id     text NOT NULL,
    minute       timestamptz NOT NULL,
    memory_mb_ms bigint NOT NULL,
    cpu_ms       bigint NOT NULL,
    disk_mb_ms   bigint NOT NULL,
    ticks        bigint NOT NULL,
    cost_nanos   bigint NOT NULL,  -- floor of the exact cost; the ledger holds the exact debit
    units        jsonb,
    PRIMARY KEY (org_id, minute, lease_id)
) WITH (fillfactor = 70);  -- rollups are updated in place every commit of their minute

CREATE FUNCTION mg_units_add(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE (SELECT jsonb_object_agg(k, COALESCE((a ->> k)::numeric, 0) + COALESCE((b ->> k)::numeric, 0))
              FROM (SELECT jsonb_object_keys(a) AS k UNION SELECT jsonb_object_keys(b)) AS keys)
    END
$$;

-- Events written in the same transaction as the change that produced them.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    org_id       text NOT NULL,
    type         text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    status       text NOT NULL DEFAULT 'pending',
    attempts     int NOT NULL DEFAULT 0,
    delivered_at timestamptz
);
CREATE INDEX outbox_org ON outbox (org_id, id);

-- First responses of mutating requests sent with an Idempotency-Key.
CREATE TABLE http_idempotency (
    scope        text NOT NULL,
    key          text NOT NULL,
    request_hash text NOT NULL,
    status       int NOT NULL,
    body         bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
