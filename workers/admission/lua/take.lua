-- Token buckets in two dimensions (requests, tokens), taken for several scopes at once.
--
-- KEYS[i]   one bucket per scope: a hash {r = requests left, t = tokens left, ts = µs,
--           x = ms until which its ttl keeps it, g = tokens settles gave back while it was
--           in debt, net of overuse: see "due"}
-- KEYS[#KEYS]  with a team in ARGV[5] (a take only): the line of the first bucket, below
-- ARGV[1]   "take": take ARGV[2] requests and ARGV[3] tokens from every bucket, or nothing
--           "settle": give back ARGV[2] requests (a reservation given up before its call)
--           and ARGV[3] tokens (negative: take them, even into debt)
--           "drain": empty the requests (the provider answered 429: it admits fewer)
--           "peek": change nothing; read the fill as of now, refilled since the last take
--           "due": change nothing; the milliseconds a reservation (a take into debt) has still
--           to wait now that settles may have given tokens back (its marks: ARGV after caps)
-- ARGV[2]   requests
-- ARGV[3]   tokens
-- ARGV[4]   take: milliseconds the caller will wait for the buckets. If they can admit the job
--           within that, it is taken now, into debt, and the caller goes once the wait is over
--           (a reservation); 0 = take only what is there now. Never into debt with a line.
-- ARGV[5]   take: the team taking, when the buckets are shared by teams (a deployment's) and
--           so taken in the teams' turns (the line); '' = no line
-- ARGV[6]   take with a line: milliseconds the caller will wait in it (ARGV[4] is 0)
-- ARGV[4+3i], ARGV[5+3i], ARGV[6+3i]   rpm, tpm and request capacity of KEYS[i]; 0 = no limit
--           in that dimension; capacity 0 = a minute of rpm
--
-- A bucket refills continuously at its per-minute rate, up to its capacity: a minute of the
-- rate, or fewer requests where a provider enforces its limit over shorter periods. Redis TIME
-- is the clock, so every worker sees the same one. Returns {1, wait_ms, fill} when taken (wait
-- 0 unless reserved), {0, wait_ms, fill} when not taken because the emptiest bucket
-- needs that long to refill, {-1, i} when the job can never fit KEYS[i]; fill is how full
-- KEYS[1] is after the call, in thousandths: its requests or its tokens, whichever is emptier
-- (0 in debt), for metrics; a take with a line returns {1, 0, fill, again}, again the
-- milliseconds until the buckets have as much again. Peek returns {1, 0, fill}; settle and
-- drain {1, 0}.
--
-- A reservation whose wait is for tokens (not only requests) returns {1, wait_ms, fill, 0,
-- now, requests_ms, mark_1 .. mark_n}: the round trip's TIME (µs), the wait its requests
-- alone need, and per bucket the sum g must reach for its tokens to be there with no refill
-- (in thousandths of a token, rounded up: Redis truncates a Lua number to an integer).
-- "due" takes these as ARGV[7+3n ..] and returns {1, due_ms}. Refunds (settles giving back
-- what a job did not use) pay a reservation's debt as the refill does, so a job goes once
-- both together have paid it, not only at the wait its take computed. g grows only while the
-- bucket is in debt: a reservation is outstanding only then (its take left the bucket below
-- zero, and each later take only lowers it), so a refund to a bucket out of debt writes
-- nothing more than before.

-- The round trip's TIME when this runs with other calls (batch.lua).
local t = ... or redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local need = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local within = tonumber(ARGV[4])
local fields = {'r', 't'}
local team = ARGV[5]
local buckets, line = #KEYS, nil
if mode == 'take' and team ~= '' then
  buckets, line = #KEYS - 1, KEYS[#KEYS]
end
-- Milliseconds a team waiting its turn while another team's turn has the buckets waits
-- before it asks again (that team's waiter takes at once, unless its process died); and how
-- long past the wait a line entry holds without its waiter asking again: a dead process's
-- team holds the buckets that long at most.
local POLL_MS, GRACE_MS = 50, 1000
-- Milliseconds a bucket is kept at least whenever its ttl is set: a bucket in use most of the
-- time needs a second or so (until full again), and renewing that on every take costs a
-- command a bucket; kept a minute, it is renewed once a minute.
local KEEP_MS = 60000

local levels = {}
local wait = 0
for i = 1, buckets do
  local key = KEYS[i]
  local rates = {tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i])}
  local burst = tonumber(ARGV[6 + 3 * i])
  local caps = {burst > 0 and burst or rates[1], rates[2]}
  local state = redis.call('HMGET', key, 'r', 't', 'ts', 'x', 'g')
  local elapsed = now - (tonumber(state[3]) or now)
  local level = {}
  for d = 1, 2 do
    local rate, cap = rates[d], caps[d]
    if rate > 0 then
      local current = tonumber(state[d]) or cap
      level[d] = math.min(cap, current + elapsed * rate / 60000000)
      if mode == 'take' then
        if need[d] > cap then
          return {-1, i}
        end
        if level[d] < need[d] then
          wait = math.max(wait, math.ceil((need[d] - level[d]) * 60000 / rate))
        end
      end
    end
  end
  levels[i] = {rates, caps, level, tonumber(state[4]), tonumber(state[5]) or 0}
end

local function fill()
  local rates, caps, level = levels[1][1], levels[1][2], levels[1][3]
  local least = 1000
  for d = 1, 2 do
    if rates[d] > 0 then
      least = math.min(least, math.max(0, math.floor(level[d] * 1000 / caps[d])))
    end
  end
  return least
end

if mode == 'peek' then
  return {1, 0, fill()}
end

if mode == 'due' then
  -- A missing bucket (expired: full again) reads g as 0, so a reservation's marks stay out of
  -- reach and it is told its wait as taken, never less.
  local base = 6 + 3 * buckets
  local from = tonumber(ARGV[base + 1])
  local due = tonumber(ARGV[base + 2]) - (now - from) / 1000
  for i = 1, buckets do
    local rate = levels[i][1][2]
    if rate > 0 then
      local mark = tonumber(ARGV[base + 2 + i]) / 1000
      local owed = mark - levels[i][5] - (now - from) * rate / 60000000
      due = math.max(due, owed * 60000 / rate)
    end
  end
  return {1, math.max(0, math.ceil(due))}
end

if line then
  -- The one more command a take with a line costs while no team waits: the line is empty.
  local entries = redis.call('HGETALL', line)
  local first, first_since, mine, last = nil, nil, nil, now
  local gone = {}
  for j = 1, #entries, 2 do
    local since, alive = string.match(entries[j + 1], '^(%d+) (%d+)$')
    since, alive = tonumber(since), tonumber(alive)
    if alive <= now then
      gone[#gone + 1] = entries[j]
    else
      if entries[j] == team then
        mine = since
      end
      if not first_since or since < first_since then
        first, first_since = entries[j], since
      end
      last = math.max(last, alive)
    end
  end
  if #gone > 0 then
    redis.call('HDEL', line, unpack(gone))
  end
  if wait > 0 or (first and first ~= team) then
    if wait == 0 then
      wait = POLL_MS
    end
    if wait <= tonumber(ARGV[6]) then
      local alive = now + (wait + GRACE_MS) * 1000
      redis.call('HSET', line, team, string.format('%d %d', mine or now, alive))
      if alive > last then
        redis.call('PEXPIRE', line, string.format('%d', wait + GRACE_MS))
      end
    end
    return {0, wait, fill()}
  end
  if mine then
    redis.call('HDEL', line, team)
  end
elseif wait > within then
  return {0, wait, fill()}
end

-- A reservation's marks (see "due"), unless its requests alone need all of its wait.
local marks = nil
if mode == 'take' and wait > 0 and not line then
  local requests = 0
  marks = {}
  for i = 1, buckets do
    local rates, level = levels[i][1], levels[i][3]
    if rates[1] > 0 and level[1] < need[1] then
      requests = math.max(requests, math.ceil((need[1] - level[1]) * 60000 / rates[1]))
    end
    marks[i] = rates[2] > 0 and math.ceil((levels[i][5] + need[2] - level[2]) * 1000) or 0
  end
  if requests >= wait then
    marks = nil
  else
    table.insert(marks, 1, requests)
    table.insert(marks, 1, now)
  end
end

-- Integers go to Redis formatted here ('%d'): Redis would format a number with '%.17g', which
-- costs several times as much.
local ts = string.format('%d', now)
for i = 1, buckets do
  local key = KEYS[i]
  local rates, caps, level = levels[i][1], levels[i][2], levels[i][3]
  local ttl = 1000
  -- One HSET per bucket with every field it changes, rather than one per field: a governed
  -- job takes and settles four buckets, each of them on every job.
  local changed = {}
  for d = 1, 2 do
    local rate, cap = rates[d], caps[d]
    if rate > 0 then
      if mode == 'take' then
        level[d] = level[d] - need[d]
      elseif mode == 'settle' then
        local was = level[d]
        level[d] = math.min(cap, level[d] + need[d])
        -- Net of what jobs used past their take, so a refund another job's overuse spent
        -- does not let a reservation go early. A give-back (a request back: a take undone,
        -- its call never made) is no refund: its take may have come after the reservation's,
        -- whose marks never counted it, so it would pay a debt the reservation does not owe.
        if d == 2 and was < 0 and level[d] ~= was and need[1] == 0 then
          changed[#changed + 1] = 'g'
          changed[#changed + 1] = string.format('%.6f', levels[i][5] + level[d] - was)
        end
      elseif mode == 'drain' and d == 1 then
        level[d] = math.min(level[d], 0)
      end
      changed[#changed + 1] = fields[d]
      changed[#changed + 1] = string.format('%.6f', level[d])
      -- Kept until it would be full again: a missing bucket reads as full.
      ttl = math.max(ttl, math.ceil((cap - level[d]) * 60000 / rate) + 1000)
    end
  end
  if #changed > 0 then
    -- Its ttl is set only when the one its last setting left (x) runs out before the bucket
    -- would be full again, or it has none (missing, made now): a settle that gives back only
    -- shortens what it needs, and so does the refill since. Set, it keeps the bucket at
    -- least KEEP_MS, so that a bucket in steady use is not renewed on every take.
    local kept, ms = levels[i][4], math.floor(now / 1000)
    if not kept or ms + ttl > kept then
      ttl = math.max(ttl, KEEP_MS)
      changed[#changed + 1] = 'x'
      -- In ms, not µs as ts: three digits fewer for every take's tonumber to read.
      changed[#changed + 1] = string.format('%d', ms + ttl)
      redis.call('HSET', key, 'ts', ts, unpack(changed))
      redis.call('PEXPIRE', key, string.format('%d', ttl))
    else
      redis.call('HSET', key, 'ts', ts, unpack(changed))
    end
  end
end
if mode == 'take' then
  if line then
    -- Milliseconds until the buckets have as much again: when the next job of the team
    -- waiting in the caller's worker asks (asking sooner, it would only be told to wait).
    local again = 0
    for i = 1, buckets do
      local rates, level = levels[i][1], levels[i][3]
      for d = 1, 2 do
        if rates[d] > 0 and level[d] < need[d] then
          again = math.max(again, math.ceil((need[d] - level[d]) * 60000 / rates[d]))
        end
      end
    end
    return {1, 0, fill(), again}
  end
  if marks then
    return {1, wait, fill(), 0, unpack(marks)}
  end
  return {1, wait, fill()}
end
return {1, wait}
