-- recover: renew the calling consumer's lease, then return the in-flight messages of every
-- consumer whose lease has lapsed (a killed worker's) to the right end of their lists, marked
-- redelivered with their redelivery count raised. Runs after envelope.lua.
--
-- Key layout:
--   KEYS[1]  celeriac.consumers         ZSET  consumer id -> lease end (unix time)
--   KEYS[2]  celeriac.dead              LIST  dead-letter records (JSON), newest left
--   built from ARGV (the names depend on the ZSET's members and the payloads, so this
--   script cannot run on Redis Cluster, which celeriac does not support):
--   celeriac.inflight.<id>                  LIST  payloads leased to consumer <id>, newest left
--   Q, Q\x06\x163, Q\x06\x166, Q\x06\x169   LISTs the queue a payload's routing names
--   _kombu.binding.<exchange>               SET   read by queue_of for named exchanges
-- ARGV[1] calling consumer id, ARGV[2] lease seconds, ARGV[3] grace seconds, ARGV[4] the
-- in-flight key prefix, ARGV[5] most lapsed consumers to handle per call.
--
-- A lapsed consumer stays in the ZSET for `grace` seconds after its lease ended, so a
-- message it moved in while already lapsed (a process frozen between its lease renewal and
-- its BLMOVE) is still found by a later call. Payloads that are not envelopes, whose queue
-- cannot be known, become dead letters with the payload hex-encoded.
-- Returns {messages returned to queues, messages dead-lettered}.

local now = server_now()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])

local function hex(s)
    return (string.gsub(s, '.', function(c)
        return string.format('%02x', string.byte(c))
    end))
end

local function set_aside(payload, consumer)
    local record = {
        queue = '',
        payload = hex(payload),
        payload_encoding = 'hex',
        reason = 'in flight with lost consumer ' .. consumer .. ' but not a kombu envelope: its queue is unknown',
        when = now,
    }
    redis.call('LPUSH', KEYS[2], cjson.encode(record))
end

local returned, dead = 0, 0
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
for i = 1, #lapsed, 2 do
    local consumer, lease_end = lapsed[i], tonumber(lapsed[i + 1])
    local inflight = ARGV[4] .. consumer
    -- Newest first: each RPUSH lands to the right of the previous one, so the oldest lease
    -- ends up rightmost and is consumed first again.
    for _, payload in ipairs(redis.call('LRANGE', inflight, 0, -1)) do
        local doc = decoded(payload)
        local queue = queue_of(doc)
        if queue then
            redis.call('RPUSH', list_key(queue, step_of_envelope(doc)), mark_redelivered(payload))
            returned = returned + 1
        else
            set_aside(payload, consumer)
            dead = dead + 1
        end
    end
    redis.call('DEL', inflight)
    if now - lease_end > tonumber(ARGV[3]) then
        redis.call('ZREM', KEYS[1], consumer)
    end
end
return { returned, dead }
