-- What spend ledgers count as spent and reserved now, as the next reserve sees them: base
-- plus open, less the entries that have lapsed (a reserve reaps them before it compares;
-- workers/admission/lua/spend.lua describes the ledger). Read only.
--
-- KEYS[2i-1]  scope i's ledger      KEYS[2i]  its expiry set
--
-- Returns, per scope, its spent and reserved in nano-USD, or -1 when the ledger is missing.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local out = {}
for i = 1, #KEYS / 2 do
  local ledger, expiry = KEYS[2 * i - 1], KEYS[2 * i]
  local state = redis.call('HMGET', ledger, 'base', 'open')
  if not state[1] then
    out[i] = -1
  else
    local spent = tonumber(state[1]) + (tonumber(state[2]) or 0)
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do
      spent = spent - (tonumber(redis.call('HGET', ledger, 'j:' .. id)) or 0)
    end
    out[i] = spent
  end
end
return out
