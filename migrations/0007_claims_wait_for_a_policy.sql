-- A pending claim may wait for its unit's policy: step names the wait (cooldown, window,
-- awaiting-approval) and next_attempt_at (unix ms) when it ends; approved marks a claim a person
-- approved, so the approval outlasts a wait for the window and a restart.
ALTER TABLE github_deliveries ADD COLUMN approved INTEGER NOT NULL DEFAULT 0;
