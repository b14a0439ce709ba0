-- End the open reservations of jobs whose owners seem dead, keeping each as spend at the
-- job's estimate and its excess as what it may cost past it (spend.lua describes the ledger).
--
-- A reservation lives as long as its job's claim (workers/lua/claim.lua): a worker killed mid-job
-- leaves both behind, and its job's next delivery, which would take the claim over and end the
-- reservation, may sit in a queue behind the very jobs that reservation holds. So once a claim's
-- owner's lease has lapsed, its job's reservation stops being one here: no job waits for it any
-- more (its `r:` field goes, with its sum). Only a claim with a lapsed owner: a live owner renews
-- its lease, and a job with no claim at all is one that missed it (served under the Redis outage
-- policy, taking it up later) or ended without its settle (a Redis error; reconciliation mends
-- it): those lapse as before.
--
-- Its entry stays, as spend at the job's estimate, and lapses as it would have: a dead owner's
-- call is billed (lost, at its estimate) by the delivery that takes the job over, which reserves
-- afresh and replaces the entry; an owner that only stalled goes on when it resumes, its call
-- billed, and its settle replaces the entry with what the job cost. So a job that the spend with
-- it cannot take is refused at once, not held, leaving its worker for the queued deliveries
-- behind it. A job without an output limit keeps its excess (`x:`, in `excess`) until then: the
-- jobs beside it wait for it near the edge as beside an open one (spend.lua), as a stalled owner
-- may yet bill its worst; counted as spent, it refused jobs at once while the delivery taking it
-- over was moments away (its lost call billed at the estimate); dropped, jobs were admitted one
-- after another beside a stalled owner (twice a small budget spent).
--
-- The claims come in KEYS, as every script's keys do, from the ids of the reservations the
-- caller found open: a reservation made after that look is not looked at.
--
-- KEYS[1]      the ledger           KEYS[2]  its expiry set
-- KEYS[2+i]    the claim of job i (queuegate.keys.Keys.claim)
-- ARGV[i]      job i's id, one whose reservation was seen open
--
-- Returns the ids of the jobs whose reservations were ended.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local unreserved, fields, ended = 0, {}, {}
for i, id in ipairs(ARGV) do
  local r = 'r:' .. id
  local reservation = redis.call('HGET', KEYS[1], r)
  if reservation then
    local claim = redis.call('HMGET', KEYS[2 + i], 'owner', 'lease')
    if claim[1] and tonumber(claim[2]) <= now then
      unreserved = unreserved + tonumber(reservation)
      fields[#fields + 1] = r
      ended[#ended + 1] = id
    end
  end
end
if #ended > 0 then
  redis.call('HDEL', KEYS[1], unpack(fields))
  redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -unreserved))
end
return ended
