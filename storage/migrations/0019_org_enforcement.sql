-- Enforcement per org as the Stripe meter sees it (billing-rules 2.12, serve_app/routes/orgs.py
-- PUT /v1/orgs/{id}/enforcement): an org in shadow has no meter event sent (its events are kept
-- as 'shadow'); an org cut over at `cutover` has its hours before it 'consumed' (never sent)
-- and those from it on sent. No row: an org never in shadow, billed as before. The edge writes
-- the row around the org's command so that a crash between the two leaves events withheld,
-- never sent: going to shadow, the row first; a cutover, the row after the command.
CREATE TABLE org_enforcement (
    org_id     text PRIMARY KEY,
    shadow     bool NOT NULL,
    cutover    timestamptz,  -- a whole UTC hour (the edge refuses others)
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT (shadow AND cutover IS NOT NULL))
);
