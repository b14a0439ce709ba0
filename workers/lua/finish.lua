-- Store a job's outcome and end its claim; the first outcome stored is the job's.
--
-- KEYS[1]  the job's claim (hash; see claim.lua)
-- KEYS[2]  the job's stored outcome
-- KEYS[3]  the namespace's lapsing claims (see hold.lua)
-- KEYS[4]  the team's live spend of the outcome's month (nano-USD, what `queuegate status`
--          shows for a team without a budget)
-- ARGV[1]  fingerprint then outcome JSON (for a job with a deadline whose event is still to be
--          sent, with its reply queue: where a sweep answers it, its claim being gone)
-- ARGV[2]  ttl, seconds
-- ARGV[3]  '' (or absent): the job's usage event is confirmed already, and the claim leaves
--          the lapsing claims; else a lease, ms: its event is still to be sent, so a claim
--          on them (a job with a deadline, called) stays there, due no sooner than a lease
--          from now, until the worker removes it once the event's batch is confirmed
--          (Claims.accounted). Should that worker die first and the job expire in its
--          queue, a sweep sends the stored outcome's result and event again (sweep.lua).
-- ARGV[4]  the outcome's cost, nano-USD, added to KEYS[4] with the store: once a job, as
--          usage_log keeps one row a job, the calls lapsed owners made included, and not lost
--          with a worker killed before it wrote its live stats
-- ARGV[5]  KEYS[4]'s ttl, seconds
--
-- Returns false when ARGV[1] is stored, or the outcome already stored (a delivery that took
-- over a lapsed claim finished first): the job is announced with that one. Finding ARGV[1]
-- itself is this call sent again by the Redis client (its connection broke after Redis ran
-- it): stored by this call, so false again.

local stored = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1])
if ARGV[3] and ARGV[3] ~= '' then
  local due = redis.call('ZSCORE', KEYS[3], KEYS[1])
  if due then
    -- Past due already (a late delivery): a sweep would send the event while the
    -- delivery's own batch is on its way.
    -- The round trip's TIME when this runs with other calls (workers/admission/lua/batch.lua).
    local time = ... or redis.call('TIME')
    local soonest = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
      + tonumber(ARGV[3])
    if tonumber(due) < soonest then
      redis.call('ZADD', KEYS[3], soonest, KEYS[1])
    end
  end
else
  redis.call('ZREM', KEYS[3], KEYS[1])
end
if stored == ARGV[1] then
  return false
end
if stored then
  return stored
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
if tonumber(ARGV[4]) > 0 then
  redis.call('INCRBY', KEYS[4], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
return false
