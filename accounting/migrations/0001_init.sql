-- Usage rows (one per finished job) and the team registry.
-- Runs with search_path set to the gateway's schema, so names are unqualified.

CREATE TABLE usage_log (
    -- A surrogate key gives audit pages a stable order to page through.
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The idempotency key: a redelivered usage event never counts twice.
    job_id          text NOT NULL UNIQUE,
    team            text NOT NULL,
    model_requested text NOT NULL,
    model_used      text,
    provider        text,
    deployment      text,
    input_tokens    bigint NOT NULL DEFAULT 0,
    output_tokens   bigint NOT NULL DEFAULT 0,
    cached_tokens   bigint NOT NULL DEFAULT 0,
    cost_usd        numeric(20, 10) NOT NULL DEFAULT 0,
    status          text NOT NULL CHECK (status IN ('ok', 'error')),
    error_code      text,
    queued_ms       double precision NOT NULL DEFAULT 0,
    latency_ms      double precision NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    fallback_used   boolean NOT NULL DEFAULT false,
    cached          boolean NOT NULL DEFAULT false,
    reply_delivered boolean NOT NULL DEFAULT true,
    worker          text NOT NULL DEFAULT '',
    -- When the job finished (the event's time), not when accounting caught up with it.
    ts              timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

-- Per-team reports (spend, budget remaining) and whole-gateway reports (daily trend).
CREATE INDEX usage_log_team_ts ON usage_log (team, ts);
CREATE INDEX usage_log_ts ON usage_log (ts);

CREATE TABLE teams (
    name       text PRIMARY KEY,
    enabled    boolean NOT NULL DEFAULT true,
    -- Limits and budgets, shaped by the code that reads them; {} means the defaults.
    config     jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
