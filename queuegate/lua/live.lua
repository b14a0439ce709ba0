-- Everything `queuegate status` (and the dashboard's Live page) reads of the live stats of
-- every team and deployment, in one call (queuegate/status.py): as separate commands, a
-- hundred teams would cost about a thousand per read.
--
-- ARGV[1]  w, the rate windows per team or deployment (queuegate/livestats.py)
-- ARGV[2]  t, the teams
-- ARGV[3]  cut, the oldest window's first second still in the rates' span (0-9)
-- KEYS     per team: its oldest window's per-second hash (fields <name>:<second>), the
--          w - 1 later windows' hashes of totals, its waits list, its live spend (nano-USD);
--          then per deployment: the same w window hashes
--
-- Returns, per team, {counts, waits, live spend}, then per deployment its counts; counts
-- flat: name, sum over the windows, ... (A team's budget ledger is read as a reserve sees
-- it, its lapsed entries left out: queuegate/lua/spent.lua.)
-- (A deployment's breaker and pause are read as `queuegate deployments` reads them:
-- queuegate/deployment_health.py.)

local w, t, cut = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 0

local function next_key()
  i = i + 1
  return KEYS[i]
end

local function counts()
  local total, names = {}, {}
  local function add(name, n)
    if total[name] == nil then
      names[#names + 1] = name
      total[name] = 0
    end
    total[name] = total[name] + tonumber(n)
  end
  -- Of the oldest window, only the seconds from `cut` on are in the span.
  local seconds = redis.call('HGETALL', next_key())
  for j = 1, #seconds, 2 do
    local name, second = string.match(seconds[j], '^(.*):(%d+)$')
    if name ~= nil and tonumber(second) >= cut then
      add(name, seconds[j + 1])
    end
  end
  for _ = 2, w do
    local fields = redis.call('HGETALL', next_key())
    for j = 1, #fields, 2 do
      add(fields[j], fields[j + 1])
    end
  end
  local flat = {}
  for _, name in ipairs(names) do
    flat[#flat + 1] = name
    flat[#flat + 1] = total[name]
  end
  return flat
end

local out = {}
for _ = 1, t do
  local sums = counts()
  local waits = redis.call('LRANGE', next_key(), 0, -1)
  local seen = redis.call('GET', next_key())
  out[#out + 1] = {sums, waits, seen}
end
while i < #KEYS do
  out[#out + 1] = counts()
end
return out
