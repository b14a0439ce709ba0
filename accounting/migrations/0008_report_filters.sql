-- Reports filtered by status and the audit log's pages, both fast at tens of millions of rows.

-- The rollup keeps ok and error jobs apart, so a report of failed jobs (their tokens, their
-- cost) reads it too. Rebuilt from usage_log while inserts wait, as in 0004: every row lands
-- in the rollup exactly once.
LOCK TABLE usage_log IN SHARE ROW EXCLUSIVE MODE;

TRUNCATE usage_daily;
ALTER TABLE usage_daily ADD COLUMN status text NOT NULL CHECK (status IN ('ok', 'error'));
ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_pkey;
ALTER TABLE usage_daily ADD PRIMARY KEY (day, team, model, status);

CREATE OR REPLACE FUNCTION usage_daily_add() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO usage_daily AS d
        (day, team, model, status, requests, errors, input_tokens, output_tokens, cost_usd)
    SELECT (ts AT TIME ZONE 'UTC')::date, team, model_requested, status,
           count(*), count(*) FILTER (WHERE status = 'error'),
           sum(input_tokens), sum(output_tokens), sum(cost_usd)
    FROM added
    GROUP BY 1, 2, 3, 4
    -- A fixed order: two accountants updating the same rows lock them in the same order.
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, team, model, status) DO UPDATE SET
        requests      = d.requests + excluded.requests,
        errors        = d.errors + excluded.errors,
        input_tokens  = d.input_tokens + excluded.input_tokens,
        output_tokens = d.output_tokens + excluded.output_tokens,
        cost_usd      = d.cost_usd + excluded.cost_usd;
    RETURN NULL;
END
$$;

INSERT INTO usage_daily
    (day, team, model, status, requests, errors, input_tokens, output_tokens, cost_usd)
SELECT (ts AT TIME ZONE 'UTC')::date, team, model_requested, status,
       count(*), count(*) FILTER (WHERE status = 'error'),
       sum(input_tokens), sum(output_tokens), sum(cost_usd)
FROM usage_log
GROUP BY 1, 2, 3, 4;

-- Audit log pages, newest first by (ts, id). A page's rows are found in an index alone (an
-- index-only scan, never the table: every column a filter reads is in the index) and then
-- read by id. The planner then has no reason to walk the whole log in time order, filtering,
-- for a team or filter that keeps few rows, nor to read the table for an offset's rows. These
-- replace the indexes of 0001 that lack id. The partial indexes hold only the rows they serve
-- (failed jobs, PII flags: few), so inserts pay little for them.
CREATE INDEX usage_log_team_ts_id ON usage_log (team, ts, id)
    INCLUDE (model_requested, status, pii);
DROP INDEX usage_log_team_ts;
CREATE INDEX usage_log_ts_id ON usage_log (ts, id) INCLUDE (team, model_requested, status, pii);
DROP INDEX usage_log_ts;
CREATE INDEX usage_log_team_model_ts_id ON usage_log (team, model_requested, ts, id)
    INCLUDE (status, pii);
CREATE INDEX usage_log_errors_team_ts_id ON usage_log (team, ts, id)
    INCLUDE (model_requested, pii) WHERE status = 'error';
CREATE INDEX usage_log_errors_ts_id ON usage_log (ts, id)
    INCLUDE (team, model_requested, pii) WHERE status = 'error';
CREATE INDEX usage_log_pii_team_ts_id ON usage_log (team, ts, id)
    INCLUDE (model_requested, status) WHERE pii IS NOT NULL;
CREATE INDEX usage_log_pii_ts_id ON usage_log (ts, id)
    INCLUDE (team, model_requested, status) WHERE pii IS NOT NULL;
