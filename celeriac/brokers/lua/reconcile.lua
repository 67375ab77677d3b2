-- reconcile: give back payloads found in a live consumer's in-flight list that its process
-- never received (a fetch whose reply was lost). Each goes, unchanged, to the right end of
-- the list its envelope routes to: nobody ever saw it, so it is no redelivery. Runs after
-- envelope.lua and inflight.lua.
--
-- Key layout:
--   KEYS[1]  celeriac.inflight.<id>     LIST  payloads leased to the consumer, newest left
--   KEYS[2]  celeriac.dead              LIST  dead-letter records (JSON), newest left
--   (and, built from the payloads, the queue lists and kombu bindings: see recover.lua)
--   KEYS[3..6]  on Redis Cluster only: the lists of the queue whose in-flight list KEYS[1] is
--               (celeriac.inflight.{Q}.<id>), where every payload goes back
-- ARGV[1] the consumer id, ARGV[2..] the payloads to give back, newest first (one argument
-- per copy). A payload no longer in the list (settled meanwhile) is skipped.
--
-- Returns {messages returned to queues, messages dead-lettered}.

local now = server_now()
local lists = lists_from(3)
local returned, dead = 0, 0
for i = 2, #ARGV do
    local payload = ARGV[i]
    if redis.call('LREM', KEYS[1], 1, payload) == 1 then
        if requeue(payload, false, lists) then
            returned = returned + 1
        else
            set_aside(KEYS[2], payload, ARGV[1], 'in flight with a lost fetch reply of consumer', now)
            dead = dead + 1
        end
    end
end
return { returned, dead }
