-- fetch: renew a consumer's lease, make its queues' due delayed messages ready, and lease
-- up to `limit` messages into its in-flight list, most urgent step first across queues.
-- Runs after envelope.lua (step_of_envelope, decoded, server_now).
--
-- Key layout:
--   KEYS[1]                 celeriac.consumers          ZSET  consumer id -> lease end (unix time)
--   KEYS[2]                 celeriac.inflight.<id>      LIST  payloads leased to this consumer, newest left
--   then per queue Q, five keys:
--   KEYS[3 + 5i]            celeriac.delayed.<Q>        ZSET  payload -> eta
--   KEYS[4 + 5i .. 7 + 5i]  Q, Q\x06\x163, Q\x06\x166, Q\x06\x169   LISTs, oldest at the right
-- ARGV[1] consumer id, ARGV[2] lease seconds, ARGV[3] limit, ARGV[4] most delayed messages
-- to move per queue and call.
--
-- Returns a flat array of groups {queue index (0-based), step (0-3), n, payload * n}; the
-- payloads of a group are oldest first. Everything happens in one atomic script, so a
-- message is always in exactly one place: a queue list, a delayed set or an in-flight list.

local MOST_PER_MOVE = 1000 -- keeps unpack() far below Lua's argument limit

local now = server_now()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])

local queues = (#KEYS - 2) / 5

-- Due delayed messages join the back of their list, like a fresh publish.
for q = 0, queues - 1 do
    local base = 3 + 5 * q
    local due = redis.call('ZRANGEBYSCORE', KEYS[base], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
    for _, payload in ipairs(due) do
        redis.call('LPUSH', KEYS[base + 1 + step_of_envelope(decoded(payload))], payload)
    end
    if #due > 0 then
        redis.call('ZREM', KEYS[base], unpack(due))
    end
end

local out = {}
local wanted = tonumber(ARGV[3])
for step = 0, 3 do
    for q = 0, queues - 1 do
        local list = KEYS[4 + 5 * q + step]
        while wanted > 0 do
            -- LRANGE with negative bounds reads the oldest messages (rightmost, newest first).
            local items = redis.call('LRANGE', list, -math.min(wanted, MOST_PER_MOVE), -1)
            local n = #items
            if n == 0 then
                break
            end
            redis.call('LTRIM', list, 0, -(n + 1))
            local oldest_first = {}
            for i = n, 1, -1 do
                oldest_first[#oldest_first + 1] = items[i]
            end
            -- Pushed oldest first, so the in-flight list keeps the queue's order (newest left).
            redis.call('LPUSH', KEYS[2], unpack(oldest_first))
            out[#out + 1] = q
            out[#out + 1] = step
            out[#out + 1] = n
            for i = 1, n do
                out[#out + 1] = oldest_first[i]
            end
            wanted = wanted - n
        end
    end
end
return out
