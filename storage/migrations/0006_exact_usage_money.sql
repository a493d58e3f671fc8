-- Usage money kept exact where it is reported and billed (billing-rules 6).

-- This version changes billing rules that a journal replays (postpaid usage past credit is
-- invoiced, not debt; a plan switch no longer cuts the period; ...). A journal tail written by
-- the version before would replay under the new rules and disagree with its own ledger, so an
-- upgrade needs every org snapshotted first: stop the old version cleanly (Ctrl-C or SIGTERM:
-- its stop drains every shard), then start this one.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM org_journal) THEN
        RAISE EXCEPTION 'metergate: orgs have journal entries written by the previous version; start the previous version, stop it cleanly (it snapshots every org), then start this one';
    END IF;
END $$;

-- A rollup's cost in scaled units (1/1,024,000 nano-USD), summed exactly: a day's or a lease's
-- cost no longer drifts from the ledger by a floor taken at every commit. Rows written before
-- keep the nanos they had.
ALTER TABLE usage_rollups ADD COLUMN cost_scaled numeric;
UPDATE usage_rollups SET cost_scaled = cost_nanos::numeric * 1024000;
ALTER TABLE usage_rollups ALTER COLUMN cost_scaled SET NOT NULL;
ALTER TABLE usage_rollups DROP COLUMN cost_nanos;

-- A postpaid org's usage that neither the quota nor credit covered: invoiced through Stripe,
-- not taken from the balance (so SUM(amount_micros) stays the balance). Per usage row (org and
-- minute); the meter roll-up sums it per hour.
ALTER TABLE ledger ADD COLUMN invoiced_micros bigint NOT NULL DEFAULT 0;

-- Meter events carry money from now on (meter 'usage_micros'). Hours that an older version
-- already rolled up as quantities are not rolled up again: money is metered from the hour
-- after the last one rolled up (from the start on a new database).
CREATE TABLE meter_money_from (
    id   int PRIMARY KEY CHECK (id = 1),
    hour timestamptz NOT NULL
);
INSERT INTO meter_money_from (id, hour)
    SELECT 1, coalesce(max(hour) + interval '1 hour', '-infinity') FROM meter_events;

-- The meter roll-up reads invoiced usage by minute across orgs, every minute.
CREATE INDEX ledger_invoiced_minute ON ledger (usage_minute) WHERE invoiced_micros > 0;
