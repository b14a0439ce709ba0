-- What spend ledgers count as spent and reserved now, as the next reserve sees them: base
-- plus open, less the entries a reserve would reap before it compares (those lapsed, at most
-- REAP of them: workers/admission/lua/spend.lua describes the ledger). Read only.
--
-- KEYS[2i-1]  scope i's ledger      KEYS[2i]  its expiry set
-- ARGV[1]     "settled": leave the open reservations out too (what a reserve refuses on)
--
-- Returns, per scope, its spent and reserved (or settled) in nano-USD, or -1 when the ledger
-- is missing.

-- As spend.lua's: a reserve reaps no more than these, so a read leaves out no more, and
-- its work stays bounded however many entries lapsed unreaped (workers that died mid-job).
local REAP = 100

local settled = ARGV[1] == 'settled'
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local out = {}
for i = 1, #KEYS / 2 do
  local ledger, expiry = KEYS[2 * i - 1], KEYS[2 * i]
  local state = redis.call('HMGET', ledger, 'base', 'open', 'reserved')
  if not state[1] then
    out[i] = -1
  else
    local spent = tonumber(state[1]) + (tonumber(state[2]) or 0)
    if settled then
      spent = spent - (tonumber(state[3]) or 0)
    end
    local lapsed = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, REAP)
    if #lapsed > 0 then
      local fields = {}
      for k, id in ipairs(lapsed) do
        fields[k] = 'j:' .. id
      end
      for _, nano in ipairs(redis.call('HMGET', ledger, unpack(fields))) do
        spent = spent - (tonumber(nano) or 0)
      end
      if settled then
        -- A lapsed reservation was left out with the others already.
        for k, id in ipairs(lapsed) do
          fields[k] = 'r:' .. id
        end
        for _, nano in ipairs(redis.call('HMGET', ledger, unpack(fields))) do
          spent = spent + (tonumber(nano) or 0)
        end
      end
    end
    out[i] = spent
  end
end
return out
