-- The credit each Stripe payment bought, found by the payment alone: a dispute or a refund
-- names its payment intent (or charge), never the org.
CREATE INDEX ledger_stripe_payment ON ledger (idempotency_key) WHERE idempotency_key LIKE 'stripe:payment:%';
-- What of a grant lapsed unused (a dispute takes back only what the payment's credit did not lapse).
CREATE INDEX ledger_grant_expiration ON ledger (org_id, grant_id) WHERE kind = 'expiration';
