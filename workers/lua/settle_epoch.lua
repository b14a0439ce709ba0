-- Settle a provisional memory epoch (see workers/claims.py): set it only while it holds the
-- value that was read, for Redis may have lost its data again, or another worker settled it.
--
-- KEYS[1]  the memory epoch
-- ARGV[1]  the provisional value read
-- ARGV[2]  the settled value
--
-- Returns 1 when it was set, 0 when the epoch had changed.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
