-- Every call made for a job (issue 4): [{model, deployment, provider, status, error,
-- latency_ms}, ...] in order. NULL for rows written before it, or from events of a worker
-- that predates it; attempts still counts the calls.
ALTER TABLE usage_log ADD COLUMN attempt_log jsonb;
