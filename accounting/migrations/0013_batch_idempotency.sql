-- A batch created under an Idempotency-Key (either batch API): the key, and the fingerprint
-- of the request it was created by. A retry of that request (an SDK retries a create whose
-- answer it lost) is answered this batch again; a different request under the key is
-- refused. One batch per key and team: the index is what two creates racing under one key
-- meet, whichever front-door process each reaches. NULL for a batch created without a key.
ALTER TABLE api_batches ADD COLUMN idempotency_key text, ADD COLUMN request_digest text;
CREATE UNIQUE INDEX api_batches_idempotency_key ON api_batches (team, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
