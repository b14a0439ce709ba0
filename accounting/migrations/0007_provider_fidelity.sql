-- Token classes billed apart (issue 23) and what a provider could not take as asked. The
-- parameter lists are comma-separated names, NULL when nothing was dropped or changed;
-- tokens_estimated is true when a broken stream's tokens were counted from its text.
ALTER TABLE usage_log
    ADD COLUMN cache_write_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN params_dropped text,
    ADD COLUMN params_changed text,
    ADD COLUMN tokens_estimated boolean;
