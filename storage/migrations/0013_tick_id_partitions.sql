-- Tick ids partitioned by when they were first seen (storage/tick_ids.py): the prune job drops
-- whole partitions past METERGATE_TICK_ID_RETENTION_S instead of deleting rows, which could not
-- keep up (50k deletes a minute against 10k inserts a second). There is no unique key: Postgres
-- allows one on a partitioned table only with the partition key in it, and a resend of a tick
-- is seen later than its first sighting. A claim looks an id up in every partition (the index
-- on id) and inserts it if absent; one committer per org at a time makes that exact.
--
-- The rows of the old table are copied into one partition, tick_ids_legacy, which holds every
-- time up to this migration and is dropped whole once all of it is past the retention. Rows
-- the shards write before the prune job first runs go to tick_ids_default; the job moves them
-- into the partition it creates for them. On a large old table, prune it first (the copy takes
-- time in proportion to its rows, with commits waiting).

ALTER TABLE tick_ids RENAME TO tick_ids_unpartitioned;
ALTER INDEX tick_ids_pkey RENAME TO tick_ids_unpartitioned_pkey;
DROP INDEX tick_ids_seen_at;

CREATE TABLE tick_ids (
    id      bytea NOT NULL,        -- 16-byte hash of org_id and tick_id (actors/shard.py tick_key)
    seen_at timestamptz NOT NULL   -- the service's clock in the commit that first claimed it
) PARTITION BY RANGE (seen_at);
CREATE INDEX tick_ids_id ON tick_ids (id);
CREATE TABLE tick_ids_default PARTITION OF tick_ids DEFAULT;

-- Up to now by the service's clock (the test clock's offset included, when there is one), and
-- past every row copied: nothing from the old table is left to the default partition.
DO $$
DECLARE
    upto timestamptz := greatest(
        now() + coalesce((SELECT offset_us FROM test_clock WHERE id = 1), 0) * interval '1 microsecond',
        (SELECT max(seen_at) + interval '1 microsecond' FROM tick_ids_unpartitioned));
BEGIN
    EXECUTE format('CREATE TABLE tick_ids_legacy PARTITION OF tick_ids FOR VALUES FROM (MINVALUE) TO (%L)', upto);
END
$$;

INSERT INTO tick_ids (id, seen_at) SELECT id, seen_at FROM tick_ids_unpartitioned;
DROP TABLE tick_ids_unpartitioned;
