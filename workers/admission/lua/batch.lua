-- Several calls of take.lua and spend.lua, and of the claim's claim.lua, hold.lua and
-- finish.lua (workers/lua), in one round trip, in order, where each would otherwise cost one:
-- a job's claim with its budget reservation and first take of the team's buckets, its first take of a
-- deployment's buckets with the record of the call about to leave (hold), its settles with
-- its outcome's store (finish). Each script's source is wrapped as a local function ahead of
-- this one (scripts.py), taking its KEYS and ARGV as it would on its own, and the round trip's
-- TIME (its `...`, empty when it runs on its own).
--
-- Run once per round trip: the Redis client sends a command again when its connection broke,
-- though Redis may have run it, and a take or a settle run twice would take twice or give
-- back twice. So the replies are kept under the round trip's own key for a while, and a call
-- that finds them returns them instead of running again.
--
-- KEYS[1]   the round trip's own key (one per round trip, chosen by the caller)
-- KEYS[2..] every call's keys, call after call
-- ARGV[1]   milliseconds the replies are kept under KEYS[1]; 0: not kept, for calls that
--           may run twice (a claim and the record of its call: each, run again by the same
--           delivery, finds it its own)
-- ARGV[2..] per call: its script's name ("take", "spend", "claim", "hold" or "finish"), its
--           number of keys, its number of arguments, then those arguments
--
-- Returns the replies of the calls run. It stops after a call that refuses (its reply starts
-- with a negative status), after a take that did not take (status 0) and after a claim that
-- this delivery did not win, so a later call can depend on an earlier one: a call is
-- recorded only once its take let it leave, and a job is reserved under its id in a budget
-- ledger only by the delivery holding it (a duplicate's reservation would replace the
-- owner's entry, and its undo delete it).

local keep = tonumber(ARGV[1])
if keep > 0 then
  local done = redis.call('GET', KEYS[1])
  if done then
    return cmsgpack.unpack(done)
  end
end

local scripts = {take = take, spend = spend, claim = claim, hold = hold, finish = finish}
local replies = {}
-- One TIME for the round trip, passed to every call, where each would read its own: the round
-- trip runs at once, and a governed job's three round trips read it eight times otherwise.
-- As numbers, which each call's tonumber passes through, where it would parse the strings.
local time = redis.call('TIME')
time = {tonumber(time[1]), tonumber(time[2])}
local k, a = 2, 2
while a <= #ARGV do
  local nkeys, nargs = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local reply = scripts[ARGV[a]]({unpack(KEYS, k, k + nkeys - 1)},
                                 {unpack(ARGV, a + 3, a + 2 + nargs)}, time)
  replies[#replies + 1] = reply
  if ARGV[a] == 'claim' then
    if reply[1] ~= 'claimed' then
      break
    end
  -- hold's reply is a number, finish's false or a string: only tables say refused.
  elseif type(reply) == 'table' and (reply[1] < 0 or (ARGV[a] == 'take' and reply[1] == 0)) then
    break
  end
  k, a = k + nkeys, a + 3 + nargs
end
if keep > 0 then
  -- ARGV[1] itself, not keep: Redis would format the number back into a string.
  redis.call('SET', KEYS[1], cmsgpack.pack(replies), 'PX', ARGV[1])
end
return replies
