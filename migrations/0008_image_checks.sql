-- One row per unit whose image the registry check looks at: what the registry's tag pointed to
-- (remote_digest) and what the unit's container runs (running_digest) at the newest successful
-- check, kept while a later check fails. Times are unix seconds; first_seen_at is when the
-- current update was first seen (0 when up to date); error is the newest check's failure ('' none);
-- next_try is when the unit is due again (the interval, or the backoff after a failure).
CREATE TABLE IF NOT EXISTS image_checks (
    unit TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    remote_digest TEXT NOT NULL DEFAULT '',
    running_digest TEXT NOT NULL DEFAULT '',
    checked_at INTEGER NOT NULL,
    first_seen_at INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    next_try INTEGER NOT NULL DEFAULT 0
);
