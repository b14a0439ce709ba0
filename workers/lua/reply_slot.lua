-- Admit a reply or results queue to its team's count in one step (workers/control.py): two
-- workers, or two requests on one, that each read the count and then added would both fit
-- under the limit and overshoot it.
--
-- KEYS[1]  the team's reply queues (sorted set: name -> when it may have expired)
-- KEYS[2]  the team's queues being declared (sorted set: name -> when that is given up on)
-- ARGV[1]  the queue's name
-- ARGV[2]  now (epoch seconds): members scored before it may have expired, and leave
-- ARGV[3]  when the queue may expire if opened now (epoch seconds)
-- ARGV[4]  the team's limit (reply_queues_per_team)
-- ARGV[5]  ttl of the whole set, seconds (past the longest expiry)
-- ARGV[6]  when the declare that follows is given up on (epoch seconds)
--
-- Returns {status, count}: status 1 when the queue took a new slot, 0 when it was counted
-- already (its expiry refreshed), -1 when refused (the team has count, its limit or more).
-- An admitted queue is marked being declared, so lua/reply_reclaim.lua, which gives back
-- the slots of queues the broker no longer has, leaves it be until the worker has declared it.

local key = KEYS[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
local known = redis.call('ZSCORE', key, ARGV[1])
local count = redis.call('ZCARD', key)
if not known and count >= tonumber(ARGV[4]) then
  return {-1, count}
end
redis.call('ZADD', key, ARGV[3], ARGV[1])
redis.call('EXPIRE', key, tonumber(ARGV[5]))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
if known then
  return {0, count}
end
return {1, count + 1}
