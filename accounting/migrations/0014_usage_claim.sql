-- The owner of the job's claim whose delivery made the calls a row bills. A job's usage event
-- under another claim than its row's bills calls made again (after Redis lost the first
-- claim's outcome), kept on a row of its own, '<job id>/again/<claim>'; one under the row's
-- own claim is that row sent again. NULL for a job served unclaimed (Redis unreachable) and
-- for rows from before claims were recorded: an event against such a row is dropped.
ALTER TABLE usage_log ADD COLUMN claim text;
