-- Drop the open reservations of jobs whose owners died (spend.lua describes the ledger).
--
-- A reservation lives as long as its job's claim (workers/lua/claim.lua): a worker killed mid-job
-- leaves both behind, and its job's next delivery, which would take the claim over and end the
-- reservation, may sit in a queue behind the very jobs that reservation holds. So once a claim's
-- owner's lease has lapsed, its job's reservation is dropped here, as a lapse drops it (its `j:`,
-- `r:` and `x:` fields, their sums). Only a claim with a lapsed owner: a live owner renews its
-- lease, and a job with no claim at all is one that missed it (served under the Redis outage
-- policy, taking it up later) or ended without its settle (a Redis error; reconciliation mends
-- it): those lapse as before. An owner whose lease lapsed may only have stalled, though, and
-- settle when it resumes, its call billed: so a dropped reservation leaves a `d:<job id>` field
-- (no sum counts it), and its job stays in the expiry set, the field lapsing with the entry it
-- replaces (reaped with it by spend.lua). The owner's settle then adds its cost as the job's
-- entry (spend.lua), counted at once rather than at the next reconciliation; the delivery that
-- takes the claim over later reserves afresh (its dead owner's calls with it) and clears the
-- field, as accounting does once the job's usage row is in base (queuegate/lua/reconcile.lua).
--
-- The claims come in KEYS, as every script's keys do, from the ids of the reservations the
-- caller found open: a reservation made after that look is not looked at.
--
-- KEYS[1]      the ledger           KEYS[2]  its expiry set
-- KEYS[2+i]    the claim of job i (queuegate.keys.Keys.claim)
-- ARGV[i]      job i's id, one whose reservation was seen open
--
-- Returns the ids of the jobs whose reservations were dropped.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local gone, unreserved, unexcess, fields, dropped = 0, 0, 0, {}, {}
for i, id in ipairs(ARGV) do
  local f, r, x = 'j:' .. id, 'r:' .. id, 'x:' .. id
  local entry = redis.call('HMGET', KEYS[1], f, r, x)
  if entry[2] then
    local claim = redis.call('HMGET', KEYS[2 + i], 'owner', 'lease')
    if claim[1] and tonumber(claim[2]) <= now then
      gone = gone + (tonumber(entry[1]) or 0)
      unreserved = unreserved + tonumber(entry[2])
      unexcess = unexcess + (tonumber(entry[3]) or 0)
      fields[#fields + 1], fields[#fields + 2], fields[#fields + 3] = f, r, x
      dropped[#dropped + 1] = id
    end
  end
end
if #dropped > 0 then
  redis.call('HDEL', KEYS[1], unpack(fields))
  local marks = {}
  for _, id in ipairs(dropped) do
    marks[#marks + 1], marks[#marks + 2] = 'd:' .. id, '1'
  end
  redis.call('HSET', KEYS[1], unpack(marks))
  redis.call('HINCRBY', KEYS[1], 'open', string.format('%d', -gone))
  redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -unreserved))
  if unexcess > 0 then
    redis.call('HINCRBY', KEYS[1], 'excess', string.format('%d', -unexcess))
  end
end
return dropped
