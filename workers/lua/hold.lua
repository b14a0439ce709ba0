-- Extend a claim's lease, record the call about to leave, or let the claim go: only while
-- ARGV[1] still owns it.
--
-- KEYS[1]  the job's claim (hash; see claim.lua)
-- KEYS[2]  the namespace's lapsing claims (sorted set: claim key by when its job's deadline
--          and a lease have passed; see sweep.lua); only read with ARGV[4]
-- KEYS[3]  with a call, the job's stored outcome (see claim.lua), or absent
-- ARGV[1]  owner
-- ARGV[2]  lease from now, ms (0: let it go now, so the next delivery takes over at once)
-- ARGV[3]  the call about to leave (JSON), or '' to leave the recorded one as it is
-- ARGV[4]  with a call, for a job with a deadline: when a sweep may bill the call should the
--          job expire in its queue (ms since the epoch), or '' (no deadline: its delivery
--          always comes back)
-- ARGV[5]  with ARGV[4]: the model the job asked for (its budget's scope, its usage row's)
-- ARGV[6]  with ARGV[4]: the job's reply queue, where a sweep answers it, or '' (nowhere)
--
-- Returns 1 while ARGV[1] owns the claim, 0 once another delivery took it over or (the
-- claim ended) stored the job's outcome, nil when the claim is gone with no outcome (Redis
-- lost them).

local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[1] then
  if owner or (KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1) then
    return 0
  end
  return false
end
-- The round trip's TIME when this runs with other calls (workers/admission/lua/batch.lua).
local time = ... or redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = string.format('%d', now + tonumber(ARGV[2]))
-- One HSET with every field the call changes, not one per field.
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'lease', lease)
elseif ARGV[4] and ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'lease', lease, 'attempt', ARGV[3], 'model', ARGV[5],
    'reply', ARGV[6] or '')
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), KEYS[1])
else
  redis.call('HSET', KEYS[1], 'lease', lease, 'attempt', ARGV[3])
end
return 1
