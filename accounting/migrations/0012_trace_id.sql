-- The OpenTelemetry trace each job ran in (32 hex digits) and its job span there (16, when it
-- was recorded): a row of spend leads to its trace, and a trace to its rows. NULL for rows of
-- workers that do not trace; the index holds only the rows that have one, so inserts without
-- traces pay nothing for it.
ALTER TABLE usage_log ADD COLUMN trace_id text, ADD COLUMN span_id text;
CREATE INDEX usage_log_trace_id ON usage_log (trace_id) WHERE trace_id IS NOT NULL;
