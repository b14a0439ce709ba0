-- Take a lapsing claim (hold.lua) to answer its job and bill the calls its dead owners made,
-- when that job expired in its queue and no delivery of it will come back. Decided on the
-- claim's own state, so a delivery that came back (claim.lua), or another sweep, and this one
-- never both take the calls: the taker stores the job's outcome (finish.lua), and the others
-- are answered from it.
--
-- A job answered stays on the lapsing claims until the usage batch carrying its event is
-- confirmed (finish.lua): one found due here with its outcome stored lost that batch (and
-- perhaps its result, unpublished) with its worker, and expired in its queue. Its stored
-- result (to the reply queue stored with it) and event are sent again by this sweep alone:
-- the entry is due again a lease from now (another sweep leaves it alone meanwhile), and
-- leaves once that event's batch is confirmed (Claims.accounted).
--
-- KEYS[1]  the job's claim (hash; see claim.lua)
-- KEYS[2]  the namespace's lapsing claims (sorted set; see hold.lua)
-- KEYS[3]  the job's stored outcome (see claim.lua)
-- ARGV[1]  owner (the sweeping worker and a token of this sweep)
-- ARGV[2]  lease, ms
--
-- Returns one of:
--   {'held'}                        a live delivery (or sweep) holds it, or sends its usage
--                                   event: looked at again once that lease lapses
--   {'none'}                        gone, or no call on record: left alone from now
--   {'claimed', lost, fp, model,    held now; lost: the calls (one JSON object a line), fp:
--    reply}                         the request's fingerprint, model: the one it asked for,
--                                   reply: its reply queue ('' if none)
--   {'stored', outcome}             answered: its result, to its reply queue, and its usage
--                                   event (in outcome, as stored) to be sent again by this
--                                   sweep

local due = redis.call('ZSCORE', KEYS[2], KEYS[1])
if not due then
  return {'none'}  -- another sweep, or a confirmed usage batch, took it off meanwhile
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local stored = redis.call('GET', KEYS[3])
if stored then
  if tonumber(due) > now then
    return {'held'}
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), KEYS[1])
  return {'stored', stored}
end
local claim = redis.call('HMGET', KEYS[1], 'fp', 'owner', 'lease', 'attempt', 'lost', 'model',
  'reply')
local fp, owner, lease, attempt, lost, model, reply = claim[1], claim[2], claim[3], claim[4],
  claim[5], claim[6], claim[7]
if owner and tonumber(lease) > now then
  redis.call('ZADD', KEYS[2], 'XX', tonumber(lease), KEYS[1])
  return {'held'}
end
lost = lost or ''
if attempt then
  lost = lost .. attempt .. '\n'
end
if not fp or lost == '' then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return {'none'}
end
redis.call('HDEL', KEYS[1], 'attempt')
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease',
  string.format('%d', now + tonumber(ARGV[2])), 'lost', lost)
return {'claimed', lost, fp, model or '', reply or ''}
