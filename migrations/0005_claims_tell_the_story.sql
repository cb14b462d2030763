-- The status page, the stories and the chart read the claims table, so event_log rows no longer
-- pay for JSON expression indexes. step is the newest step of the task that runs a claim (its
-- last one once the claim is done); it is filled in from the log before the indexes go.
ALTER TABLE github_deliveries ADD COLUMN step TEXT NOT NULL DEFAULT '';
UPDATE github_deliveries SET step = coalesce((SELECT json_extract(meta, '$.step') FROM event_log
    WHERE json_extract(meta, '$.delivery') = github_deliveries.covered_by AND action = 'github-task'
    ORDER BY id DESC LIMIT 1), '')
    WHERE covered_by IS NOT NULL;
DROP INDEX IF EXISTS idx_event_log_unit;
DROP INDEX IF EXISTS idx_event_log_delivery;
DROP INDEX IF EXISTS idx_event_log_task_step;
CREATE INDEX IF NOT EXISTS idx_github_deliveries_unit ON github_deliveries (unit, claimed_at);
-- It covers the chart's query, which reads a month of claims.
CREATE INDEX IF NOT EXISTS idx_github_deliveries_claimed ON github_deliveries (claimed_at, status, step, covered_by, delivery_id);
