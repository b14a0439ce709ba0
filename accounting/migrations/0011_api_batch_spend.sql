-- What the lines a batch has collected cost, as the gateway counts it (nano-dollars summed
-- as each line is written), copied with the batch's other counts: the dashboard shows it.
ALTER TABLE api_batches ADD COLUMN spend_usd numeric(20, 10) NOT NULL DEFAULT 0;
