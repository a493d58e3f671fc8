-- One Stripe customer per org, created once (the first one stored wins a race).
CREATE TABLE stripe_customers (
    org_id      text PRIMARY KEY REFERENCES orgs (org_id),
    customer_id text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
