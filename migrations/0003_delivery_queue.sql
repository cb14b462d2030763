-- The claim row is the delivery queue: a delivery is answered 202 once its claim is committed
-- as 'pending', and the server's dispatcher later starts one task for every pending claim of the
-- same unit and image (covered_by names the claim whose task unit runs it).
-- status: pending → dispatching (systemd-run under way) → dispatched (task running) → done;
-- or failed (systemd-run kept failing; error says why). A failed claim may be claimed again by a
-- redelivery. claimed_at (unix ms) orders the queue; next_attempt_at (unix ms) delays a retry.
ALTER TABLE github_deliveries ADD COLUMN path TEXT NOT NULL DEFAULT '';
ALTER TABLE github_deliveries ADD COLUMN digest TEXT NOT NULL DEFAULT '';
ALTER TABLE github_deliveries ADD COLUMN claimed_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE github_deliveries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE github_deliveries ADD COLUMN next_attempt_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE github_deliveries ADD COLUMN covered_by TEXT;
ALTER TABLE github_deliveries ADD COLUMN task_unit TEXT;
ALTER TABLE github_deliveries ADD COLUMN error TEXT;

-- The statuses of the version before the queue: a queued delivery's task was started (done as
-- far as the queue is concerned); a refused or failed one may be redelivered; one left
-- 'dispatching' by a crash is checked at start like any other.
UPDATE github_deliveries SET status = 'done' WHERE status = 'queued';
UPDATE github_deliveries SET status = 'failed' WHERE status IN ('busy', 'dispatch-failed');
UPDATE github_deliveries SET claimed_at = received_at * 1000, task_unit = 'webhook-task-' || delivery_id,
    covered_by = delivery_id
    WHERE claimed_at = 0;

CREATE INDEX IF NOT EXISTS idx_github_deliveries_queue ON github_deliveries (status, unit);
