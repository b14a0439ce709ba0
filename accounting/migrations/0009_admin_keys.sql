-- Keys for cross-team administration (the HTTP front door's admin API). Like api_keys, only
-- the SHA-256 of each key is kept (see 0003); the key is shown once when issued.
CREATE TABLE admin_keys (
    id         text PRIMARY KEY,
    key_hash   text NOT NULL UNIQUE,
    -- Who or what holds the key, so that list and revoke can tell keys apart.
    label      text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

