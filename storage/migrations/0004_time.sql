-- Time-driven billing: the shared test clock, when each org next needs waking, archived
-- periods, and the scheduler's record of runs.

-- METERGATE_TEST_CLOCK=1 only: how far the service's clock is ahead of real time.
CREATE TABLE test_clock (
    id        int PRIMARY KEY CHECK (id = 1),
    offset_us bigint NOT NULL CHECK (offset_us >= 0)
);

-- The earliest time at which time alone changes the org (period end, an expiry, a dunning
-- step). Never later than the truth: waking an org early is a no-op, late would be a bug.
CREATE TABLE org_due (
    org_id text PRIMARY KEY,
    due_at timestamptz NOT NULL
);
CREATE INDEX org_due_at ON org_due (due_at);

-- A period's usage, written in the commit that started the next period.
CREATE TABLE period_usage (
    org_id            text NOT NULL,
    period_key        text NOT NULL,
    started_at        timestamptz NOT NULL,
    ended_at          timestamptz NOT NULL,
    usage_micros      bigint NOT NULL,
    quota_used_micros bigint NOT NULL,
    plan_id           text NOT NULL,
    plan_version      int NOT NULL,
    PRIMARY KEY (org_id, started_at)
);

-- Outbound webhooks: when each pending event may next be tried, and why the last try failed.
ALTER TABLE outbox ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT '-infinity';
ALTER TABLE outbox ADD COLUMN last_error text;
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE status = 'pending';

-- Lease time per minute, for usage hours in the monthly accounting.
ALTER TABLE usage_rollups ADD COLUMN duration_ms bigint NOT NULL DEFAULT 0;
