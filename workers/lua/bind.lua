-- Bind a job id to one request before it is published (the HTTP front door's
-- Idempotency-Key), in the claim the workers take (claim.lua): a different request under
-- the id is refused before anything is published, and workers refuse it too.
--
-- KEYS[1]  the job's claim (hash; see claim.lua)
-- KEYS[2]  the job's stored outcome: its request fingerprint (64 hex) then the outcome JSON
-- ARGV[1]  the request's fingerprint
-- ARGV[2]  ttl of the binding, seconds (as long as a stored outcome lives)
-- ARGV[3]  (optional) an outcome as stored that this request replaces: its job's, ended
--          uncalled past its deadline, which this request publishes again. Replaced only
--          while it is the one stored, so of retries racing to, one replaces it; the others
--          find the id bound (or the new outcome, once stored).
--
-- Returns one of:
--   {'conflict'}          the id is bound to, or answered, a different request
--   {'stored', outcome}   this request was answered: outcome as stored
--   {'bound', new}        the id is this request's; new 1 when bound by this call, 0 when
--                         an earlier call (or a delivery) had bound it

local stored = redis.call('GET', KEYS[2])
if stored then
  if string.sub(stored, 1, 1) ~= '{' and string.sub(stored, 1, 64) ~= ARGV[1] then
    return {'conflict'}
  end
  if stored ~= ARGV[3] then
    return {'stored', stored}
  end
  redis.call('DEL', KEYS[2])
end

local fp = redis.call('HGET', KEYS[1], 'fp')
if fp then
  if fp ~= ARGV[1] then
    return {'conflict'}
  end
  return {'bound', 0}
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return {'bound', 1}
