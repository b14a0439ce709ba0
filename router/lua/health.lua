-- The health of one deployment, shared by every worker: its circuit breaker and its 429 pause.
-- Atomic, on Redis's own clock, so workers with skewed clocks agree.
--
-- KEYS[1]  breaker hash: state (closed | open | half_open), until (ms), start, calls, failures
-- KEYS[2]  pause key: present while the deployment is paused; its TTL is what is left
-- ARGV     op, window_ms, failures, ratio, cooldown_ms, probe_ms, pause_ms, successes
--
-- op = allow       may a call start?  {"closed"|"probe", 0} yes; {"paused"|"open"|"half_open",
--                                     ms left} no.  After the cooldown exactly one caller gets
--                                     "probe" and the circuit is half open until it reports
--                                     (or probe_ms pass without a report: a crashed prober).
-- op = success     a probe answered: the circuit closes.
-- op = failure     a call failed; counted in the window, may open the circuit.
-- op = rate_limit  a 429: pause for pause_ms (never shortened); not a failure, and a probe
--                  that got it is inconclusive, so the next allowed caller probes again.
-- op = release     a probe that said nothing of the provider (its job's deadline cut it): the
--                  next allowed caller probes at once, not after probe_ms.
-- successes       other calls that answered since this worker last ran the script for the
--                  deployment: they only count in the window, so they ride on its next op
--                  (allow, success or failure) instead of a round trip each.
-- Every op returns {state, ms}.

local breaker, paused = KEYS[1], KEYS[2]
local op = ARGV[1]
local window = tonumber(ARGV[2])
local max_failures = tonumber(ARGV[3])
local ratio = tonumber(ARGV[4])
local cooldown = tonumber(ARGV[5])
local probe = tonumber(ARGV[6])
local pause = tonumber(ARGV[7])
local successes = tonumber(ARGV[8])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HGET', breaker, 'state') or 'closed'
local keep = window + cooldown + probe

local function open()
  redis.call('HSET', breaker, 'state', 'open', 'until', now + cooldown)
  redis.call('HDEL', breaker, 'start', 'calls', 'failures')
  redis.call('PEXPIRE', breaker, keep)
  return {'open', cooldown}
end

-- Calls and failures in the closed circuit's window; enough failures that are also enough of
-- the calls open it (a count alone would open a busy deployment at any error rate).
local function count(calls_added, failures_added)
  local held = redis.call('HMGET', breaker, 'start', 'calls', 'failures')
  local start = tonumber(held[1] or '0')
  local calls, failures = 0, 0
  if now - start < window then
    calls = tonumber(held[2] or '0')
    failures = tonumber(held[3] or '0')
  else
    start = now
  end
  calls = calls + calls_added
  failures = failures + failures_added
  if failures_added > 0 and failures >= max_failures and failures / calls >= ratio then
    return open()
  end
  redis.call('HSET', breaker, 'state', 'closed', 'start', start, 'calls', calls,
    'failures', failures)
  redis.call('PEXPIRE', breaker, keep)
  return {'closed', 0}
end

if op == 'allow' then
  if state == 'closed' and successes > 0 then
    count(successes, 0)
  end
  local left = redis.call('PTTL', paused)
  if left > 0 then
    return {'paused', left}
  end
  if state == 'closed' then
    return {'closed', 0}
  end
  local until_ms = tonumber(redis.call('HGET', breaker, 'until') or '0')
  if now < until_ms then
    return {state, until_ms - now}
  end
  redis.call('HSET', breaker, 'state', 'half_open', 'until', now + probe)
  redis.call('PEXPIRE', breaker, keep)
  return {'probe', 0}
end

if op == 'rate_limit' then
  if redis.call('PTTL', paused) < pause then
    redis.call('SET', paused, '1', 'PX', pause)
  end
  if state == 'half_open' then
    redis.call('HSET', breaker, 'until', now)
  end
  return {state, pause}
end

if op == 'release' then
  if state == 'half_open' then
    redis.call('HSET', breaker, 'until', now)
  end
  return {state, 0}
end

if state == 'half_open' then
  if op == 'success' then
    redis.call('DEL', breaker)
    return {'closed', 0}
  end
  return open()
end
if state == 'open' then
  -- A call that started before the circuit opened: it changes nothing.
  return {'open', 0}
end

if op == 'failure' then
  return count(1 + successes, 1)
end
return count(1 + successes, 0)
