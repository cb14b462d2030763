-- The status page and /api/deliveries/<id> look rows up by the unit and the delivery their meta
-- names. Without these indexes each lookup parses the JSON of every row: over 100,000 rows the
-- overview took 1.2 s and one delivery's story 0.5 s. The expressions must stay exactly as the
-- queries in eventlog.go write them, or SQLite will not use the indexes.
CREATE INDEX IF NOT EXISTS idx_event_log_unit ON event_log (json_extract(meta, '$.unit'), action);
CREATE INDEX IF NOT EXISTS idx_event_log_delivery ON event_log (json_extract(meta, '$.delivery'), action);
-- The 30-day chart counts the steps that end a redeploy; only task rows are in this index.
CREATE INDEX IF NOT EXISTS idx_event_log_task_step ON event_log (json_extract(meta, '$.step'), ts) WHERE action = 'github-task';
