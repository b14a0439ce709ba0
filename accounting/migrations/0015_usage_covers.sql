-- The claims whose calls a row bills as lost (their owners' leases lapsed, the job taken
-- over). An event of the job whose claims meet the row's (its own claim, or those it covers)
-- may bill the same call again: it is dropped, never kept on a row of its own. NULL when the
-- row bills no lost call.
ALTER TABLE usage_log ADD COLUMN covers text[];
