-- One row per accepted GitHub delivery id, so a redelivery (GitHub keeps the id) or a second
-- concurrent copy is answered "duplicate delivery" instead of redeploying again, also across
-- a restart of the server. status: dispatching, queued, dispatch-failed.
CREATE TABLE IF NOT EXISTS github_deliveries (
    delivery_id TEXT PRIMARY KEY,
    unit TEXT NOT NULL,
    image TEXT NOT NULL,
    event TEXT NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
