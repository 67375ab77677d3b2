-- dead_letter: move one leased message out of its consumer's in-flight list into the
-- dead-letter list, atomically, so it is never both in flight and dead nor in neither.
--
-- Key layout:
--   KEYS[1]  celeriac.inflight.<id>  LIST  payloads leased to the consumer that fetched it
--   KEYS[2]  celeriac.dead           LIST  JSON records {queue, payload, reason, when}, newest left
-- ARGV[1] the exact payload, ARGV[2] the record to push (built by the caller).
--
-- Returns 1 if the message was in flight and is now a dead letter, else 0.

if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
    return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
