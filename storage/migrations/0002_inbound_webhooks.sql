-- Inbound webhook messages already applied, by source and the sender's message id.
CREATE TABLE inbound_webhooks (
    source      text NOT NULL,
    event_id    text NOT NULL,
    event_type  text NOT NULL,
    status      int NOT NULL,
    response    bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);
