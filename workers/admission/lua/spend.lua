-- Monthly spend counters in nano-USD: reserve a job's estimated cost, or settle it.
--
-- KEYS[1]        the team's alert marker for the month (set once the alert is emitted)
-- KEYS[2]        the alerts stream
-- KEYS[3..]      spend counters: the team's, then optionally the model's
-- ARGV[1]        "reserve" (all counters or none, refused past a limit) or "settle" (add)
-- ARGV[2]        amount in nano-USD (settle: may be negative, a refund)
-- ARGV[3]        ttl of counters and marker, seconds (past the month's end)
-- ARGV[4]        alert threshold in nano-USD on the team counter; 0 = none
-- ARGV[5..6]     team and month, written into the alert
-- ARGV[6+i]      limit of KEYS[2+i] in nano-USD
--
-- Returns {0, spent} when done, {-1, i, spent} when KEYS[2+i] cannot take the amount, and
-- {-2, i} when KEYS[2+i] is missing (Redis lost it): the caller rebuilds it and calls again.

local mode = ARGV[1]
local amount = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local threshold = tonumber(ARGV[4])

local spent = {}
for i = 3, #KEYS do
  local value = redis.call('GET', KEYS[i])
  if not value then
    if mode == 'reserve' then
      return {-2, i - 2}
    end
  else
    spent[i] = tonumber(value)
    if mode == 'reserve' and spent[i] + amount > tonumber(ARGV[4 + i]) then
      return {-1, i - 2, spent[i]}
    end
  end
end

local team_spent = spent[3]
for i = 3, #KEYS do
  if spent[i] then
    local now = redis.call('INCRBY', KEYS[i], amount)
    if i == 3 then
      team_spent = now
    end
  end
end

if team_spent and threshold > 0 and team_spent >= threshold then
  if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*',
      'team', ARGV[5], 'month', ARGV[6], 'spent_nano_usd', team_spent,
      'budget_nano_usd', ARGV[7])
    return {0, team_spent, 1}
  end
end
return {0, team_spent or 0, 0}
