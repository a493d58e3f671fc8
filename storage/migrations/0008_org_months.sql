-- The monthly accounting (GET /v1/orgs/{id}/months, the billing page) of months that are over,
-- kept once computed: a read then goes through the current month's ledger only, not an org's
-- whole history (a usage row per minute: ~525k a year). `carry` is what the month hands on to
-- the next (the free and paid pools, and the pool of each grant that may still expire).
CREATE TABLE org_months (
    org_id text NOT NULL,
    month  text NOT NULL,  -- YYYY-MM, UTC
    summary jsonb NOT NULL,
    carry  jsonb NOT NULL,
    PRIMARY KEY (org_id, month)
);
