-- Reports read a daily rollup instead of scanning usage_log: a month of a busy gateway is
-- millions of rows, but at most days x teams x models rollup rows.
-- usage_daily is kept by a statement trigger that sees only the rows an insert really added
-- (ON CONFLICT DO NOTHING skips redeliveries), so a job is counted once here as in usage_log.

CREATE TABLE usage_daily (
    day           date NOT NULL,          -- the UTC day of the job's ts
    team          text NOT NULL,
    model         text NOT NULL,          -- the requested alias
    requests      bigint NOT NULL,
    errors        bigint NOT NULL,
    input_tokens  bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cost_usd      numeric(24, 10) NOT NULL,
    PRIMARY KEY (day, team, model)
);
-- Per-team pages (one team's month, one team's trend) without reading other teams' days.
CREATE INDEX usage_daily_team_day ON usage_daily (team, day);

-- Bound to the schema it is created in, whatever search_path the inserting session has.
CREATE FUNCTION usage_daily_add() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO usage_daily AS d
    SELECT (ts AT TIME ZONE 'UTC')::date, team, model_requested,
           count(*), count(*) FILTER (WHERE status = 'error'),
           sum(input_tokens), sum(output_tokens), sum(cost_usd)
    FROM added
    GROUP BY 1, 2, 3
    -- A fixed order: two accountants updating the same rows lock them in the same order.
    ORDER BY 1, 2, 3
    ON CONFLICT (day, team, model) DO UPDATE SET
        requests      = d.requests + excluded.requests,
        errors        = d.errors + excluded.errors,
        input_tokens  = d.input_tokens + excluded.input_tokens,
        output_tokens = d.output_tokens + excluded.output_tokens,
        cost_usd      = d.cost_usd + excluded.cost_usd;
    RETURN NULL;
END
$$;

-- Inserts wait while the trigger is created and the backfill runs, so every row lands in
-- the rollup exactly once: either in the backfill or through the trigger.
LOCK TABLE usage_log IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER usage_daily_add
    AFTER INSERT ON usage_log
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION usage_daily_add();

INSERT INTO usage_daily
SELECT (ts AT TIME ZONE 'UTC')::date, team, model_requested,
       count(*), count(*) FILTER (WHERE status = 'error'),
       sum(input_tokens), sum(output_tokens), sum(cost_usd)
FROM usage_log
GROUP BY 1, 2, 3;
