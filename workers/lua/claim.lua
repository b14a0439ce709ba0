-- Claim a job before any provider call, or learn why not, in one round trip.
--
-- KEYS[1]  the job's claim (hash: fp, owner, lease, attempt, lost)
-- KEYS[2]  the job's stored outcome: its request fingerprint (64 hex) then the outcome JSON
--          (a value starting with "{" is an outcome stored without a fingerprint)
-- KEYS[3]  the memory epoch: when Redis may have started forgetting outcomes (ms, 0 = never)
-- KEYS[4]  the replication id of the Redis the outcomes were stored in
-- KEYS[5]  the job's failures: deliveries that died in a provider call, or that a worker
--          returned to the queue on a failure (Claims.returned)
-- ARGV[1]  owner (worker name and a token of this delivery)
-- ARGV[2]  lease, ms
-- ARGV[3]  the request's fingerprint
-- ARGV[4]  ttl of the claim, seconds (as long as a stored outcome lives)
-- ARGV[5]  the delivery limit: failures a job may have before it is dead-lettered
-- ARGV[6]  (optional) an outcome as stored that this delivery replaces: an earlier
--          delivery's, refused uncalled past its deadline, this one due later (the job
--          published again). Replaced only while it is the one stored, as bind.lua does.
--
-- Returns one of:
--   {'conflict', outcome}               the id is used by a different request; outcome: as
--                                       stored, when that request was answered, else absent
--   {'stored', outcome}                 the job was answered: outcome as stored
--   {'busy', owner, ms}                 another delivery holds it for ms more
--   {'claimed', lost, epoch, over}      held now; lost: calls a lapsed owner had in flight
--                                       (one JSON object a line), epoch: KEYS[3] or '', over:
--                                       1 when taken over from another owner (whose budget
--                                       reservation of the job may be in its ledger), else 0
--   {'poison', failures, lost}          more failures than the limit: the worker dead-letters
--                                       the job, and its count starts again (for a replay);
--                                       lost: '', or the calls its dead owners made, and the
--                                       claim is held now to bill them

-- Only failures count, never a return of a job that merely waited in a worker (its prefetch)
-- when that worker died: the broker counts those too, so its own limit is a far safety net.
local function poisoned()
  local failures = tonumber(redis.call('GET', KEYS[5]) or '0')
  if failures > tonumber(ARGV[5]) then
    redis.call('DEL', KEYS[5])
    return failures
  end
  return nil
end

-- A replica promoted to primary (a Sentinel failover), or a primary restarted, has a new
-- replication id, and may lack the writes its predecessor had not replicated yet (Redis
-- replicates asynchronously): outcomes among them. The memory epoch goes, as when Redis
-- loses its data, so jobs are looked up in PostgreSQL until their outcomes could have lapsed.
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local known = redis.call('GET', KEYS[4])
if known ~= replid then
  if known then
    redis.call('DEL', KEYS[3])
  end
  redis.call('SET', KEYS[4], replid)
end

local stored = redis.call('GET', KEYS[2])
if stored then
  if string.sub(stored, 1, 1) ~= '{' and string.sub(stored, 1, 64) ~= ARGV[3] then
    return {'conflict', stored}
  end
  if stored ~= ARGV[6] then
    local failures = poisoned()
    if failures then
      return {'poison', failures, ''}
    end
    return {'stored', stored}
  end
  redis.call('DEL', KEYS[2])
end

local claim = redis.call('HMGET', KEYS[1], 'fp', 'owner', 'lease', 'attempt', 'lost')
local fp, owner, lease, attempt, lost = claim[1], claim[2], claim[3], claim[4], claim[5]
if fp and fp ~= ARGV[3] then
  return {'conflict'}
end
-- The round trip's TIME when this runs with other calls (workers/admission/lua/batch.lua).
local time = ... or redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if owner == ARGV[1] then
  -- This very delivery's claim, sent again (the Redis client re-sends a command whose
  -- connection broke, though the script may have run): still its own, not busy.
  redis.call('HSET', KEYS[1], 'lease', string.format('%d', now + tonumber(ARGV[2])))
  return {'claimed', lost or '', redis.call('GET', KEYS[3]) or '', 0}
end
if owner and tonumber(lease) > now then
  return {'busy', owner, tonumber(lease) - now}
end

-- Free, or its owner's lease lapsed (the owner died): take it over, keeping the call the
-- owner had in flight, which the provider may bill though no outcome records it.
-- An owner that died with a call recorded died in (or right after) that call: a failure.
lost = lost or ''
if attempt then
  lost = lost .. attempt .. '\n'
  redis.call('HDEL', KEYS[1], 'attempt')
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[4])
end
local failures = poisoned()
if failures then
  if lost == '' then
    redis.call('HDEL', KEYS[1], 'owner', 'lease')
    redis.call('HSET', KEYS[1], 'fp', ARGV[3])
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return {'poison', failures, ''}
  end
  -- Held, to bill the lost calls before the job is dead-lettered: the delivery stores an
  -- outcome carrying them (finish.lua), which answers any later delivery (a replay).
  redis.call('HSET', KEYS[1], 'fp', ARGV[3], 'owner', ARGV[1], 'lease',
    string.format('%d', now + tonumber(ARGV[2])), 'lost', lost)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'poison', failures, lost}
end
redis.call('HSET', KEYS[1], 'fp', ARGV[3], 'owner', ARGV[1], 'lease',
  string.format('%d', now + tonumber(ARGV[2])),
  'lost', lost)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'claimed', lost, redis.call('GET', KEYS[3]) or '', owner and 1 or 0}
