-- Org tokens issued before this instant are void (POST /v1/orgs/{id}/tokens/revoke): a token
-- handed to the wrong person stops working without changing the signing secret of every org.
ALTER TABLE orgs ADD COLUMN tokens_valid_after timestamptz;
