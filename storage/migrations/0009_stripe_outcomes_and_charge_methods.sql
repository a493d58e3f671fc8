-- Inbound Stripe events are answered 2xx whether or not they could be applied (a 4xx makes
-- Stripe retry for days and then disable the endpoint), so each one records what became of
-- it: applied, ignored (nothing to do, or not ours: another mode, no org) or dead_letter (it
-- names something metergate cannot apply), with why. The operator lists the last two.
ALTER TABLE inbound_webhooks
    ADD COLUMN outcome text NOT NULL DEFAULT 'applied' CHECK (outcome IN ('applied', 'ignored', 'dead_letter')),
    ADD COLUMN reason  text;
-- Rows from before: a Stripe event whose answer applied nothing was ignored (a 422 was never
-- recorded). Matched on the stored bytes, so no row can fail a JSON cast here.
UPDATE inbound_webhooks SET outcome = 'ignored', reason = 'nothing_to_apply'
 WHERE source = 'stripe' AND position(convert_to('"applied":[]', 'UTF8') IN response) > 0;
CREATE INDEX inbound_webhooks_unapplied ON inbound_webhooks (received_at DESC, event_id DESC)
 WHERE outcome <> 'applied';

-- The payment method an auto-recharge charge was first sent with, per Stripe idempotency key:
-- every later attempt under that key (after a restart too) sends the same parameters, or
-- Stripe refuses the key. Stripe keeps a key 24 hours; rows older than 2 days are pruned.
CREATE TABLE charge_payment_methods (
    idempotency_key   text PRIMARY KEY,
    payment_method_id text NOT NULL,
    chosen_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX charge_payment_methods_chosen_at ON charge_payment_methods (chosen_at);

-- Customers deleted in Stripe (customer.deleted): the org's mapping is dropped so that
-- Checkout and the portal make a new customer; the old one is kept here, and how many an org
-- had numbers the idempotency key of the next customer it gets.
CREATE TABLE stripe_customers_forgotten (
    customer_id  text PRIMARY KEY,
    org_id       text NOT NULL,
    forgotten_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_customers_forgotten_org ON stripe_customers_forgotten (org_id);
