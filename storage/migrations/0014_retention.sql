-- metergate: no-transaction
-- Retention and the periodic queries (docs/operations/retention.md): every query a job runs on
-- a schedule reads an index, never the whole table, and the retention jobs find what they may
-- delete by time. Built CONCURRENTLY, outside a transaction (storage/migrator.py): commits go on
-- while they build; every statement can run again after a crash halfway.

-- The meter roll-up, every minute, sums the last 35 days of invoiced usage per (org, hour)
-- and what meter events already carry per (org, hour): both from the index alone (the ledger's
-- covering index replaces 0009's ledger_invoiced_minute, which made a heap fetch per row).
-- The retention of sent meter events deletes by hour.
CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_invoiced_minute_covering ON ledger (usage_minute) INCLUDE (org_id, invoiced_micros)
    WHERE invoiced_micros > 0;
DROP INDEX CONCURRENTLY IF EXISTS ledger_invoiced_minute;
CREATE INDEX CONCURRENTLY IF NOT EXISTS meter_events_hour ON meter_events (hour, org_id) INCLUDE (value, meter);

-- Outbox retention (delivered and dead rows by the time of their last outcome, which
-- next_attempt_at holds once they are finished) and the dead-letter gauge; pending rows have
-- their own index (outbox_due) and are never deleted.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_finished ON outbox (status, next_attempt_at) WHERE status <> 'pending';

-- Idempotency-Key answers and inbound webhook ids, deleted by age.
CREATE INDEX CONCURRENTLY IF NOT EXISTS http_idempotency_created ON http_idempotency (created_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS inbound_webhooks_received ON inbound_webhooks (received_at);

-- Ledger folding (storage/retention.py fold_next_hour): the usage rows of one hour across
-- orgs, and how far folding has gone (the next hour to fold; NULL: not started).
CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_usage_minute ON ledger (usage_minute) WHERE usage_minute IS NOT NULL;
CREATE TABLE IF NOT EXISTS ledger_fold (
    id        int PRIMARY KEY CHECK (id = 1),
    next_hour timestamptz
);
INSERT INTO ledger_fold (id, next_hour) VALUES (1, NULL) ON CONFLICT DO NOTHING;
