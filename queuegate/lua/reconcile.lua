-- Set a spend ledger's base to what usage_log holds, drop the entries of the jobs it holds (with
-- their reservations and excesses: a job whose settle was lost), and put back the entries a worker
-- settled that it does not hold yet (workers/admission/lua/spend.lua describes the ledger).
--
-- KEYS[1]   the ledger          KEYS[2]   its expiry set
-- KEYS[3]   the reconciler's lock: the call is refused unless it still holds ARGV[1]
-- ARGV[1]   the reconciler's token
-- ARGV[2]   the new base, nano-USD: usage_log's sum, read in the same snapshot as the rest,
--           less the rows of the jobs whose entries a later call of the same reconciliation
--           drops (their entries count them until then)
-- ARGV[3]   ttl of the ledger, seconds
-- ARGV[4]   the generation to give the ledger if it has none (Redis lost it, or it is new)
-- ARGV[5]   milliseconds a ledger it makes (had none) is restoring: its reserves wait that
--           long for the other workers to put back their jobs (spend.lua); 0 = not
-- ARGV[6]   n, the number of entries to put back
-- ARGV[7 .. 6+3n]  each: job id, nano-USD, milliseconds until it lapses; jobs the snapshot
--           does not hold, put back only where the ledger has no entry for them
-- ARGV[7+3n ..]    job ids whose usage rows that snapshot holds
--
-- Returns {-1} when the lock is no longer ours (another accountant reconciles: its snapshot
-- may be newer), else {found, before, after, generation}: found 0 when the ledger was
-- missing (Redis lost it), and the ledger's spent before and after (base + open).

local ABOUT = 'a month of spend in nano-USD: base (usage_log) + open (j: entries), '
  .. 'reserved (r: marks), excess (x: marks)'

if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return {-1}
end
local state = redis.call('HMGET', KEYS[1], 'base', 'open', 'gen', 'reserved', 'excess')
local base = tonumber(state[1]) or 0
local open = tonumber(state[2]) or 0
local gen = state[3] or ARGV[4]
local reserved = tonumber(state[4]) or 0
local excess = tonumber(state[5]) or 0
local before = base + open
local n = tonumber(ARGV[6])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 7, 6 + 3 * n, 3 do
  local f = 'j:' .. ARGV[i]
  if redis.call('HSETNX', KEYS[1], f, ARGV[i + 1]) == 1 then
    open = open + tonumber(ARGV[i + 1])
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[i + 2]), ARGV[i])
  end
end
local first = 7 + 3 * n
local gone = 0
for i = first, #ARGV do
  local f, r, x = 'j:' .. ARGV[i], 'r:' .. ARGV[i], 'x:' .. ARGV[i]
  local entry = redis.call('HMGET', KEYS[1], f, r, x)
  gone = gone + (tonumber(entry[1]) or 0)
  reserved = reserved - (tonumber(entry[2]) or 0)
  excess = excess - (tonumber(entry[3]) or 0)
  redis.call('HDEL', KEYS[1], f, r, x)
end
if #ARGV >= first then
  redis.call('ZREM', KEYS[2], unpack(ARGV, first))
end
base = tonumber(ARGV[2])
-- `about`, longer than Redis keeps in a small hash's compact encoding (hash-max-listpack-value,
-- 64 bytes), makes the ledger a hash table for good: kept compact, its every job's field
-- would be found by a scan of all of them, eight a job (reserve and settle) over up to 512
-- fields (hash-max-listpack-entries) between two reconciliations.
redis.call('HSET', KEYS[1], 'base', base, 'open', open - gone, 'gen', gen, 'reserved', reserved,
  'excess', excess, 'about', ABOUT)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
if n > 0 then
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
local restoring = tonumber(ARGV[5])
if not state[1] and restoring > 0 then
  redis.call('HSET', KEYS[1], 'restoring', string.format('%d', now + restoring))
end
return {state[1] and 1 or 0, before, base + open - gone, gen}
