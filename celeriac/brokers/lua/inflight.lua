-- Helpers for scripts that take payloads out of in-flight lists: recover.lua, reclaim.lua and
-- reconcile.lua. redis.py puts envelope.lua, then this file, in front of them. Not a script on
-- its own. Key layout: see envelope.lua.
--
-- `lists`, where a caller passes it, holds the four list keys of the one queue every payload
-- came from (on Redis Cluster, where each queue has in-flight lists of its own and a script
-- may touch only keys of that queue's hash slot). Without it a payload's queue is read from
-- its envelope, as on a single server.

local function hex(s)
    return (string.gsub(s, '.', function(c)
        return string.format('%02x', string.byte(c))
    end))
end

-- Keep a payload whose queue cannot be known among the dead letters (list `dead_key`),
-- hex-encoded, saying which consumer held it and why it was taken back.
local function set_aside(dead_key, payload, consumer, why, now)
    local record = {
        queue = '',
        payload = hex(payload),
        payload_encoding = 'hex',
        reason = why .. ' ' .. consumer .. ' but not a kombu envelope: its queue is unknown',
        when = now,
    }
    redis.call('LPUSH', dead_key, cjson.encode(record))
end

-- The four list keys the caller passed from KEYS[first] on, or nil when it passed none.
local function lists_from(first)
    if #KEYS >= first + 3 then
        return { KEYS[first], KEYS[first + 1], KEYS[first + 2], KEYS[first + 3] }
    end
    return nil
end

-- Put a payload taken out of an in-flight list at the right end (consumed next) of the list
-- its envelope routes to (or of `lists`, when given), marked redelivered when `mark`. False
-- when its queue is unknown.
local function requeue(payload, mark, lists)
    local doc = decoded(payload)
    local key
    if lists then
        key = lists[step_of_envelope(doc) + 1]
    else
        local queue = queue_of(doc)
        if not queue then
            return false
        end
        key = list_key(queue, step_of_envelope(doc))
    end
    redis.call('RPUSH', key, mark and mark_redelivered(payload) or payload)
    return true
end

-- Empty consumer `consumer`'s in-flight list as a lapsed lease does: every payload back to its
-- queue (or to `lists`) marked redelivered, those whose queue is unknown to the dead letters.
-- Returns the numbers returned and dead-lettered.
local function return_inflight(inflight, consumer, dead_key, now, lists)
    local returned, dead = 0, 0
    -- Newest first: each RPUSH lands to the right of the previous one, so the oldest lease
    -- ends up rightmost and is consumed first again.
    for _, payload in ipairs(redis.call('LRANGE', inflight, 0, -1)) do
        if requeue(payload, true, lists) then
            returned = returned + 1
        else
            set_aside(dead_key, payload, consumer, 'in flight with lost consumer', now)
            dead = dead + 1
        end
    end
    redis.call('DEL', inflight)
    return returned, dead
end
