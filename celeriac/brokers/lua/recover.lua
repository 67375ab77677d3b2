-- recover: renew the calling consumer's lease (and any others it names), then return the
-- in-flight messages of every consumer whose lease has lapsed (a killed worker's) to the
-- right end of their lists, marked redelivered with their redelivery count raised.
-- Runs after envelope.lua and inflight.lua (return_inflight).
--
-- Key layout:
--   KEYS[1]  celeriac.consumers         ZSET  consumer id -> lease end (unix time)
--   KEYS[2]  celeriac.dead              LIST  dead-letter records (JSON), newest left
--   built from ARGV (the names depend on the ZSET's members and the payloads):
--   celeriac.inflight.<id>                  LIST  payloads leased to consumer <id>, newest left
--   Q, Q\x06\x163, Q\x06\x166, Q\x06\x169   LISTs the queue a payload's routing names
--   _kombu.binding.<exchange>               SET   read by queue_of for named exchanges
-- On Redis Cluster the call is about one queue Q, and every key is in Q's hash slot:
--   KEYS[1]  celeriac.consumers.{Q}, KEYS[2] celeriac.dead.{Q}, ARGV[4] celeriac.inflight.{Q}.
--   KEYS[3..6]  Q, {Q}\x06\x163, {Q}\x06\x166, {Q}\x06\x169: where every payload goes back
-- ARGV[1] calling consumer id, ARGV[2] lease seconds, ARGV[3] grace seconds, ARGV[4] the
-- in-flight key prefix, ARGV[5] most lapsed consumers to handle per call, ARGV[6..] other
-- consumer ids whose leases to renew too (a prefork parent's children).
--
-- A lapsed consumer stays in the ZSET for `grace` seconds after its lease ended, so a
-- message it moved in while already lapsed (a process frozen between its lease renewal and
-- its BLMOVE) is still found by a later call. Payloads that are not envelopes, whose queue
-- cannot be known, become dead letters with the payload hex-encoded.
-- Returns {messages returned to queues, messages dead-lettered}.

local now = server_now()
local lease_end = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
for i = 6, #ARGV do
    redis.call('ZADD', KEYS[1], lease_end, ARGV[i])
end

local lists = lists_from(3)
local returned, dead = 0, 0
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
for i = 1, #lapsed, 2 do
    local consumer, ended = lapsed[i], tonumber(lapsed[i + 1])
    local back, set_aside_count = return_inflight(ARGV[4] .. consumer, consumer, KEYS[2], now, lists)
    returned, dead = returned + back, dead + set_aside_count
    if now - ended > tonumber(ARGV[3]) then
        redis.call('ZREM', KEYS[1], consumer)
    end
end
return { returned, dead }
