-- Monthly spend ledgers in nano-USD: reserve a job's estimated cost, or settle it.
--
-- A ledger (hash) per scope holds `base`, the scope's spend in usage_log when accounting last
-- reconciled it, and one `j:<job id>` field per job since (its reservation, then what it cost),
-- summed in `open`: spent and reserved = base + open. While a job's entry is still its reservation,
-- an `r:<job id>` field holds it too, summed in `reserved`: settled spend = base + open - reserved;
-- and, the reservation of a job that may cost more than it (below), an `x:<job id>` field holds how
-- much more, summed in `excess`. Beside it a sorted set holds when each entry lapses. A reserve
-- first reaps the lapsed ones, so a reservation whose worker died without settling it stops
-- counting (sooner once its job's claim lapsed and it holds a job back: unreserve.lua); accounting
-- removes a job's entry once its usage row is in base (queuegate/lua/reconcile.lua). One entry per
-- job id: a redelivered job's reservation replaces its earlier one instead of adding to it. A
-- ledger's `gen` names it: a new one when it is made again after Redis lost it
-- (queuegate/lua/reconcile.lua makes it), so a worker can tell the ledger it settled into is gone.
-- A ledger a worker made again after a loss holds `restoring` (ms since epoch) until the other
-- workers have put back the jobs they settled that accounting has not written
-- (workers/admission/budgets.py): a reserve until then waits (status -5), unless forced (a limit of
-- 2^62 or more: its job is in its call already).
--
-- A reserve is made only when spent and reserved, with it, stay within each limit: so
-- concurrent jobs cannot overshoot by more than their estimates' errors. One that the settled
-- spend would take but the other jobs' open reservations do not leave room for is not
-- refused: those mostly come back at their settles, so its job waits for them (status -4),
-- holding nothing. It is refused (-1) only when the settled spend cannot take it.
--
-- A job without an output limit (unbounded) may cost many times its estimate, which is only
-- its team's expected output: its room (ARGV[9]) is what it costs at the output it is assumed
-- able to reach, and its excess the room less the estimate (none for a bounded job: its room
-- is its amount). Any job also waits (-4) while another job's reservation is open in the
-- scope, or an ended one keeps its excess (unreserve.lua: its owner's claim lapsed, and it may
-- only have stalled), and spent and reserved, the others' excesses and its own room pass the
-- limit: so every job in flight beside others can reach its worst within the budget. Near the edge,
-- where that does not fit, an unbounded job is admitted only alone, and the jobs after it
-- wait for it: at most one job overshoots a ledger by its excess (a job past its assumed
-- output aside). Far from the edge nothing waits more; where no unbounded job is in flight,
-- a bounded job waits exactly as before (the excesses are none).
--
-- KEYS[1]        the team's alert marker for the month (set once the alert is emitted)
-- KEYS[2]        the alerts stream
-- KEYS[1+2i]     scope i's ledger: the team's, then optionally the model's
-- KEYS[2+2i]     scope i's expiry set
-- ARGV[1]        "reserve" (all scopes or none, refused past a limit), "settle", or "lost": a
--                settle of calls billed as lost at their estimates that may still be running (an
--                owner swept past its job's deadline may only have stalled), keeping the
--                entry's excess until its owner settles what they cost, or accounting
--                reconciles the job: dropped, jobs were admitted beside a stalled call without
--                room for its worst, and the provider served twice a small budget
-- ARGV[2]        amount in nano-USD: the estimate (reserve) or the real cost (settle)
-- ARGV[3]        ttl of ledgers and marker, seconds (past the month's end)
-- ARGV[4]        alert threshold in nano-USD on the team ledger's settled spend (reservations
--                left out: jobs reserving far more than they cost alerted a team that had
--                spent 0.02 % of its budget, and the month's one alert was gone); 0 = none
-- ARGV[5..6]     team and month, written into the alert
-- ARGV[7]        the job id
-- ARGV[8]        milliseconds until the job's entry lapses
-- ARGV[9]        the job's room in nano-USD (reserve): its cost at its worst output, more than
--                the amount for an unbounded job only (no more: ignored)
-- ARGV[9+i]      limit of scope i in nano-USD (reserve)
-- ARGV[9+n+i]    the generation of scope i the caller knows ("" = none yet), n scopes
--
-- Returns {0, spent, alerted, gen 1, .., gen n} when done (spent: the team's spent and reserved,
-- its settled spend when this call alerted), {-1, i, settled} when scope i's
-- settled spend (the job's own entry left out) cannot take the amount, {-4, i, spent} when
-- only the other jobs' open reservations in scope i keep it out (with their excesses and its
-- room, as above; nothing written), {-5, i, spent} when scope i's ledger is restoring
-- (nothing written: it waits as for -4), {-2, i} when scope i's ledger is missing (Redis lost
-- it), and {-3, i} when scope i's generation is not the caller's (a reserve: the ledger was
-- made again): the caller reconciles it, putting back what it settled, and calls again. A
-- settle whose entry is gone adds nothing when the ledger is the one it reserved in (the
-- entry lapsed, or the job was reconciled: its usage row brings its cost into base), and
-- adds its entry when the ledger was made again since (the reservation was lost with the
-- old one).

local REAP = 100 -- lapsed entries reaped per scope and call: bounded work on the hot path
local FORCED = 2 ^ 62 -- a limit this large is a forced reserve's (budgets.py UNLIMITED)

local mode = ARGV[1]
local amount = tonumber(ARGV[2])
local room = tonumber(ARGV[9])
-- Passed on to Redis as the caller wrote it (an integer), where a number would be formatted
-- into a string again (as ARGV[2] is, below).
local ttl = ARGV[3]
local threshold = tonumber(ARGV[4])
local job = ARGV[7]
local field, mark, over = 'j:' .. job, 'r:' .. job, 'x:' .. job
-- The round trip's TIME when this runs with other calls (batch.lua).
local time = ... or redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
-- Integers go to Redis formatted here ('%d'): Redis would format a number with '%.17g', which
-- costs several times as much.
local stamp = string.format('%d', now)
local expires = string.format('%d', now + tonumber(ARGV[8]))
local scopes = (#KEYS - 2) / 2

local spent, held, mine, lost, gens = {}, {}, {}, {}, {}
-- Each scope's sums as read (or read again after a reap): written back with this call's change.
local open, reserved, excess, mine_over = {}, {}, {}, {}
local waits
for i = 1, scopes do
  local ledger, expiry = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local known = ARGV[9 + scopes + i]
  -- Its entry, reservation and sums with the rest, read again below only if a reap changed
  -- them.
  local state = redis.call('HMGET', ledger, 'base', 'gen', 'open', field, 'reserved', mark,
    'restoring', 'excess', over)
  local base = state[1]
  gens[i] = state[2] or ''
  if not base then
    if mode == 'reserve' then
      return {-2, i}
    end
  elseif mode == 'reserve' and known ~= '' and gens[i] ~= known then
    return {-3, i}
  else
    if mode == 'reserve' then
      local lapsed = redis.call('ZRANGEBYSCORE', expiry, '-inf', stamp, 'LIMIT', 0, REAP)
      if #lapsed > 0 then
        local gone, unreserved, unexcess, fields = 0, 0, 0, {}
        for _, id in ipairs(lapsed) do
          local f, r, x = 'j:' .. id, 'r:' .. id, 'x:' .. id
          local entry = redis.call('HMGET', ledger, f, r, x)
          gone = gone + (tonumber(entry[1]) or 0)
          unreserved = unreserved + (tonumber(entry[2]) or 0)
          unexcess = unexcess + (tonumber(entry[3]) or 0)
          fields[#fields + 1], fields[#fields + 2], fields[#fields + 3] = f, r, x
        end
        redis.call('HDEL', ledger, unpack(fields))
        redis.call('ZREM', expiry, unpack(lapsed))
        redis.call('HINCRBY', ledger, 'open', string.format('%d', -gone))
        if unreserved > 0 then
          redis.call('HINCRBY', ledger, 'reserved', string.format('%d', -unreserved))
        end
        if unexcess > 0 then
          redis.call('HINCRBY', ledger, 'excess', string.format('%d', -unexcess))
        end
        local now_open = redis.call('HMGET', ledger, 'open', field, 'reserved', mark, 'excess',
          over)
        state[3], state[4], state[5], state[6] = now_open[1], now_open[2], now_open[3], now_open[4]
        state[8], state[9] = now_open[5], now_open[6]
      end
    end
    held[i] = tonumber(state[4])
    mine[i] = tonumber(state[6])
    open[i], reserved[i] = tonumber(state[3]) or 0, tonumber(state[5]) or 0
    excess[i], mine_over[i] = tonumber(state[8]) or 0, tonumber(state[9])
    lost[i] = known ~= '' and gens[i] ~= known
    spent[i] = tonumber(base) + (tonumber(state[3]) or 0)
    if mode == 'reserve' then
      local limit = tonumber(ARGV[9 + i])
      local others = spent[i] - (held[i] or 0)
      -- The other jobs' open reservations, and what unbounded ones (and ended ones: unreserve.lua)
      -- may cost past them.
      local theirs = reserved[i] - (mine[i] or 0)
      local past = excess[i] - (mine_over[i] or 0)
      local settled = others - theirs
      if settled + amount > limit then
        return {-1, i, settled}
      end
      -- Refused already (above) when the settled spend cannot take it: what the other
      -- workers put back only adds to it.
      if not waits and limit < FORCED and now < (tonumber(state[7]) or 0) then
        waits = {-5, i, spent[i]}
      elseif not waits and (others + amount > limit
          or ((theirs > 0 or past > 0) and others + past + math.max(room, amount) > limit)) then
        waits = {-4, i, spent[i]}
      end
    end
  end
end
-- Only once every scope is read: one whose settled spend refuses the job refuses it, though
-- another's reservations would only have held it.
if waits then
  return waits
end

local team_spent = spent[1]
local team_settled = spent[1] and spent[1] - reserved[1]
for i = 1, scopes do
  local ledger, expiry = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  if spent[i] and (mode == 'reserve' or held[i] or lost[i]) then
    -- Each field the call writes or drops in one command, not one per field: the sums too,
    -- as read above plus this call's change (the script runs alone, so nothing changed them
    -- since), where an HINCRBY each would cost a command. Integers, exact as Lua's numbers
    -- up to 2^53 nano-USD (9 million USD) a sum, as reconcile.lua writes them.
    local sums = {'open', string.format('%d', open[i] + amount - (held[i] or 0))}
    if mode == 'reserve' then
      -- What it may cost past its reservation (an unbounded job), counted in `excess`.
      local beyond = math.max(room - amount, 0)
      sums[3], sums[4] = 'reserved', string.format('%d', reserved[i] + amount - (mine[i] or 0))
      if beyond > 0 or mine_over[i] then
        sums[5] = 'excess'
        sums[6] = string.format('%d', excess[i] + beyond - (mine_over[i] or 0))
      end
      if beyond > 0 then
        redis.call('HSET', ledger, field, ARGV[2], mark, ARGV[2], over,
          string.format('%d', beyond), unpack(sums))
      else
        if mine_over[i] then
          redis.call('HDEL', ledger, over)
        end
        redis.call('HSET', ledger, field, ARGV[2], mark, ARGV[2], unpack(sums))
      end
      redis.call('ZADD', expiry, expires, job)
    else
      if mine[i] then
        -- Settled: its entry is spend now, no longer a reservation.
        sums[3], sums[4] = 'reserved', string.format('%d', reserved[i] - mine[i])
      end
      local keep = mode == 'lost' and amount > 0
      if mine_over[i] and not keep then
        sums[#sums + 1], sums[#sums + 2] = 'excess', string.format('%d', excess[i] - mine_over[i])
      end
      if amount == 0 then
        -- Nothing spent: nothing for accounting to bring into base either.
        redis.call('HSET', ledger, unpack(sums))
        redis.call('HDEL', ledger, field, mark, over)
        redis.call('ZREM', expiry, job)
      else
        if keep then
          if mine[i] then
            redis.call('HDEL', ledger, mark)
          end
        elseif mine[i] or mine_over[i] then
          redis.call('HDEL', ledger, mark, over)
        end
        redis.call('HSET', ledger, field, ARGV[2], unpack(sums))
        redis.call('ZADD', expiry, expires, job)
      end
    end
    -- Kept ttl past the last reserve: a settle's entry was written with its ttl by the job's
    -- reserve (or a reconcile), moments ago against the weeks it keeps the ledger, unless
    -- the ledger was made again since.
    if mode == 'reserve' or lost[i] then
      redis.call('EXPIRE', ledger, ttl)
      redis.call('EXPIRE', expiry, ttl)
    end
    if i == 1 then
      team_spent = spent[1] - (held[1] or 0) + amount
      -- A reserve leaves the settled spend as it was; a settle adds what the job cost.
      local still = reserved[1] - (mine[1] or 0) + (mode == 'reserve' and amount or 0)
      team_settled = team_spent - still
    end
  end
end

if team_settled and threshold > 0 and team_settled >= threshold then
  if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*',
      'team', ARGV[5], 'month', ARGV[6], 'spent_nano_usd', string.format('%d', team_settled),
      'budget_nano_usd', ARGV[10])
    return {0, team_settled, 1, unpack(gens)}
  end
end
return {0, team_spent or 0, 0, unpack(gens)}
