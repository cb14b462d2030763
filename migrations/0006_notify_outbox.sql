-- notify_outbox: each message to send (notifyTx), written in the transaction of the row it tells
-- of. targets holds each target's state by its name without secrets ({"state":"sent"} after a 2xx,
-- so a restart resends only to the others); state is pending until every target is sent, or failed
-- once the retry horizon has passed.
CREATE TABLE notify_outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    delivery_id TEXT NOT NULL DEFAULT '',
    fields TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    targets TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX idx_notify_outbox_due ON notify_outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX idx_notify_outbox_delivery ON notify_outbox (delivery_id);
