-- End the open reservations of jobs whose owners seem dead, keeping each as spend at the
-- job's worst (spend.lua describes the ledger).
--
-- A reservation lives as long as its job's claim (workers/lua/claim.lua): a worker killed mid-job
-- leaves both behind, and its job's next delivery, which would take the claim over and end the
-- reservation, may sit in a queue behind the very jobs that reservation holds. So once a claim's
-- owner's lease has lapsed, its job's reservation stops being one here: no job waits for it any
-- more (its `r:` and `x:` fields go, with their sums). Only a claim with a lapsed owner: a live
-- owner renews its lease, and a job with no claim at all is one that missed it (served under the
-- Redis outage policy, taking it up later) or ended without its settle (a Redis error;
-- reconciliation mends it): those lapse as before.
--
-- Its entry stays, as spend at the job's room (its reservation and excess), and lapses as it
-- would have. A dead owner's call is billed (lost, at its estimate) by the delivery that takes
-- the job over, which reserves afresh and replaces the entry; an owner that only stalled goes
-- on when it resumes, its call billed, and its settle replaces the entry with what the job
-- cost. Until then the jobs admitted beside it count it: dropped, it counted nothing, and jobs
-- were admitted one after another beside a stalled owner (twice a small budget spent), or
-- beside a dead owner's calls billed later. A job that does not fit beside it is refused, not
-- held, so it leaves its worker for the queued deliveries behind it.
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
local unreserved, unexcess, fields, worst, ended = 0, 0, {}, {}, {}
for i, id in ipairs(ARGV) do
  local f, r, x = 'j:' .. id, 'r:' .. id, 'x:' .. id
  local entry = redis.call('HMGET', KEYS[1], f, r, x)
  if entry[2] then
    local claim = redis.call('HMGET', KEYS[2 + i], 'owner', 'lease')
    if claim[1] and tonumber(claim[2]) <= now then
      local over = tonumber(entry[3]) or 0
      unreserved = unreserved + tonumber(entry[2])
      unexcess = unexcess + over
      fields[#fields + 1], fields[#fields + 2] = r, x
      worst[#worst + 1] = f
      worst[#worst + 1] = string.format('%d', (tonumber(entry[1]) or 0) + over)
      ended[#ended + 1] = id
    end
  end
end
if #ended > 0 then
  redis.call('HDEL', KEYS[1], unpack(fields))
  redis.call('HSET', KEYS[1], unpack(worst))
  -- Each entry grows by its excess, spend now: the excesses' sum moves into `open`.
  redis.call('HINCRBY', KEYS[1], 'open', string.format('%d', unexcess))
  redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -unreserved))
  if unexcess > 0 then
    redis.call('HINCRBY', KEYS[1], 'excess', string.format('%d', -unexcess))
  end
end
return ended
