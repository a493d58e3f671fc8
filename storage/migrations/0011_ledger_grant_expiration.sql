-- What of a grant lapsed unused: a dispute takes back only what its payment's credit did not
-- lapse (billing-rules 3.6).
CREATE INDEX ledger_grant_expiration ON ledger (org_id, grant_id) WHERE kind = 'expiration';
