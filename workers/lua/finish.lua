-- Store a job's outcome and end its claim; the first outcome stored is the job's.
--
-- KEYS[1]  the job's claim (hash; see claim.lua)
-- KEYS[2]  the job's stored outcome
-- KEYS[3]  the namespace's lapsing claims (see hold.lua): the claim leaves them
-- ARGV[1]  fingerprint then outcome JSON
-- ARGV[2]  ttl, seconds
--
-- Returns false when ARGV[1] is stored, or the outcome already stored (a delivery that took
-- over a lapsed claim finished first): the job is announced with that one. Finding ARGV[1]
-- itself is this call sent again by the Redis client (its connection broke after Redis ran
-- it): stored by this call, so false again.

local stored = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], KEYS[1])
if stored == ARGV[1] then
  return false
end
if stored then
  return stored
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[2]))
return false
