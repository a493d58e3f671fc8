-- The credit each Stripe payment bought, found by the payment alone: a dispute or a refund
-- names its payment intent (or charge), never the org.
CREATE INDEX ledger_stripe_payment ON ledger (idempotency_key) WHERE idempotency_key LIKE 'stripe:payment:%';
