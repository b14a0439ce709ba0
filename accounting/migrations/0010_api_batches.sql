-- The HTTP front door's Files and Batches (OpenAI) and Message Batches (Anthropic) APIs.
-- Here rather than in Redis or on a disk: every front-door process reads the same rows, a
-- commit is durable (Redis may lose its data; a pod's disk goes with the pod), and whichever
-- process takes a batch over after another stopped finds its input, its progress and the
-- lines already written. Every row carries its team, and every query is by team.

-- A file's bytes are kept in parts (about 1 MiB each, in order): an upload or a batch's
-- output is written, and content is read, one part at a time, never whole in memory.
CREATE TABLE api_files (
    id         text PRIMARY KEY,
    team       text NOT NULL REFERENCES teams (name) ON DELETE CASCADE,
    -- 'batch' (uploaded), 'batch_output', 'message_batch_requests', 'message_batch_results'.
    purpose    text NOT NULL,
    filename   text NOT NULL,
    bytes      bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- False while a batch writes it: nobody sees it until the batch has ended.
    ready      boolean NOT NULL DEFAULT true
);
CREATE INDEX api_files_team ON api_files (team, created_at, id);

CREATE TABLE api_file_parts (
    file_id text NOT NULL REFERENCES api_files (id) ON DELETE CASCADE,
    seq     integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (file_id, seq)
);

CREATE TABLE api_batches (
    id                text PRIMARY KEY,
    team              text NOT NULL REFERENCES teams (name) ON DELETE CASCADE,
    api               text NOT NULL CHECK (api IN ('openai', 'anthropic')),
    -- OpenAI's statuses; the Message Batches API shows in_progress, canceling or ended.
    status            text NOT NULL CHECK (status IN ('validating', 'in_progress', 'finalizing',
                          'completed', 'failed', 'expired', 'cancelling', 'cancelled')),
    -- The API key whose team created it: its jobs are signed with that key's stored hash.
    key_id            text NOT NULL,
    input_file_id     text NOT NULL,
    endpoint          text NOT NULL,
    completion_window text NOT NULL,
    metadata          jsonb,
    output_file_id    text,
    error_file_id     text,
    errors            jsonb,
    -- Requests by how they ended so far; ``refused`` were invalid and never published.
    total             integer NOT NULL DEFAULT 0,
    done              integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0,
    expired           integer NOT NULL DEFAULT 0,
    canceled          integer NOT NULL DEFAULT 0,
    refused           integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz,
    -- The runner's side: the step it is on ('submit', 'collect', 'clean': forget the
    -- gateway's copy, 'done'), who holds it and until when.
    phase             text NOT NULL DEFAULT 'submit'
                          CHECK (phase IN ('submit', 'collect', 'clean', 'done')),
    runner            text,
    lease_until       timestamptz,
    -- Runs that ended in a fault of ours (not an outage): past a few, the batch fails.
    faults            integer NOT NULL DEFAULT 0
);
CREATE INDEX api_batches_team ON api_batches (team, created_at, id);
CREATE INDEX api_batches_to_run ON api_batches (created_at) WHERE phase <> 'done';
