-- Add a batch run's (custom_id, line number) pairs to its index in one step
-- (workers/batch_state.py). An HSETNX a pair in a pipeline took the worker 8-10 ms of CPU
-- for a step of 1,000 pairs, and an HSETNX a pair here 4 ms of Redis's time, every other
-- client waiting; one HMGET and one HSET a call of 250 pairs take the worker 1.3 ms for the
-- step and Redis under 1 ms a call.
--
-- KEYS[1]  the run's index (hash: custom_id -> the line that holds it first)
-- ARGV[1]  seconds the index lives
-- ARGV[2], ARGV[3], ...  custom_id, line number, for each pair (250 pairs at most)
--
-- Returns, for each pair, the line that holds its custom_id first: its own when new.

local ids = {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
end
local known = redis.call('HMGET', KEYS[1], unpack(ids))
local firsts, taken, added = {}, {}, {}
for n, id in ipairs(ids) do
  local first = known[n] or taken[id]
  if not first then
    first = ARGV[2 * n + 1]
    taken[id] = first
    added[#added + 1] = id
    added[#added + 1] = first
  end
  firsts[n] = tonumber(first)
end
if #added > 0 then
  redis.call('HSET', KEYS[1], unpack(added))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return firsts
