-- Stripe meter events for postpaid orgs: one row per org, meter and closed hour, with an
-- identifier derived from those, so a retry (or a second scheduler) sends the same event.
-- status: shadow (computed, not sent), pending, sent, consumed (before BILL_FROM: never billed).
CREATE TABLE meter_events (
    identifier      text PRIMARY KEY,
    org_id          text NOT NULL,
    meter           text NOT NULL,
    hour            timestamptz NOT NULL,
    value           bigint NOT NULL,
    status          text NOT NULL,
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX meter_events_pending ON meter_events (next_attempt_at) WHERE status = 'pending';
