-- What each Stripe payment was, tax included, on the credit it bought (billing-rules 2.3): a
-- refund or a dispute of the payment takes back only its share of that credit, never its tax
-- (rule 3.0). NULL for every other entry, and for credits written before this column (their
-- refunds take what they name, as before). Adding a nullable column rewrites nothing.
ALTER TABLE ledger ADD COLUMN paid_micros bigint CHECK (paid_micros IS NULL OR paid_micros > 0);
