-- release: give one leased message back. Without an eta it goes to the right end of its
-- list (consumed next, as kombu restores), marked redelivered with its redelivery count
-- raised, or unchanged when it never ran; with an eta it is parked, unchanged, in its
-- queue's delayed set until then. Runs after envelope.lua (mark_redelivered).
--
-- Key layout:
--   KEYS[1]  celeriac.inflight.<id>   LIST  the payloads leased to the consumer that fetched it
--   KEYS[2]  Q or Q\x06\x16<step>     LIST  (ARGV[2] == 'now' or 'same') the list it was taken from
--            celeriac.delayed.<Q>     ZSET  (ARGV[2] == 'at')  payload -> eta
-- ARGV[1] the exact payload, ARGV[2] 'now' (marked redelivered), 'same' (unchanged) or 'at',
-- ARGV[3] the eta (unix time) for 'at'.
--
-- Returns 1 if the message was leased and went back, 0 if it was no longer in flight
-- (acked already, or returned by a heartbeat after its consumer's lease lapsed).

if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
    return 0
end
if ARGV[2] == 'at' then
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
elseif ARGV[2] == 'same' then
    redis.call('RPUSH', KEYS[2], ARGV[1])
else
    redis.call('RPUSH', KEYS[2], mark_redelivered(ARGV[1]))
end
return 1
