-- Outbound message ids that no restore can repeat. They were 'msg_' || id, from a sequence
-- that a restore rewinds: events made after a restore then reused the ids of events receivers
-- had already taken, and receivers that dedupe on the id dropped them. New events get a random
-- id at insert; events from before keep their old one (NULL here: 'msg_' || id).
ALTER TABLE outbox ADD COLUMN message_id text;
ALTER TABLE outbox ALTER COLUMN message_id SET DEFAULT 'msg_' || replace(gen_random_uuid()::text, '-', '');

-- Holds an operator (or a shard that found the database behind its memory) puts on the
-- service: 'charges' keeps auto-recharge from sending new charges to Stripe until Stripe's
-- record since a restore has been read back (`metergate inbound reconcile`), since a charge the
-- restore forgot would otherwise be asked for again, and made twice.
-- read_back_from: only reading Stripe back from this instant or earlier takes the hold off.
CREATE TABLE service_holds (
    name           text PRIMARY KEY,
    reason         text NOT NULL,
    since          timestamptz NOT NULL DEFAULT now(),
    read_back_from timestamptz
);
