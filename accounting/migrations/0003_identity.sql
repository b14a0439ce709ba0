-- Tenancy and audit (issue 6): who published each job, the teams' security settings,
-- API keys (hashes only), and captured content kept apart from the usage rows.

-- Job ids are chosen by producers, so they are unique per team, not across teams: with one
-- global key a team could reuse another's job id and have its own usage dropped as a duplicate.
ALTER TABLE usage_log DROP CONSTRAINT usage_log_job_id_key;
ALTER TABLE usage_log ADD CONSTRAINT usage_log_team_job_id_key UNIQUE (team, job_id);

-- The proven publisher of each job: 'broker:<user>', 'api_key:<key id>' or 'queue'.
ALTER TABLE usage_log ADD COLUMN identity text;
-- PII families found in the prompt (comma-separated) when the team's policy is warn or redact.
ALTER TABLE usage_log ADD COLUMN pii text;

-- One row per team that has a security setting; a team without one gets the defaults.
CREATE TABLE team_security (
    team        text PRIMARY KEY REFERENCES teams (name) ON DELETE CASCADE,
    identity    text NOT NULL DEFAULT 'queue' CHECK (identity IN ('queue', 'broker', 'api_key')),
    pii         text NOT NULL DEFAULT 'off' CHECK (pii IN ('off', 'warn', 'redact', 'block')),
    capture     text NOT NULL DEFAULT 'none' CHECK (capture IN ('none', 'redacted', 'full')),
    -- The team's RabbitMQ user: the only thing workers need to map a proven user_id to a team.
    -- Its password is shown once when generated and stored nowhere.
    broker_user text UNIQUE,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys, for deployments that cannot give each team its own broker user.
-- Only the SHA-256 of the key is kept: the key has 256 bits of entropy, so a fast hash is
-- as safe as a slow one against guessing, and an exact-match index can look it up.
CREATE TABLE api_keys (
    id         text PRIMARY KEY,
    team       text NOT NULL REFERENCES teams (name) ON DELETE CASCADE,
    key_hash   text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- Prompts and responses of teams whose capture is 'redacted' or 'full', pruned by age.
CREATE TABLE audit_content (
    job_id   text NOT NULL,
    team     text NOT NULL,
    capture  text NOT NULL CHECK (capture IN ('redacted', 'full')),
    prompt   jsonb NOT NULL,
    response jsonb,
    ts       timestamptz NOT NULL,
    PRIMARY KEY (team, job_id)
);
CREATE INDEX audit_content_ts ON audit_content (ts);
