-- purge: delete every waiting message of one queue (its four lists and its delayed set)
-- and say how many there were, in one atomic step. Leased messages are not touched.
--
-- Key layout:
--   KEYS[1..4]  Q, Q\x06\x163, Q\x06\x166, Q\x06\x169  LISTs  the queue's priority steps
--   KEYS[5]     celeriac.delayed.<Q>                  ZSET   payload -> eta
--
-- Returns the number of messages deleted.

local count = redis.call('ZCARD', KEYS[5])
for i = 1, 4 do
    count = count + redis.call('LLEN', KEYS[i])
end
redis.call('DEL', unpack(KEYS))
return count
