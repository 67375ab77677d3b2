-- reclaim: return every in-flight message of one consumer known to be gone (a pool child
-- its parent saw die) to the right end of its list at once, exactly as recover.lua does
-- for a lapsed lease, and drop the consumer's lease. Runs after envelope.lua and inflight.lua.
--
-- Key layout:
--   KEYS[1]  celeriac.consumers         ZSET  consumer id -> lease end (unix time)
--   KEYS[2]  celeriac.dead              LIST  dead-letter records (JSON), newest left
--   KEYS[3]  celeriac.inflight.<id>     LIST  payloads leased to the consumer, newest left
--   (and, built from the payloads, the queue lists and kombu bindings: see recover.lua)
--   KEYS[4..7]  on Redis Cluster only: the lists of the queue whose in-flight list KEYS[3] is
--               (celeriac.inflight.{Q}.<id>), where every payload goes back
-- ARGV[1] the consumer id.
--
-- Returns {messages returned to queues, messages dead-lettered}.

local returned, dead = return_inflight(KEYS[3], ARGV[1], KEYS[2], server_now(), lists_from(4))
redis.call('ZREM', KEYS[1], ARGV[1])
return { returned, dead }
