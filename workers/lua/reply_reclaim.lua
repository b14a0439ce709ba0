-- Give back the slots of a team's reply and results queues that the broker no longer has
-- (deleted by an operator, lost with a node, expired early): workers/control.py found them
-- missing by a passive declare, after reading each one's slot. A slot is given back only
-- when it is as read then and no worker is declaring its queue: an open of the same queue
-- between the read and now (its expiry refreshed, or marked being declared) keeps it, or a
-- queue declared just after the look would exist with no slot.
--
-- KEYS[1]  the team's reply queues (sorted set: name -> when it may have expired)
-- KEYS[2]  the team's queues being declared (sorted set: name -> when that is given up on)
-- ARGV[1]  now (epoch seconds)
-- ARGV[2], ARGV[3], ...  pairs: a queue found missing, its slot's score when read
--
-- Returns how many slots were given back.

local freed = 0
for i = 2, #ARGV, 2 do
  local queue = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], queue)
  local declaring = redis.call('ZSCORE', KEYS[2], queue)
  if score and tonumber(score) == tonumber(ARGV[i + 1])
      and not (declaring and tonumber(declaring) > tonumber(ARGV[1])) then
    redis.call('ZREM', KEYS[1], queue)
    freed = freed + 1
  end
end
return freed
