-- Helpers shared by the celeriac Redis broker's scripts; redis.py puts this file in front
-- of every script that reads or edits envelopes (fetch, release, recover, reclaim,
-- reconcile) before loading it. Not a script on its own.
--
-- Key layout (the same in every celeriac script; redis.py's header explains why):
--   Q, Q\x06\x163, Q\x06\x166, Q\x06\x169   LISTs   kombu's queue Q, one list per priority step
--                                                   (0-2, 3-5, 6-8, 9; 0 most urgent). LPUSH in,
--                                                   taken from the right.
--   _kombu.binding.<exchange>                SET     kombu bindings "rkey\x06\x16pattern\x06\x16queue";
--                                                   read here only to route named-exchange messages
--   celeriac.inflight.<consumer id>          LIST    exact payloads leased to that consumer, newest left
--   celeriac.consumers                       ZSET    consumer id -> unix time its lease ends
--   celeriac.delayed.<queue>                 ZSET    payload -> eta (unix time) of parked messages
--   celeriac.dead                            LIST    JSON dead-letter records, newest left
--
-- On Redis Cluster (redis_cluster.py) every key of queue Q shares the hash slot of the tag {Q}:
-- Q, {Q}\x06\x163, {Q}\x06\x166, {Q}\x06\x169, celeriac.inflight.{Q}.<id>, celeriac.consumers.{Q},
-- celeriac.delayed.{Q} and celeriac.dead.{Q}. Each script call is then about one queue, whose
-- lists it is given among its KEYS (see inflight.lua), so no key is built from a payload.
--
-- Payloads are kombu envelopes (JSON). Scripts read them with cjson, but never write cjson's
-- re-encoding back: it turns [] into {}, rounds big integers and reorders keys, so a Celery
-- consumer could see a different message. Edits are splices into the original text instead.

local SEP = '\6\22'
local STEP_SUFFIXES = { [0] = '', [1] = SEP .. '3', [2] = SEP .. '6', [3] = SEP .. '9' }
local REDELIVERIES = 'x-celeriac-redeliveries'

-- Unix time on the Redis server, so leases and etas do not depend on any client's clock.
local function server_now()
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The envelope as a Lua table, or nil when the payload is not a JSON object.
local function decoded(payload)
    local ok, doc = pcall(cjson.decode, payload)
    if ok and type(doc) == 'table' then
        return doc
    end
    return nil
end

-- Which of a queue's four lists (0-3) a priority belongs to: kombu's steps 0, 3, 6, 9.
local function step_of(priority)
    local p = tonumber(priority) or 0
    if p >= 9 then
        return 3
    elseif p >= 6 then
        return 2
    elseif p >= 3 then
        return 1
    end
    return 0
end

local function step_of_envelope(doc)
    if doc and type(doc.properties) == 'table' then
        return step_of(doc.properties.priority)
    end
    return 0
end

local function list_key(queue, step)
    return queue .. STEP_SUFFIXES[step]
end

-- The queue an envelope was routed to: the routing key on the default exchange, else the
-- queue bound to the named exchange under that routing key (kombu's direct routing).
local function queue_of(doc)
    local props = doc and doc.properties
    local info = type(props) == 'table' and props.delivery_info
    if type(info) ~= 'table' or type(info.routing_key) ~= 'string' then
        return nil
    end
    local rkey, exchange = info.routing_key, info.exchange
    if type(exchange) ~= 'string' or exchange == '' then
        return rkey
    end
    for _, member in ipairs(redis.call('SMEMBERS', '_kombu.binding.' .. exchange)) do
        local key, _, queue = string.match(member, '^(.-)' .. SEP .. '(.-)' .. SEP .. '(.*)$')
        if key == rkey then
            return queue
        end
    end
    return rkey
end

-- A minimal JSON scanner, enough to find a member's value span and splice a new value in.

local function skip_ws(s, i)
    return string.find(s, '[^ \t\r\n]', i) or (#s + 1)
end

-- Index of the last character of the JSON value that starts at i.
local function value_end(s, i)
    local c = string.sub(s, i, i)
    if c == '"' then
        local j = i + 1
        while true do
            local k = string.find(s, '["\\]', j)
            if not k then
                error('unterminated string')
            end
            if string.sub(s, k, k) == '\\' then
                j = k + 2
            else
                return k
            end
        end
    elseif c == '{' or c == '[' then
        local depth, j = 0, i
        while true do
            local k = string.find(s, '["{}%[%]]', j)
            if not k then
                error('unbalanced brackets')
            end
            local ch = string.sub(s, k, k)
            if ch == '"' then
                j = value_end(s, k) + 1
            else
                depth = depth + ((ch == '{' or ch == '[') and 1 or -1)
                if depth == 0 then
                    return k
                end
                j = k + 1
            end
        end
    end
    local k = string.find(s, '[,}%]%s]', i)
    return (k or (#s + 1)) - 1
end

-- Find member `name` of the object whose '{' is at index `open`.
-- Returns true, value_start, value_end when present; false, index_of_closing_brace otherwise.
local function find_member(s, open, name)
    local j = skip_ws(s, open + 1)
    if string.sub(s, j, j) == '}' then
        return false, j
    end
    while true do
        local key_end = value_end(s, j)
        local value_start = skip_ws(s, skip_ws(s, key_end + 1) + 1)
        local value_stop = value_end(s, value_start)
        if string.sub(s, j + 1, key_end - 1) == name then
            return true, value_start, value_stop
        end
        local after = skip_ws(s, value_stop + 1)
        if string.sub(s, after, after) == '}' then
            return false, after
        end
        j = skip_ws(s, after + 1)
    end
end

-- Set member `name` of the object at `open` to the JSON text `value`, keeping everything else.
local function set_member(s, open, name, value)
    local found, a, b = find_member(s, open, name)
    if found then
        return string.sub(s, 1, a - 1) .. value .. string.sub(s, b + 1)
    end
    local empty = skip_ws(s, open + 1) == a
    local member = (empty and '' or ',') .. '"' .. name .. '":' .. value
    return string.sub(s, 1, a - 1) .. member .. string.sub(s, a)
end

-- The text and the '{' index of the object at `path` (keys from the top), creating it (or
-- replacing a non-object value such as null) when needed.
local function object_at(s, path)
    local open = skip_ws(s, 1)
    if string.sub(s, open, open) ~= '{' then
        error('not a JSON object')
    end
    for _, key in ipairs(path) do
        local found, a = find_member(s, open, key)
        if not found or string.sub(s, a, a) ~= '{' then
            s = set_member(s, open, key, '{}')
            found, a = find_member(s, open, key)
        end
        open = a
    end
    return s, open
end

-- How often this envelope went back to its queue after being handed out (our header).
local function redeliveries(payload)
    local ok, count = pcall(function()
        local s, headers = object_at(payload, { 'headers' })
        local found, a, b = find_member(s, headers, REDELIVERIES)
        return found and tonumber(string.sub(s, a, b)) or 0
    end)
    return ok and count or 0
end

-- The envelope marked as kombu marks a restored message (headers.redelivered and
-- properties.delivery_info.redelivered), with our redelivery count raised by one. A payload
-- that is not a JSON object is returned unchanged.
local function mark_redelivered(payload)
    local count = redeliveries(payload) + 1
    local ok, marked = pcall(function()
        local s, open = object_at(payload, { 'headers' })
        s = set_member(s, open, 'redelivered', 'true')
        s, open = object_at(s, { 'headers' })
        s = set_member(s, open, REDELIVERIES, tostring(count))
        s, open = object_at(s, { 'properties', 'delivery_info' })
        return set_member(s, open, 'redelivered', 'true')
    end)
    return ok and marked or payload
end
