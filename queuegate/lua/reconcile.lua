-- Set a spend ledger's base to what usage_log holds, and drop the entries of the jobs it
-- holds (workers/admission/lua/spend.lua describes the ledger).
--
-- KEYS[1]   the ledger          KEYS[2]   its expiry set
-- KEYS[3]   the reconciler's lock: the call is refused unless it still holds ARGV[1]
-- ARGV[1]   the reconciler's token
-- ARGV[2]   the new base, nano-USD: usage_log's sum, read in the same snapshot as ARGV[4..]
--           ("" to keep the base: a later part of the same reconciliation)
-- ARGV[3]   ttl of the ledger, seconds
-- ARGV[4..] job ids whose usage rows that snapshot holds
--
-- Returns {-1} when the lock is no longer ours (another accountant reconciles: its snapshot
-- may be newer), else {found, before, after}: found 0 when the ledger was missing (Redis lost
-- it), and the ledger's spent before and after (base + open).

if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return {-1}
end
local state = redis.call('HMGET', KEYS[1], 'base', 'open')
local base = tonumber(state[1]) or 0
local open = tonumber(state[2]) or 0
local before = base + open
local gone = 0
for i = 4, #ARGV do
  local f = 'j:' .. ARGV[i]
  gone = gone + (tonumber(redis.call('HGET', KEYS[1], f)) or 0)
  redis.call('HDEL', KEYS[1], f)
end
if #ARGV >= 4 then
  redis.call('ZREM', KEYS[2], unpack(ARGV, 4))
end
if ARGV[2] ~= '' then
  base = tonumber(ARGV[2])
end
redis.call('HSET', KEYS[1], 'base', base, 'open', open - gone)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {state[1] and 1 or 0, before, base + open - gone}
