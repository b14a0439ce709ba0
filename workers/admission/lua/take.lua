-- Token buckets in two dimensions (requests, tokens), taken for several scopes at once.
--
-- KEYS[i]   one bucket per scope: a hash {r = requests left, t = tokens left, ts = µs}
-- ARGV[1]   "take": take ARGV[2] requests and ARGV[3] tokens from every bucket, or nothing
--           "settle": give back ARGV[3] tokens (negative: take them, even into debt)
-- ARGV[2]   requests
-- ARGV[3]   tokens
-- ARGV[2+2i], ARGV[3+2i]   rpm and tpm of KEYS[i]; 0 = no limit in that dimension
--
-- A bucket holds one minute of its limit and refills continuously; Redis TIME is the clock,
-- so every worker sees the same one. Returns {0} when taken (or settled), {wait_ms} when the
-- emptiest bucket needs that long to refill, {-1, i} when the job can never fit KEYS[i].

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local need = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local fields = {'r', 't'}

local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local caps = {tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])}
  local state = redis.call('HMGET', key, 'r', 't', 'ts')
  local elapsed = now - (tonumber(state[3]) or now)
  local level = {}
  for d = 1, 2 do
    local cap = caps[d]
    if cap > 0 then
      local current = tonumber(state[d]) or cap
      level[d] = math.min(cap, current + elapsed * cap / 60000000)
      if mode == 'take' then
        if need[d] > cap then
          return {-1, i}
        end
        if level[d] < need[d] then
          wait = math.max(wait, math.ceil((need[d] - level[d]) * 60000 / cap))
        end
      end
    end
  end
  levels[i] = {caps, level}
end

if wait > 0 then
  return {wait}
end

for i, key in ipairs(KEYS) do
  local caps, level = levels[i][1], levels[i][2]
  local ttl = 1000
  for d = 1, 2 do
    local cap = caps[d]
    if cap > 0 then
      if mode == 'take' then
        level[d] = level[d] - need[d]
      elseif d == 2 then
        level[d] = math.min(cap, level[d] + need[d])
      end
      redis.call('HSET', key, fields[d], string.format('%.6f', level[d]))
      -- Kept until it would be full again: a missing bucket reads as full.
      ttl = math.max(ttl, math.ceil((cap - level[d]) * 60000 / cap) + 1000)
    end
  end
  if caps[1] > 0 or caps[2] > 0 then
    redis.call('HSET', key, 'ts', now)
    redis.call('PEXPIRE', key, ttl)
  end
end
return {0}
