-- metergate: no-transaction
-- Folding usage_rollups (storage/retention.py fold_next_rollup_hour; docs/operations/retention.md
-- 'Usage detail'): rows older than METERGATE_USAGE_DETAIL_DAYS become one row per (org, lease,
-- hour) at the hour's start. Each statement is safe to run again.

-- The fold reads one hour of rows across orgs, and finds the next hour holding any, by minute
-- (the primary key leads with org_id, so without this each hour would read the whole table).
CREATE INDEX CONCURRENTLY IF NOT EXISTS usage_rollups_minute ON usage_rollups (minute);

-- How far folding has gone: the next hour to fold (NULL: not started).
CREATE TABLE IF NOT EXISTS usage_rollup_fold (
    id        int PRIMARY KEY CHECK (id = 1),
    next_hour timestamptz
);

INSERT INTO usage_rollup_fold (id, next_hour) VALUES (1, NULL) ON CONFLICT DO NOTHING;

-- The sum of an hour's `units` (per unit name), as the shard's upsert adds them: mg_units_add.
CREATE OR REPLACE AGGREGATE mg_units_sum(jsonb) (SFUNC = mg_units_add, STYPE = jsonb);
