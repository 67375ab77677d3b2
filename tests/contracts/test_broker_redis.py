"""What the Redis broker promises beyond the generic contract: kombu's keys, leases, recovery.

Every test runs on a real Redis (database 9, emptied first; see `redis_database`) and looks
at the raw keys through a plain redis-py client, as a Celery process sharing the Redis would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from celeriac import redis_deferred
from celeriac.brokers import redis_ledger
from celeriac.brokers.base import Delivery, Outgoing
from celeriac.brokers.redis import RedisBroker, sentinel_hosts
from celeriac.exceptions import BrokerError, ImproperlyConfigured, OperationalError
from celeriac.protocol.message import Envelope, pack, unpack
from celeriac.redis_spare import packed
from tests.conftest import closing_factory, free_port, redis_answers
from tests.contracts.test_broker import eventually, redis_database

QUEUE = "celery"
SHORT_LEASE = 0.5
BINDING_MEMBER = b"celery\x06\x16\x06\x16celery"
ROOT = Path(__file__).resolve().parents[2]

MakeBroker = Callable[..., RedisBroker]


@pytest.fixture
def url() -> Iterator[str]:
    with redis_database() as url:
        yield url


@pytest.fixture
def raw(url: str) -> Iterator[redis.Redis]:
    """A plain client on the test database: what another Celery process would see."""
    client = redis.Redis.from_url(url)
    yield client
    client.close()


@pytest.fixture
def make_broker(url: str) -> Iterator[MakeBroker]:
    yield from closing_factory(lambda **options: RedisBroker(url, options))


@pytest.fixture
def broker(make_broker: MakeBroker) -> RedisBroker:
    return make_broker()


def task_envelope(name: str, priority: int = 0) -> bytes:
    """A packed task message as Celery lays it out, including headers cjson would mangle."""
    headers = {
        "lang": "py",
        "task": "proj.add",
        "id": name,
        "timelimit": [None, None],
        "stamped_headers": [],
        "stamps": {},
        "big": 12345678901234567,
    }
    properties = {"correlation_id": name, "priority": priority, "delivery_mode": 2}
    return pack(Envelope(b"[[2, 2], {}, {}]", "application/json", "utf-8", headers, properties), QUEUE)


def inflight(consumer: RedisBroker) -> str:
    return f"celeriac.inflight.{consumer.consumer_id}"


def go_silent(consumer: RedisBroker) -> None:
    """Stop `consumer` as a SIGKILL would: no more heartbeats, its leases left to lapse."""
    consumer.close()


# kombu's wire format ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "key"),
    [
        (0, b"celery"),
        (2, b"celery"),
        (3, b"celery\x06\x163"),
        (8, b"celery\x06\x166"),
        (9, b"celery\x06\x169"),
    ],
)
def test_a_published_message_lies_in_kombus_list_for_its_priority_and_the_queue_is_bound(
    broker: RedisBroker, raw: redis.Redis, priority: int, key: bytes
) -> None:
    # Given a task message
    payload = task_envelope("t1", priority)

    # When it is published with its priority
    broker.publish([Outgoing(QUEUE, payload, priority=priority)])

    # Then the list kombu uses for that priority holds exactly the envelope, and the queue is bound
    assert raw.lrange(key, 0, -1) == [payload]
    assert orjson.loads(payload)["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    assert raw.smembers(b"_kombu.binding.celery") == {BINDING_MEMBER}


def test_a_consumer_binds_the_queues_it_consumes_from(broker: RedisBroker, raw: redis.Redis) -> None:
    # Given nothing was ever published, when a consumer fetches from two queues
    broker.fetch([QUEUE, "other"], 1, timeout=0)

    # Then both are bound as kombu binds them, so Celery's tools see them
    assert raw.smembers("_kombu.binding.celery") == {BINDING_MEMBER}
    assert raw.smembers("_kombu.binding.other") == {b"other\x06\x16\x06\x16other"}


def test_a_message_lpushed_by_a_celery_style_producer_is_fetched(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given messages pushed the way Celery pushes them: pack, then LPUSH on the priority's list
    plain, least_urgent = task_envelope("plain"), task_envelope("least urgent", 9)
    raw.lpush("celery\x06\x169", least_urgent)
    raw.lpush("celery", plain)

    # When a consumer fetches
    fetched = broker.fetch([QUEUE], 10, timeout=1)

    # Then it gets both, byte for byte, most urgent (0) first, on their first attempt
    assert [d.payload for d in fetched] == [plain, least_urgent]
    assert [(d.queue, d.attempts) for d in fetched] == [(QUEUE, 1), (QUEUE, 1)]


def test_messages_published_together_keep_their_order_within_each_list(broker: RedisBroker) -> None:
    # Given a batch mixing two priorities, published in one call
    batch = [Outgoing(QUEUE, str(n).encode(), priority=9 if n % 2 else 0) for n in range(2500)]
    broker.publish(batch)

    # When everything is fetched
    fetched = broker.fetch([QUEUE], 5000, timeout=1)

    # Then the urgent ones come first, each priority in publish order
    evens, odds = [str(n).encode() for n in range(0, 2500, 2)], [str(n).encode() for n in range(1, 2500, 2)]
    assert [d.payload for d in fetched] == evens + odds


# leases -----------------------------------------------------------------------------------------


def test_fetch_moves_messages_into_the_consumers_inflight_list(broker: RedisBroker, raw: redis.Redis) -> None:
    # Given three waiting messages
    broker.publish([Outgoing(QUEUE, f"m{n}".encode()) for n in range(3)])

    # When a consumer fetches two
    fetched = broker.fetch([QUEUE], 2, timeout=1)

    # Then the queue lost exactly those, and the consumer's in-flight list holds them, leased
    assert raw.lrange(QUEUE, 0, -1) == [b"m2"]
    assert sorted(raw.lrange(inflight(broker), 0, -1)) == [b"m0", b"m1"] == [d.payload for d in fetched]
    assert raw.zscore("celeriac.consumers", broker.consumer_id) is not None

    # And acking them empties the in-flight list
    broker.ack(fetched)
    assert raw.llen(inflight(broker)) == 0


def test_a_fetch_after_the_server_lost_its_scripts_loads_the_script_again(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that has fetched before, and a server that then forgot every script
    broker.publish([Outgoing(QUEUE, f"m{n}".encode()) for n in range(3)])
    first = broker.fetch([QUEUE], 1, timeout=1)
    raw.script_flush()

    # When it fetches again
    again = broker.fetch([QUEUE], 2, timeout=1)

    # Then it leases the next messages once each, as if nothing had happened
    assert [d.payload for d in first + again] == [b"m0", b"m1", b"m2"]
    assert sorted(raw.lrange(inflight(broker), 0, -1)) == [b"m0", b"m1", b"m2"]
    assert raw.llen(QUEUE) == 0


def test_a_lapsed_consumers_messages_come_back_marked_redelivered_and_counted(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased a Celery message and went silent
    first = make_broker(lease_timeout=SHORT_LEASE)
    first.publish_one(QUEUE, task_envelope("t1"))
    [original] = first.fetch([QUEUE], 1, timeout=1)
    go_silent(first)

    # When another consumer heartbeats until the lease lapses
    second = make_broker(lease_timeout=SHORT_LEASE)
    assert eventually(second.heartbeat) == 1

    # Then the message is back, marked as kombu marks restored messages, on its second attempt
    [again] = second.fetch([QUEUE], 1, timeout=1)
    assert (again.attempts, again.redelivered) == (2, True)
    document, before = orjson.loads(again.payload), orjson.loads(original.payload)
    assert document["headers"]["redelivered"] is True
    assert document["properties"]["delivery_info"]["redelivered"] is True
    assert document["headers"]["x-celeriac-redeliveries"] == 1

    # And nothing else changed: the body, empty lists and big integers are intact
    for added in ("redelivered", "x-celeriac-redeliveries"):
        del document["headers"][added]
    del document["properties"]["delivery_info"]["redelivered"]
    assert document == before
    assert b'"stamped_headers":[]' in again.payload
    assert raw.exists(inflight(first)) == 0

    # When the second consumer dies too, then a third gets the message on its third attempt
    go_silent(second)
    third = make_broker(lease_timeout=SHORT_LEASE)
    assert eventually(third.heartbeat) == 1
    [thrice] = third.fetch([QUEUE], 1, timeout=1)
    assert (thrice.attempts, unpack(thrice.payload).body) == (3, unpack(original.payload).body)


def test_a_live_consumer_keeps_its_messages_past_its_lease_by_heartbeating(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer holding a message under a short lease
    holder, watcher = make_broker(lease_timeout=SHORT_LEASE), make_broker(lease_timeout=SHORT_LEASE)
    holder.publish_one(QUEUE, task_envelope("long"))
    [held] = holder.fetch([QUEUE], 1, timeout=1)

    # When it heartbeats for three leases while another consumer heartbeats too
    until = time.monotonic() + 3 * SHORT_LEASE
    while time.monotonic() < until:
        holder.heartbeat()
        # Then the other never takes the message back
        assert watcher.heartbeat() == 0
        time.sleep(SHORT_LEASE / 10)

    # And it is still in the holder's in-flight list, unchanged
    assert raw.lrange(inflight(holder), 0, -1) == [held.payload]


def test_a_message_without_an_envelope_left_by_a_lapsed_consumer_becomes_a_dead_letter(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a lapsed consumer that held a payload which is not a kombu envelope
    lost = make_broker(lease_timeout=SHORT_LEASE)
    lost.publish_one(QUEUE, b"\x00not json\xff")
    lost.fetch([QUEUE], 1, timeout=1)
    go_silent(lost)

    # When another consumer heartbeats past the lease
    survivor = make_broker(lease_timeout=SHORT_LEASE)

    def swept() -> bool:
        survivor.heartbeat()
        return raw.exists(inflight(lost)) == 0

    eventually(swept)

    # Then the payload, whose queue cannot be known, is kept among the dead letters
    [letter] = survivor.dead_letters()
    assert letter.payload == b"\x00not json\xff"
    assert "not a kombu envelope" in letter.reason
    assert survivor.size(QUEUE) == 0


def _fetch_then_die(url: str, how: str) -> None:
    # Runs in a child interpreter: lease messages, say so, then die without acking.
    broker = RedisBroker(url, {"lease_timeout": SHORT_LEASE})
    print(len(broker.fetch([QUEUE], 10, timeout=5)), flush=True)
    if how == "exit":
        import os

        os._exit(0)
    time.sleep(60)


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_a_consumer_killed_between_fetch_and_ack_loses_nothing(
    make_broker: MakeBroker, url: str, how: str
) -> None:
    # Given three waiting messages
    survivor = make_broker(lease_timeout=SHORT_LEASE)
    survivor.publish([Outgoing(QUEUE, task_envelope(f"t{n}")) for n in range(3)])

    # When a consumer process leases them all and dies (SIGKILL, or exit) before acking
    code = f"from tests.contracts.test_broker_redis import _fetch_then_die; _fetch_then_die({url!r}, {how!r})"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "3"
        if how == "sigkill":
            child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()

    # Then a live consumer's heartbeat returns all three, and they are fetched again
    assert eventually(survivor.heartbeat) == 3
    fetched = survivor.fetch([QUEUE], 10, timeout=1)
    assert [unpack(d.payload).headers["id"] for d in fetched] == ["t0", "t1", "t2"]
    assert {d.attempts for d in fetched} == {2}


def test_a_heartbeat_renews_the_leases_it_is_asked_to_renew_too(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given two consumer ids nobody has used yet (a prefork parent's children)
    children = ["child-a", "child-b"]

    # When a consumer heartbeats for them too
    broker.heartbeat(also=children)

    # Then each has a lease ending with the caller's
    own = raw.zscore("celeriac.consumers", broker.consumer_id)
    assert own is not None
    assert [raw.zscore("celeriac.consumers", child) for child in children] == [own, own]


def test_reclaim_empties_the_consumers_inflight_list_drops_its_lease_and_keeps_non_envelopes(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer holding a Celery message and a payload that is not an envelope
    parent, child = make_broker(), make_broker()
    parent.publish([Outgoing(QUEUE, task_envelope("t1")), Outgoing(QUEUE, b"\x00not json")])
    assert len(child.fetch([QUEUE], 2, timeout=1)) == 2

    # When it is reclaimed
    assert parent.reclaim(child.consumer_id) == 1

    # Then its in-flight list and its lease are gone, the envelope is back marked redelivered,
    # and the other payload, whose queue cannot be known, is a dead letter
    assert raw.exists(inflight(child)) == 0
    assert raw.zscore("celeriac.consumers", child.consumer_id) is None
    [again] = parent.fetch([QUEUE], 10, timeout=0)
    assert (unpack(again.payload).headers["id"], again.attempts) == ("t1", 2)
    [letter] = parent.dead_letters()
    assert letter.payload == b"\x00not json"
    assert child.consumer_id in letter.reason


def test_deliveries_settled_by_another_process_are_forgotten_without_returning_held_ones(
    make_broker: MakeBroker, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer that counts at most 10 unsettled payloads before it reads its in-flight list,
    # holding 30 messages, 25 of which another broker object (a pool child) acked
    monkeypatch.setattr(redis_ledger, "RECONCILE_FLOOR", 10)
    fetcher, child = make_broker(), make_broker()
    fetcher.publish([Outgoing(QUEUE, task_envelope(f"t{n}")) for n in range(30)])
    fetched = fetcher.fetch([QUEUE], 30, timeout=1)
    child.ack(fetched[:25])

    # When it fetches again
    assert fetcher.fetch([QUEUE], 10, timeout=0) == []

    # Then it forgot the 25 settled elsewhere and still holds the 5 others, leased, not requeued
    assert len(fetcher._ledger) == 5
    assert sorted(raw.lrange(inflight(fetcher), 0, -1)) == sorted(d.payload for d in fetched[25:])
    assert raw.llen(QUEUE) == 0


def drain_while_doubting(broker: RedisBroker, queues: list[str], threads: int) -> list[bytes]:
    """Drain `queues` on `threads` threads sharing `broker`; return every payload delivered.

    Each thread fetches two at a time and acks, while another thread tells the broker's ledger
    every millisecond that a fetch failed, so it reads its in-flight lists whenever no fetch runs.
    """
    seen: list[list[bytes]] = [[] for _ in range(threads)]
    done = threading.Event()

    def drain(mine: list[bytes]) -> None:
        while batch := broker.fetch(queues, 2, timeout=0.05):
            mine.extend(d.payload for d in batch)
            broker.ack(batch)

    def keep_doubting() -> None:
        while not done.wait(0.001):
            broker._ledger.fetch_failed()

    doubter = threading.Thread(target=keep_doubting)
    doubter.start()
    drainers = [threading.Thread(target=drain, args=(mine,)) for mine in seen]
    for drainer in drainers:
        drainer.start()
    for drainer in drainers:
        drainer.join(30)
    done.set()
    doubter.join(5)
    return [payload for mine in seen for payload in mine]


def test_reading_the_inflight_list_after_failures_never_takes_what_a_running_fetch_leased(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer told every millisecond that a fetch failed, so it reads its in-flight list
    # before fetching whenever no other fetch of it runs, and 2,000 waiting plain payloads (which a
    # wrongly taken-back payload would turn into a dead letter: their queue is unknown)
    broker = make_broker()
    broker.publish([Outgoing(QUEUE, str(n).encode()) for n in range(2000)])

    # When eight threads drain the queue through it, fetching and acking while it reads the list
    delivered = drain_while_doubting(broker, [QUEUE], threads=8)

    # Then nothing a fetch had leased was taken back: each message was delivered once, none set aside
    assert sorted(int(p) for p in delivered) == list(range(2000))
    assert broker.dead_letters() == []
    assert (raw.llen(QUEUE), raw.llen(inflight(broker))) == (0, 0)


# ack, release, dead letters across processes --------------------------------------------------


def test_a_message_acked_by_another_broker_object_leaves_the_fetchers_inflight_list(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased two messages
    fetcher = make_broker()
    fetcher.publish([Outgoing(QUEUE, b"acked"), Outgoing(QUEUE, b"released")])
    acked, released = fetcher.fetch([QUEUE], 2, timeout=1)

    # When another broker object (a pool child, with its own consumer id) acks one and releases the other
    child = make_broker()
    assert child.consumer_id != fetcher.consumer_id
    child.ack([acked])
    child.release([released])

    # Then the fetcher holds neither, and the released one waits in its queue again
    assert raw.llen(inflight(fetcher)) == 0
    assert raw.lrange(QUEUE, 0, -1) == [b"released"]


def test_single_acks_leave_the_count_of_handed_out_payloads_by_the_next_fetch(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased three messages and acked two of them one by one
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(3)])
    first, second, third = broker.fetch([QUEUE], 3, timeout=1)
    broker.ack([first])
    broker.ack([second])

    # When it fetches again
    assert broker.fetch([QUEUE], 1, timeout=0) == []

    # Then only the third still counts as handed out, and only it is in flight
    assert len(broker._ledger) == 1
    assert raw.lrange(inflight(broker), 0, -1) == [third.payload]


def test_single_acks_without_a_fetch_between_them_still_leave_the_count_in_batches(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer that takes acks off its count in batches of three, holding five messages
    monkeypatch.setattr(redis_ledger, "MOST_SETTLED_LATER", 3)
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(5)])
    held = broker.fetch([QUEUE], 5, timeout=1)

    # When it acks three of them one by one and fetches nothing
    for delivery in held[:3]:
        broker.ack([delivery])

    # Then the three left the count without waiting for a fetch
    assert len(broker._ledger) == 2


def test_an_ack_written_while_the_inflight_list_is_read_does_not_send_its_message_back(
    broker: RedisBroker, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer holding one message, due to read its in-flight list (as after a failed
    # fetch), whose task thread acks the message just after the reading confirmed the acks
    broker.publish_one(QUEUE, task_envelope("held"))
    [held] = broker.fetch([QUEUE], 1, timeout=1)
    broker._ledger.fetch_failed()
    confirm = broker._acks.confirm

    def confirm_then_ack() -> None:
        confirm()
        if held_ack:
            broker.ack([held_ack.pop()])  # written, corked: it runs only at the next confirmation

    held_ack = [held]
    monkeypatch.setattr(broker._acks, "confirm", confirm_then_ack)

    # When the next fetch reads the list, which still holds the message
    assert broker.fetch([QUEUE], 1, timeout=0) == []

    # Then the message was not taken for one nobody received: it is neither back in the queue
    # nor set aside, and once the ack runs it is gone
    assert raw.llen(QUEUE) == raw.llen("celeriac.dead") == 0
    confirm()
    assert raw.llen(inflight(broker)) == 0


def test_an_ack_whose_socket_broke_under_it_goes_out_on_a_fresh_connection_with_the_earlier_ones(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased two messages, acked the first, and whose ack socket then broke
    broker.publish([Outgoing(QUEUE, b"first"), Outgoing(QUEUE, b"second")])
    first, second = broker.fetch([QUEUE], 2, timeout=1)
    broker.ack([first])
    broker._acks._connection._sock.close()

    # When it acks the second and confirms
    broker.ack([second])
    broker._acks.confirm()

    # Then both acks ran
    assert raw.llen(inflight(broker)) == 0


def test_an_ack_lost_with_its_connection_is_sent_again_before_the_next_fetch(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased two messages, and Redis holding back every write
    name = f"celeriac-test-{time.monotonic_ns()}"
    broker = make_broker(client_name=name)
    broker.publish([Outgoing(QUEUE, b"first"), Outgoing(QUEUE, b"second")])
    first, second = broker.fetch([QUEUE], 2, timeout=1)
    raw.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        # When the first ack is written and every connection of the consumer dies before
        # Redis runs it
        broker.ack([first])
        for client in raw.client_list():
            if client.get("name") == name:
                raw.execute_command("CLIENT", "KILL", "ID", client["id"])
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
    assert raw.llen(inflight(broker)) == 2  # the first ack never ran

    # Then the next fetch that may wait, which first confirms the acks written, finds the loss
    # and sends both acks again (the second went into the dead connection too)
    broker.ack([second])
    assert broker.fetch([QUEUE], 1, timeout=0.1) == []
    assert raw.llen(inflight(broker)) == 0


def test_a_consumer_that_never_waits_still_has_its_acks_confirmed_in_batches(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased more messages than one batch of unconfirmed acks holds
    batch = redis_deferred.MOST_PENDING
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(batch + 2)])
    leased = broker.fetch([QUEUE], batch + 2, timeout=1)

    # When it acks them one by one without fetching again
    for delivery in leased[: batch + 1]:
        broker.ack([delivery])

    # Then the ack past a full batch waited until the batch had run: no wait on a timer
    assert raw.llen(inflight(broker)) <= 2


def test_a_busy_fetch_carries_the_acks_written_before_it_and_returns_once_they_ran(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that leased two messages and acked the first, as a busy worker does
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(3)])
    first, second = broker.fetch([QUEUE], 2, timeout=1)
    broker.ack([first])

    # When it fetches again without waiting
    [third] = broker.fetch([QUEUE], 1, timeout=0)

    # Then the ack has run by the time the fetch returns: no confirmation of its own, no timer
    assert raw.lrange(inflight(broker), 0, -1) == [third.payload, second.payload]


def lmoves(raw: redis.Redis) -> int:
    """How many LMOVEs the server has run (Redis counts them per command, not per database)."""
    stats = raw.info("commandstats").get("cmdstat_lmove")
    return int(stats["calls"]) if stats else 0


def script_calls(raw: redis.Redis) -> int:
    """How many EVALSHAs the server has run (counted per command, not per database)."""
    stats = raw.info("commandstats").get("cmdstat_evalsha")
    return int(stats["calls"]) if stats else 0


def test_busy_fetches_from_a_deep_queue_move_messages_one_by_one_in_order(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that renews on every busy fetch, a deep queue, a message parked until
    # it is due and one less urgent message
    broker.renew_every = 0.0
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(10)])
    broker.publish([Outgoing(QUEUE, task_envelope("later", priority=5), priority=5)])
    parked = task_envelope("parked")
    raw.zadd("celeriac.delayed.celery", {parked: time.time() - 1})

    # When a consumer fetches three, then keeps fetching three at a time without waiting
    first = broker.fetch([QUEUE], 3, timeout=1)
    lease = raw.zscore("celeriac.consumers", broker.consumer_id)
    before = lmoves(raw)
    second = broker.fetch([QUEUE], 3, timeout=0)
    third = broker.fetch([QUEUE], 3, timeout=0)

    # Then the busy fetches took their messages with LMOVE, oldest first, into the in-flight list
    assert lmoves(raw) - before == 6
    assert [d.payload for d in first + second + third] == [b"m%d" % index for index in range(9)]
    assert raw.lrange(inflight(broker), 0, -1) == [d.payload for d in reversed(first + second + third)]
    # And they renewed the lease and moved the due message behind the others, as the script does
    assert raw.zscore("celeriac.consumers", broker.consumer_id) > lease
    assert raw.zcard("celeriac.delayed.celery") == 0
    rest = broker.fetch([QUEUE], 10, timeout=0)
    assert [d.payload for d in rest] == [b"m9", parked]
    # And the less urgent message came only once the most urgent list was empty
    [last] = broker.fetch([QUEUE], 10, timeout=0)
    assert json.loads(last.payload)["headers"]["id"] == "later"
    assert raw.llen(QUEUE) == raw.llen("celery\x06\x163") == 0


def test_a_busy_fetch_after_the_server_lost_its_scripts_still_leases_and_loads_them_again(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer whose last fetch emptied nothing, and a server that then lost its scripts
    broker.renew_every = 0.0  # each busy fetch runs the script
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(6)])
    first = broker.fetch([QUEUE], 2, timeout=1)
    raw.script_flush()

    # When it fetches again without waiting, twice
    second = broker.fetch([QUEUE], 2, timeout=0)
    third = broker.fetch([QUEUE], 2, timeout=0)

    # Then every message was leased once, in order, and the script is known again
    assert [d.payload for d in first + second + third] == [b"m%d" % index for index in range(6)]
    assert sorted(raw.lrange(inflight(broker), 0, -1)) == [b"m%d" % index for index in range(6)]
    assert raw.script_exists(broker._script().fetch.sha) == [True]


def test_busy_fetches_renew_the_lease_once_per_interval_not_once_per_fetch(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a deep queue, a consumer that renews hourly and whose first fetch renewed its
    # lease, and a message parked until it is due
    broker.renew_every = 3600.0
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(12)])
    first = broker.fetch([QUEUE], 3, timeout=1)
    parked = task_envelope("parked")
    raw.zadd("celeriac.delayed.celery", {parked: time.time() - 1})

    # When it fetches twice more without waiting, inside its renewal interval
    calls = script_calls(raw)
    second = broker.fetch([QUEUE], 3, timeout=0)
    third = broker.fetch([QUEUE], 3, timeout=0)

    # Then those fetches only moved messages: no script ran, and the parked message waits
    assert script_calls(raw) == calls
    assert [d.payload for d in first + second + third] == [b"m%d" % index for index in range(9)]
    assert raw.zcard("celeriac.delayed.celery") == 1

    # And once the interval has passed, the next busy fetch renews and moves the due message
    lease = raw.zscore("celeriac.consumers", broker.consumer_id)
    broker.renew_every = 0.0
    fourth = broker.fetch([QUEUE], 3, timeout=0)
    assert script_calls(raw) == calls + 1
    assert [d.payload for d in fourth] == [b"m9", b"m10", b"m11"]
    assert raw.zscore("celeriac.consumers", broker.consumer_id) > lease
    assert raw.lrange(QUEUE, 0, -1) == [parked]


def test_a_busy_fetch_under_a_newly_assigned_consumer_id_registers_its_lease_first(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a consumer that renews hourly, whose first fetch from a deep queue renewed its lease
    broker.renew_every = 3600.0
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(6)])
    broker.fetch([QUEUE], 2, timeout=1)

    # When it is given another consumer id (as a prefork child is) and fetches without waiting
    broker.consumer_id = "assigned-id"
    [third, fourth] = broker.fetch([QUEUE], 2, timeout=0)

    # Then the new id holds a lease before its in-flight list holds anything, so a heartbeat
    # that outlives this process would find and return those messages
    assert raw.zscore("celeriac.consumers", "assigned-id") is not None
    assert raw.lrange("celeriac.inflight.assigned-id", 0, -1) == [fourth.payload, third.payload]


def test_a_busy_fetch_whose_moves_are_all_refused_raises_and_leaves_the_queue_as_it_was(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a deep queue, a first fetch that emptied nothing, and its in-flight key then made a string
    broker.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(6)])
    first = broker.fetch([QUEUE], 2, timeout=1)
    broker.ack(first)
    raw.delete(inflight(broker))
    raw.set(inflight(broker), "not a list")

    # When it fetches again without waiting, then Redis refuses every LMOVE
    # Then the refusal is raised, and the queue still holds the rest in order
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        broker.fetch([QUEUE], 2, timeout=0)
    assert raw.lrange(QUEUE, 0, -1) == [b"m%d" % index for index in reversed(range(2, 6))]


def test_commands_called_together_each_get_their_reply_and_a_refusal_stops_none(
    url: str, raw: redis.Redis
) -> None:
    # Given a process's deferred connection with a command written and not yet confirmed
    client = redis.Redis.from_url(url)
    commands = redis_deferred.DeferredCommands()
    commands.send(client, packed(("RPUSH", "written", "w")))

    # When three commands go together, the middle one refused, then one more alone
    replies = commands.call_many(
        client,
        packed(("SET", "plain", "1")) + packed(("LPUSH", "plain", "x")) + packed(("GET", "plain")),
        3,
    )
    with pytest.raises(redis.exceptions.NoScriptError):
        commands.call(client, packed(("EVALSHA", "0" * 40, 0)))

    # Then each got its own reply, the refusal as redis-py's error, and the earlier write ran
    assert replies[0] == b"OK" and replies[2] == b"1"
    assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
    assert raw.lrange("written", 0, -1) == [b"w"]
    # And the connection is still good for the next call
    assert commands.call(client, packed(("GET", "plain"))) == b"1"
    commands.close()
    client.close()


def _ack_one_and_die(broker: RedisBroker) -> None:
    broker.reset_after_fork()
    first, _ = broker.fetch([QUEUE], 2, timeout=5)
    broker.ack([first])
    os.kill(os.getpid(), signal.SIGKILL)  # no confirmation, no close: the ack is only written


def test_an_ack_written_just_before_its_process_is_killed_still_runs(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given two queued messages
    broker.publish([Outgoing(QUEUE, b"first"), Outgoing(QUEUE, b"second")])

    # When a process leases both, acks the first and is killed at once
    context: Any = multiprocessing.get_context("fork")
    child = context.Process(target=_ack_one_and_die, args=(broker,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL

    # Then the ack still ran: only the second message is in flight with the dead consumer
    [key] = raw.keys("celeriac.inflight.*")
    eventually(lambda: raw.lrange(key, 0, -1) == [b"second"])


def test_threads_that_publish_and_end_leave_no_connections_behind(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a broker whose connections carry a name of their own
    name = f"celeriac-test-{time.monotonic_ns()}"
    broker = make_broker(client_name=name)

    # When thirty short-lived threads publish one message each, one after another
    for index in range(30):
        thread = threading.Thread(target=broker.publish_one, args=(QUEUE, b"m%d" % index))
        thread.start()
        thread.join()

    # Then every message arrived over a connection that was handed on, not one kept per thread
    assert raw.llen(QUEUE) == 30
    named = [client for client in raw.client_list() if client.get("name") == name]
    assert 1 <= len(named) <= 2


def _ack_in_forked_child(broker: RedisBroker, delivery: Delivery, parent_id: str) -> None:
    broker.reset_after_fork()  # what the prefork pool does first in every child
    broker.ack([delivery])
    raise SystemExit(0 if broker.consumer_id != parent_id else 1)


def test_a_forked_child_acks_its_parents_delivery_on_its_own_connection(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a parent that leased a message (so it holds open connections)
    broker.publish_one(QUEUE, b"job")
    [delivery] = broker.fetch([QUEUE], 1, timeout=1)

    # When a forked child resets the inherited broker and acks the message
    context: Any = multiprocessing.get_context("fork")
    child = context.Process(target=_ack_in_forked_child, args=(broker, delivery, broker.consumer_id))
    child.start()
    child.join(30)

    # Then the child took its own consumer id, the message is gone, and the parent still works
    assert child.exitcode == 0
    assert raw.llen(inflight(broker)) == 0
    broker.publish_one(QUEUE, b"next")
    assert [d.payload for d in broker.fetch([QUEUE], 1, timeout=1)] == [b"next"]


def test_release_without_an_eta_puts_messages_back_to_be_consumed_next_in_order(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given two leased messages and a newer one waiting
    broker.publish([Outgoing(QUEUE, task_envelope("a")), Outgoing(QUEUE, task_envelope("b"))])
    leased = broker.fetch([QUEUE], 2, timeout=1)
    broker.publish_one(QUEUE, task_envelope("newer"))

    # When both are released (as a worker does with prefetched messages at shutdown)
    broker.release(leased)

    # Then they come before the newer one, in their original order, as redeliveries
    fetched = broker.fetch([QUEUE], 3, timeout=1)
    assert [unpack(d.payload).headers["id"] for d in fetched] == ["a", "b", "newer"]
    assert [d.attempts for d in fetched] == [2, 2, 1]


KOMBU_STYLE = {  # json.dumps' default spacing, as kombu writes it, and strings that look like JSON
    "body": "W1tdLCB7fSwge31d",
    "headers": {
        "argsrepr": '("headers": {"redelivered": 1}, \\"q\\")',
        "nested": {"headers": {}, "redelivered": False, "list": [[], {}, [1, [2]]]},
        "redelivered": False,
        "uni": "h\u00e9 \u2603 \\u00e9",
    },
    "properties": {"delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0},
}


@pytest.mark.parametrize(
    ("document", "attempts"),
    [
        (KOMBU_STYLE, 2),
        ({"body": "", "headers": None, "properties": {"delivery_info": None}}, 2),
        ({"body": ""}, 2),
        ({"body": "", "headers": {"x-celeriac-redeliveries": 4}, "properties": {}}, 6),
    ],
    ids=["kombu-spacing-and-tricky-strings", "nulls", "bare", "counted-before"],
)
def test_a_released_envelope_is_marked_redelivered_whatever_its_layout(
    broker: RedisBroker, document: dict[str, Any], attempts: int
) -> None:
    # Given an envelope written with json.dumps (spaces after separators), fetched
    broker.publish_one(QUEUE, json.dumps(document).encode())
    broker.release(broker.fetch([QUEUE], 1, timeout=1))

    # When it is fetched again
    [again] = broker.fetch([QUEUE], 1, timeout=1)

    # Then it is the same document plus the redelivery marks, counted one more time
    marked = orjson.loads(again.payload)
    expected = json.loads(json.dumps(document))
    expected["headers"] = {**(expected.get("headers") or {}), "redelivered": True}
    expected["headers"]["x-celeriac-redeliveries"] = attempts - 1
    properties = expected.setdefault("properties", {})
    properties["delivery_info"] = {**(properties.get("delivery_info") or {}), "redelivered": True}
    assert (marked, again.attempts) == (expected, attempts)


def test_a_released_payload_that_is_not_a_json_object_comes_back_unchanged(broker: RedisBroker) -> None:
    # Given a fetched payload that is JSON but not an object, when it is released and fetched again
    broker.publish_one(QUEUE, b"[1, 2]")
    broker.release(broker.fetch([QUEUE], 1, timeout=1))
    [again] = broker.fetch([QUEUE], 1, timeout=1)

    # Then it is unchanged: there is nowhere to count its attempts
    assert (again.payload, again.attempts) == (b"[1, 2]", 1)


def test_release_with_an_eta_parks_the_message_until_it_is_due(broker: RedisBroker, raw: redis.Redis) -> None:
    # Given a leased message
    broker.publish_one(QUEUE, task_envelope("later"))
    [delivery] = broker.fetch([QUEUE], 1, timeout=1)

    # When it is released until shortly from now
    eta = time.time() + 0.5
    broker.release([delivery], eta=eta)

    # Then it waits, unchanged, in the queue's delayed set, and no fetch gets it before its eta
    assert raw.zscore("celeriac.delayed.celery", delivery.payload) == pytest.approx(eta)
    assert (raw.llen(inflight(broker)), raw.llen(QUEUE)) == (0, 0)
    assert (broker.size(QUEUE), broker.scheduled(QUEUE)) == (1, 1)
    assert broker.fetch([QUEUE], 1, timeout=0) == []

    # And once due, a waiting fetch gets it, as a first delivery (parking is not an attempt)
    [due] = broker.fetch([QUEUE], 1, timeout=5)
    assert time.time() >= eta
    assert (due.payload, due.attempts) == (delivery.payload, 1)
    assert raw.exists("celeriac.delayed.celery") == 0


def test_due_delayed_messages_are_moved_once_even_with_two_consumers_fetching_at_once(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given 300 messages parked until the same moment (more than one fetch moves at a time)
    parker = make_broker()
    parker.publish([Outgoing(QUEUE, str(n).encode()) for n in range(300)])
    parker.release(parker.fetch([QUEUE], 300, timeout=1), eta=time.time() + 0.3)
    assert parker.scheduled(QUEUE) == 300

    # When two consumers in two threads fetch and ack until everything has come through
    seen: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + 10

    def drain(consumer: RedisBroker, mine: list[bytes]) -> None:
        while sum(map(len, seen)) < 300 and time.monotonic() < deadline:
            batch = consumer.fetch([QUEUE], 7, timeout=0.2)
            mine.extend(d.payload for d in batch)
            consumer.ack(batch)

    threads = [threading.Thread(target=drain, args=(make_broker(), mine)) for mine in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)

    # Then each message was delivered exactly once and nothing is left anywhere
    assert sorted(int(p) for mine in seen for p in mine) == list(range(300))
    assert raw.exists("celeriac.delayed.celery", QUEUE) == 0


def test_dead_letter_moves_the_message_from_inflight_to_the_dead_list(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a leased task message and a leased payload that is not UTF-8
    broker.publish([Outgoing(QUEUE, task_envelope("poison")), Outgoing(QUEUE, b"\xff\xfe")])
    poison, binary = broker.fetch([QUEUE], 2, timeout=1)

    # When both are dead-lettered
    broker.dead_letter(poison, "NotRegistered: proj.add")
    broker.dead_letter(binary, "undecodable")

    # Then they left the in-flight list for celeriac.dead, the envelope kept as JSON text
    assert raw.llen(inflight(broker)) == 0
    oldest = orjson.loads(raw.lrange("celeriac.dead", -1, -1)[0])
    assert (oldest["queue"], oldest["reason"]) == (QUEUE, "NotRegistered: proj.add")
    assert oldest["payload"] == poison.payload.decode()

    # And both read back, oldest first, bytes intact; dead-lettering twice changes nothing
    broker.dead_letter(poison, "again")
    letters = broker.dead_letters(QUEUE)
    assert [(d.payload, d.reason) for d in letters] == [
        (poison.payload, "NotRegistered: proj.add"),
        (b"\xff\xfe", "undecodable"),
    ]


# administration --------------------------------------------------------------------------------


def test_purge_deletes_every_list_and_the_delayed_set_but_not_leased_messages(
    broker: RedisBroker, raw: redis.Redis
) -> None:
    # Given a message on each priority list, one parked with an eta and one leased
    broker.publish([Outgoing(QUEUE, b"leased")])
    [leased] = broker.fetch([QUEUE], 1, timeout=1)
    broker.publish([Outgoing(QUEUE, f"p{p}".encode(), priority=p) for p in (0, 3, 6, 9, 4)])
    [parked] = broker.fetch([QUEUE], 1, timeout=1)
    broker.release([parked], eta=time.time() + 60)

    # When the queue is purged
    purged = broker.purge(QUEUE)

    # Then the five waiting ones are gone with their keys; the leased one stays in flight
    assert purged == 5
    assert raw.keys("celery*") == []
    assert raw.exists("celeriac.delayed.celery") == 0
    assert raw.lrange(inflight(broker), 0, -1) == [leased.payload]
    assert broker.size(QUEUE) == 0


def test_a_waiting_fetch_wakes_promptly_when_a_message_is_pushed_from_another_connection(
    make_broker: MakeBroker, raw: redis.Redis
) -> None:
    # Given a consumer blocked in a fetch with a long timeout on two queues
    consumer = make_broker()
    returned: list[tuple[float, list[Delivery]]] = []

    def wait() -> None:
        found = consumer.fetch(["other", QUEUE], 1, timeout=10)
        returned.append((time.monotonic(), found))

    waiter = threading.Thread(target=wait)
    waiter.start()
    eventually(lambda: any(client.get("cmd") == "blmove" for client in raw.client_list()))

    # When a Celery-style producer LPUSHes onto the second queue
    pushed = time.monotonic()
    raw.lpush(QUEUE, b"wake up")
    waiter.join(15)

    # Then the fetch returns the message far sooner than its timeout
    [(done, found)] = returned
    assert [d.payload for d in found] == [b"wake up"]
    assert done - pushed < 1.0


def test_an_unreachable_redis_raises_operational_error_without_the_password() -> None:
    # Given a broker on a port where nothing listens, with a password in its URL
    broker = RedisBroker("redis://:s3cret@127.0.0.1:1/0")

    # When it is used, then it raises OperationalError naming the address but not the password
    for use in (lambda: broker.publish_one(QUEUE, b"x"), lambda: broker.fetch([QUEUE], 1, timeout=0)):
        with pytest.raises(OperationalError) as failure:
            use()
        assert "127.0.0.1:1" in str(failure.value)
        assert "s3cret" not in str(failure.value)
        assert isinstance(failure.value.__cause__, redis.ConnectionError)


@pytest.mark.parametrize(
    ("url", "options", "complaint"),
    [
        ("sentinel://127.0.0.1:26379", {}, "master_name"),
        ("sentinel://127.0.0.1:26379;redis://x:1", {"master_name": "m"}, "sentinel://host:port"),
        ("redis://127.0.0.1:99999/0", {}, "Unusable Redis broker URL"),
        ("redis://127.0.0.1:6379/0", {"global_keyprefix": "app:"}, "global_keyprefix"),
        ("redis://127.0.0.1:6379/0", {"priority_steps": [0, 5]}, "priority_steps"),
    ],
)
def test_an_unusable_redis_url_is_refused_when_the_broker_is_made(
    url: str, options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=complaint):
        RedisBroker(url, options)


def test_sentinel_urls_list_every_sentinel() -> None:
    # Given kombu's form for several Sentinels, when it is read, then each host and port is found
    assert sentinel_hosts("sentinel://:pw@a:26380/9;sentinel://b;sentinel://c:1") == [
        ("a", 26380),
        ("b", 26379),
        ("c", 1),
    ]


# other ways to reach Redis ---------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A throwaway redis-server on its own TCP port and unix socket, and a Sentinel watching it."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed: cannot start a private Redis and Sentinel")
    port, sentinel_port, sock = free_port(), free_port(), tmp_path / "redis.sock"
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {sentinel_port}\nsentinel monitor mymaster 127.0.0.1 {port} 1\n")
    processes = [
        subprocess.Popen(
            [server, "--port", str(port), "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen([server, str(config), "--sentinel"], stdout=subprocess.DEVNULL),
    ]
    try:
        for ready in (port, sentinel_port):
            eventually(lambda ready=ready: redis_answers(ready))  # type: ignore[misc]
        yield sentinel_port, sock
    finally:
        for process in processes:
            process.kill()
            process.wait(30)


def test_a_broker_reaches_redis_through_a_unix_socket_and_through_sentinel(
    private_redis: tuple[int, Path],
) -> None:
    # Given a Redis reachable by a unix socket, and a Sentinel that knows it as "mymaster"
    sentinel_port, sock = private_redis
    by_socket = RedisBroker(f"redis+socket://{sock}")
    by_sentinel = RedisBroker(f"sentinel://127.0.0.1:{sentinel_port}", {"master_name": "mymaster"})
    try:
        # When one publishes and the other fetches
        by_socket.publish_one(QUEUE, b"found you")
        fetched = by_sentinel.fetch([QUEUE], 1, timeout=1)

        # Then both reached the same Redis
        assert [d.payload for d in fetched] == [b"found you"]
        # and an ack through the socket (not corked there, but still without replies) runs
        by_socket.ack(fetched)
        assert by_socket.fetch([QUEUE], 1, timeout=0.1) == []  # confirms the ack first
        raw = redis.Redis(unix_socket_path=str(sock))
        assert raw.llen(inflight(by_sentinel)) == 0
        # and busy fetches through the socket (LMOVE, read without redis-py) take the rest in order
        by_socket.publish([Outgoing(QUEUE, b"m%d" % index) for index in range(4)])
        taken = by_socket.fetch([QUEUE], 2, timeout=1) + by_socket.fetch([QUEUE], 2, timeout=0)
        assert [d.payload for d in taken] == [b"m0", b"m1", b"m2", b"m3"]
        assert raw.llen(inflight(by_socket)) == 4
        raw.close()
        assert by_sentinel.size(QUEUE) == 0
    finally:
        by_socket.close()
        by_sentinel.close()


@pytest.fixture
def redis_without_client_command(tmp_path: Path) -> Iterator[int]:
    """A throwaway redis-server whose CLIENT command is renamed away, as some managed services do."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed: cannot start a private Redis")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no", "--rename-command", "CLIENT", ""],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        eventually(lambda: redis_answers(port))
        yield port
    finally:
        process.kill()
        process.wait(30)


def test_acks_run_on_a_server_that_refuses_client_reply(redis_without_client_command: int) -> None:
    # Given a server without CLIENT (so no CLIENT REPLY OFF) and a consumer that leased three messages
    port = redis_without_client_command
    broker = RedisBroker(f"redis://127.0.0.1:{port}/0")
    raw = redis.Redis(port=port)
    try:
        broker.publish([Outgoing(QUEUE, b"a"), Outgoing(QUEUE, b"b"), Outgoing(QUEUE, b"c")])
        leased = broker.fetch([QUEUE], 3, timeout=1)

        # When each is acked on its own, as a worker does before each task, and it fetches
        # again at once, as a busy worker does, then once more, ready to wait
        for delivery in leased:
            broker.ack([delivery])
        assert broker.fetch([QUEUE], 1, timeout=0) == []
        assert broker.fetch([QUEUE], 1, timeout=0.1) == []

        # Then every ack ran (their replies read, not left to pile up) and the broker still works
        assert raw.llen(inflight(broker)) == 0
        broker.publish_one(QUEUE, b"d")
        assert [d.payload for d in broker.fetch([QUEUE], 1, timeout=1)] == [b"d"]
    finally:
        broker.close()
        raw.close()
