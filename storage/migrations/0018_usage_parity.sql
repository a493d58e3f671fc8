-- Usage parity (docs/operations/parity.md): the platform's own usage per org and UTC hour, as it
-- posts it (POST /v1/parity/usage), in metergate's units, compared with usage_rollups summed over
-- the same hour. One row per (org, hour): a post of an (org, hour) again replaces it. The org
-- need not exist in metergate: usage the platform saw for an org metergate does not know is a
-- finding of the comparison, not a bad post.
CREATE TABLE usage_parity_posted (
    org_id       text NOT NULL,
    hour         timestamptz NOT NULL CHECK (extract(epoch FROM hour) = floor(extract(epoch FROM hour) / 3600) * 3600),
    memory_mb_ms bigint NOT NULL CHECK (memory_mb_ms >= 0),
    cpu_ms       bigint NOT NULL CHECK (cpu_ms >= 0),  -- vCPU·ms
    disk_mb_ms   bigint NOT NULL CHECK (disk_mb_ms >= 0),
    units        jsonb,  -- {unit name: count}, NULL for none
    posted_at    timestamptz NOT NULL,
    PRIMARY KEY (org_id, hour)
);

-- A report reads a window of hours across orgs.
CREATE INDEX usage_parity_posted_hour ON usage_parity_posted (hour);
