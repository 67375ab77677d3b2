"""The contract every broker keeps, run against each one.

Brokers are built through the registry from their URL, as the app builds them. Two
broker objects on the same URL stand for two consumers (two workers) of one broker.
"redis-cluster" runs them on a private Redis Cluster (tests/redis_cluster.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from celeriac.brokers.base import Broker, Delivery, Outgoing
from celeriac.brokers.memory import MemoryBroker
from celeriac.brokers.redis import RedisBroker
from celeriac.brokers.redis_cluster import RedisClusterBroker
from celeriac.brokers.registry import DEFAULT_BROKER_URL, broker_class_for, create_broker
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol.message import Envelope, pack, unpack
from tests.conftest import closing_factory, require_service

pytest_plugins = ("tests.redis_cluster",)

MakeBroker = Callable[..., Broker]
T = TypeVar("T")

GENEROUS_TIMEOUT = 10.0
SHORT_LEASE = 0.5
QUEUE = "celery"
REDIS_TEST_URL = "redis://127.0.0.1:6379/9"


# fixtures and helpers ----------------------------------------------------------------


def _sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'broker.db'}"


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """Lend one test the test Redis database, emptied; skip (fail in CI) if Redis is down.

    Test runs on one machine share that database, so each test holds a file lock while it
    uses it: a concurrent run waits instead of flushing the database under this one.
    """
    with open(Path(tempfile.gettempdir()) / "celeriac-test-redis-db9.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _empty_test_database()
            yield REDIS_TEST_URL
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _empty_test_database() -> None:
    require_service("Redis (REDIS BROKER TESTS NOT RUN)", "127.0.0.1", 6379)
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        with redis_database() as url:
            yield url
    elif request.param == "redis-cluster":
        yield request.getfixturevalue("cluster_url")
    elif request.param == "memory":
        # A fresh memory store per test: brokers share a store only through its name.
        yield f"memory://contract-{uuid.uuid4().hex}"
    else:
        yield _sqlite_url(tmp_path)


@pytest.fixture
def make_broker(broker_url: str) -> Iterator[MakeBroker]:
    yield from closing_factory(lambda **options: create_broker(broker_url, options))


@pytest.fixture
def broker(make_broker: MakeBroker) -> Broker:
    return make_broker()


def go_silent(consumer: Broker) -> None:
    """Make `consumer` behave like a SIGKILLed worker: no more heartbeats, no more calls."""
    if isinstance(consumer, MemoryBroker):
        # In one process a consumer cannot die on its own; say so explicitly.
        consumer.mark_dead(consumer.consumer_id)
    else:
        consumer.close()


def scheduled(broker: Broker) -> int:
    assert isinstance(broker, MemoryBroker | SQLiteBroker | RedisBroker)
    return broker.scheduled(QUEUE)


def on_redis(broker: Broker) -> bool:
    """Redis follows Celery's Redis transport where the other brokers follow AMQP."""
    return isinstance(broker, RedisBroker)


def publish_delayed(broker: Broker, payload: bytes, eta: float) -> None:
    """Get `payload` waiting in the broker until `eta`, the way a worker does on this broker.

    Redis, like Celery, puts a message with an eta straight on its queue (the eta is in its
    headers) and the worker parks it with `release(eta=...)`; the others hold it from publish.
    """
    if on_redis(broker):
        broker.publish_one(QUEUE, payload)
        broker.release(broker.fetch([QUEUE], 1, timeout=1), eta=eta)
    else:
        broker.publish_one(QUEUE, payload, eta=eta)


def envelope(text: str) -> bytes:
    """A kombu envelope whose body is `text`: Redis keeps a redelivery count only in envelopes."""
    return pack(Envelope(text.encode(), "text/plain", "utf-8", {}, {}), routing_key=QUEUE)


def text_of(delivery: Delivery) -> str:
    return unpack(delivery.payload).body.decode()


def eventually(probe: Callable[[], T], timeout: float = GENEROUS_TIMEOUT) -> T:
    """Call `probe` until it returns something truthy, failing the test if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {timeout} s")
        time.sleep(0.01)


def payloads(deliveries: list[Delivery]) -> list[bytes]:
    return [delivery.payload for delivery in deliveries]


# producing and fetching ---------------------------------------------------------------


def test_a_published_message_comes_back_from_fetch_with_its_queue_and_payload(broker: Broker) -> None:
    # Given a message published to a queue
    broker.publish_one(QUEUE, b"\x00payload\xff")

    # When a consumer fetches from that queue
    [delivery] = broker.fetch([QUEUE], 10, timeout=1)

    # Then it gets that message, on its first attempt
    assert (delivery.queue, delivery.payload, delivery.attempts) == (QUEUE, b"\x00payload\xff", 1)
    assert not delivery.redelivered


def test_more_urgent_messages_are_fetched_first(broker: Broker) -> None:
    # Given messages of mixed priorities, including ones outside 0-9
    for priority in (0, 5, 9, 1, 42, -3):
        broker.publish_one(QUEUE, str(priority).encode(), priority=priority)

    # When they are fetched in one batch
    fetched = broker.fetch([QUEUE], 10, timeout=1)

    # Then the most urgent come first, out-of-range priorities clamped to 9 and 0; on Redis,
    # as in Celery, 0 is the most urgent and priorities share lists in steps 0-2, 3-5, 6-8, 9
    if on_redis(broker):
        assert payloads(fetched) == [b"0", b"1", b"-3", b"5", b"9", b"42"]
    else:
        assert payloads(fetched) == [b"9", b"42", b"5", b"1", b"0", b"-3"]


def test_messages_of_equal_priority_come_out_oldest_first(broker: Broker) -> None:
    # Given many messages of one priority, published in order
    broker.publish([Outgoing(QUEUE, str(n).encode(), priority=3) for n in range(50)])

    # When they are fetched a few at a time
    fetched = [d for _ in range(10) for d in broker.fetch([QUEUE], 5, timeout=1)]

    # Then they come out in publish order
    assert payloads(fetched) == [str(n).encode() for n in range(50)]


def test_fetch_from_several_queues_orders_by_priority_across_them(broker: Broker) -> None:
    # Given messages in two queues and one in a queue nobody asks for
    broker.publish(
        [
            Outgoing("a", b"a-low", priority=1),
            Outgoing("b", b"b-high", priority=8),
            Outgoing("a", b"a-high", priority=8),
            Outgoing("other", b"ignored", priority=9),
        ]
    )

    # When a consumer fetches from both queues
    fetched = broker.fetch(["a", "b"], 10, timeout=1)

    # Then it gets every message of those queues, most urgent then oldest first; on Redis (0 most
    # urgent) every queue's step is drained in the order the queues were asked for, as kombu does
    if on_redis(broker):
        assert [(d.queue, d.payload) for d in fetched] == [
            ("a", b"a-low"),
            ("a", b"a-high"),
            ("b", b"b-high"),
        ]
    else:
        assert [(d.queue, d.payload) for d in fetched] == [
            ("b", b"b-high"),
            ("a", b"a-high"),
            ("a", b"a-low"),
        ]


def test_fetch_returns_at_most_limit_messages(broker: Broker) -> None:
    # Given five waiting messages
    broker.publish([Outgoing(QUEUE, bytes([n])) for n in range(5)])

    # When a consumer fetches with a limit of two
    fetched = broker.fetch([QUEUE], 2, timeout=1)

    # Then it gets two, and three still wait
    assert len(fetched) == 2
    assert broker.size(QUEUE) == 3


def test_fetch_from_an_empty_queue_returns_nothing_after_its_timeout(broker: Broker) -> None:
    # Given an empty queue
    started = time.monotonic()

    # When a consumer fetches with a short timeout
    fetched = broker.fetch([QUEUE], 10, timeout=0.1)

    # Then it gets nothing, having waited about that long
    assert fetched == []
    assert 0.1 <= time.monotonic() - started < GENEROUS_TIMEOUT


def test_a_waiting_fetch_returns_once_a_message_is_published(make_broker: MakeBroker) -> None:
    # Given a consumer waiting on an empty queue
    consumer, producer = make_broker(), make_broker()
    fetched: list[Delivery] = []
    waiter = threading.Thread(target=lambda: fetched.extend(consumer.fetch([QUEUE], 1, GENEROUS_TIMEOUT)))
    waiter.start()

    # When another broker object publishes to it
    producer.publish_one(QUEUE, b"wake up")
    waiter.join(GENEROUS_TIMEOUT + 1)

    # Then the waiting fetch returns the message
    assert payloads(fetched) == [b"wake up"]


def test_threads_sharing_one_broker_get_every_message_exactly_once(broker: Broker) -> None:
    # Given 400 waiting messages
    broker.publish([Outgoing(QUEUE, str(n).encode()) for n in range(400)])
    seen: list[list[bytes]] = [[] for _ in range(4)]

    def drain(mine: list[bytes]) -> None:
        while batch := broker.fetch([QUEUE], 5, timeout=0.05):
            mine.extend(payloads(batch))
            broker.ack(batch)

    # When four threads drain the queue through one broker object
    threads = [threading.Thread(target=drain, args=(mine,)) for mine in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS_TIMEOUT)

    # Then each message was delivered once
    assert sorted(int(p) for mine in seen for p in mine) == list(range(400))


# delayed messages -----------------------------------------------------------------------


def test_a_message_with_a_future_eta_waits_unfetched_but_counted(broker: Broker) -> None:
    # Given a message due in a minute
    publish_delayed(broker, b"later", eta=time.time() + 60)

    # When a consumer fetches now
    fetched = broker.fetch([QUEUE], 10, timeout=0)

    # Then it gets nothing, yet the message is counted as waiting and as scheduled
    assert fetched == []
    assert broker.size(QUEUE) == 1
    assert scheduled(broker) == 1


def test_a_delayed_message_is_fetched_once_its_eta_passes(broker: Broker) -> None:
    # Given a message due shortly
    eta = time.time() + 0.3
    publish_delayed(broker, b"soon", eta=eta)

    # When a consumer waits for it
    fetched = broker.fetch([QUEUE], 10, timeout=GENEROUS_TIMEOUT)

    # Then it arrives, and not before its eta
    assert payloads(fetched) == [b"soon"]
    assert time.time() >= eta
    assert scheduled(broker) == 0


def test_a_message_with_a_past_eta_is_ready_at_once(broker: Broker) -> None:
    # Given a message whose eta has already passed
    broker.publish_one(QUEUE, b"overdue", eta=time.time() - 5)

    # When a consumer fetches without waiting
    fetched = broker.fetch([QUEUE], 10, timeout=0)

    # Then it gets the message
    assert payloads(fetched) == [b"overdue"]


# release, ack, dead letters -----------------------------------------------------------


def test_a_released_message_is_fetched_again_as_a_redelivery(broker: Broker) -> None:
    # Given a fetched message
    broker.publish_one(QUEUE, envelope("again"))
    first = broker.fetch([QUEUE], 1, timeout=1)

    # When it is released
    broker.release(first)

    # Then it waits again and the next fetch gets it on its second attempt
    assert broker.size(QUEUE) == 1
    [second] = broker.fetch([QUEUE], 1, timeout=1)
    assert (text_of(second), second.attempts, second.redelivered) == ("again", 2, True)


def test_a_message_released_unmarked_comes_back_as_it_was_however_often_that_happens(
    broker: Broker,
) -> None:
    # Given a message fetched once, released as a redelivery and fetched again, and a newer one
    broker.publish_one(QUEUE, envelope("never started"))
    broker.release(broker.fetch([QUEUE], 1, timeout=1))
    [before] = broker.fetch([QUEUE], 1, timeout=1)
    broker.publish_one(QUEUE, envelope("newer"))

    # When it is released unmarked and fetched again ten times (ten warm shutdowns with it prefetched)
    delivery = before
    for _ in range(10):
        broker.release([delivery], redelivered=False)
        delivery, newer = broker.fetch([QUEUE], 2, timeout=1)
        broker.release([newer], redelivered=False)

    # Then it comes back byte for byte, its attempts as they were, still ahead of the newer one
    assert (delivery.payload, delivery.attempts, delivery.redelivered) == (before.payload, 2, True)
    assert (text_of(newer), newer.attempts) == ("newer", 1)


def test_a_message_released_with_an_eta_stays_hidden_until_then(broker: Broker) -> None:
    # Given a fetched message
    broker.publish_one(QUEUE, b"retry me")
    fetched = broker.fetch([QUEUE], 1, timeout=1)

    # When it is released with an eta a minute away
    broker.release(fetched, eta=time.time() + 60)

    # Then it waits, scheduled, and no consumer gets it now
    assert broker.fetch([QUEUE], 1, timeout=0) == []
    assert (broker.size(QUEUE), scheduled(broker)) == (1, 1)


def test_an_acked_message_is_gone_for_good(broker: Broker) -> None:
    # Given three fetched messages, one of them released
    broker.publish([Outgoing(QUEUE, bytes([n])) for n in range(3)])
    fetched = broker.fetch([QUEUE], 3, timeout=1)
    broker.release(fetched[2:])

    # When the first two are acked in one batch
    broker.ack(fetched[:2])

    # Then only the released one is left, and acking twice changes nothing
    broker.ack(fetched[:2])
    assert broker.size(QUEUE) == 1
    assert payloads(broker.fetch([QUEUE], 3, timeout=0)) == [bytes([2])]


def test_a_dead_lettered_message_leaves_its_queue_and_keeps_its_reason(broker: Broker) -> None:
    # Given a fetched message that cannot be processed
    broker.publish_one(QUEUE, b"poison")
    [delivery] = broker.fetch([QUEUE], 1, timeout=1)
    before = time.time()

    # When it is dead-lettered
    broker.dead_letter(delivery, "unknown task 'nope'")

    # Then no consumer gets it again, and the dead letters hold it with its reason
    assert broker.fetch([QUEUE], 1, timeout=0) == []
    assert broker.size(QUEUE) == 0
    [letter] = broker.dead_letters()
    assert (letter.queue, letter.payload, letter.reason) == (QUEUE, b"poison", "unknown task 'nope'")
    assert before <= letter.when <= time.time()


def test_dead_lettering_a_message_no_longer_leased_leaves_it_alone_with_a_warning(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a message that was fetched and acked
    broker.publish_one(QUEUE, b"done")
    [delivery] = broker.fetch([QUEUE], 1, timeout=1)
    broker.ack([delivery])

    # When it is dead-lettered afterwards
    with caplog.at_level(logging.WARNING, logger="celeriac.brokers"):
        broker.dead_letter(delivery, "too late")

    # Then no dead letter appears, and a warning says why
    assert broker.dead_letters() == []
    assert "no longer leased" in caplog.text


def test_dead_letters_are_listed_oldest_first_per_queue_up_to_a_limit(broker: Broker) -> None:
    # Given dead letters from two queues
    broker.publish([Outgoing("a", b"a1"), Outgoing("b", b"b1"), Outgoing("a", b"a2"), Outgoing("a", b"a3")])
    set_aside = broker.fetch(["a", "b"], 10, timeout=1)
    for delivery in set_aside:
        broker.dead_letter(delivery, "bad")

    # When they are listed for one queue with a limit, and for all queues
    some_of_a = broker.dead_letters("a", limit=2)
    every_one = broker.dead_letters()

    # Then each list keeps the order they were set aside in
    assert [letter.payload for letter in some_of_a] == [b"a1", b"a2"]
    assert [letter.payload for letter in every_one] == payloads(set_aside)
    assert sorted(payloads(set_aside)) == [b"a1", b"a2", b"a3", b"b1"]


# purge and size -------------------------------------------------------------------------


def test_purge_deletes_waiting_and_delayed_messages_but_not_leased_ones(broker: Broker) -> None:
    # Given a queue with a leased, a waiting and a delayed message, and another queue
    broker.publish([Outgoing(QUEUE, b"leased"), Outgoing(QUEUE, b"waiting"), Outgoing("other", b"kept")])
    broker.publish_one(QUEUE, b"delayed", eta=time.time() + 60)
    [leased] = broker.fetch([QUEUE], 1, timeout=1)

    # When the queue is purged
    purged = broker.purge(QUEUE)

    # Then the waiting and delayed ones are gone, the leased one can still come back
    assert purged == 2
    assert (broker.size(QUEUE), broker.size("other")) == (0, 1)
    broker.release([leased])
    assert payloads(broker.fetch([QUEUE], 10, timeout=1)) == [b"leased"]


def test_size_counts_the_waiting_messages_of_one_queue(broker: Broker) -> None:
    # Given an unknown queue, and a queue with three messages, one of them leased
    assert broker.size("never-used") == 0
    broker.publish([Outgoing(QUEUE, bytes([n])) for n in range(3)])
    broker.publish_one("other", b"elsewhere")
    broker.fetch([QUEUE], 1, timeout=1)

    # When it is sized, then only the two waiting ones count
    assert broker.size(QUEUE) == 2


# leases across consumers ----------------------------------------------------------------


def test_a_message_fetched_by_one_consumer_is_not_fetched_by_another(make_broker: MakeBroker) -> None:
    # Given two consumers and one message, fetched by the first
    first, second = make_broker(), make_broker()
    first.publish_one(QUEUE, b"mine")
    assert payloads(first.fetch([QUEUE], 1, timeout=1)) == [b"mine"]

    # When the second fetches and heartbeats
    stolen = second.fetch([QUEUE], 1, timeout=0.1)
    returned = second.heartbeat()

    # Then it gets nothing and returns nothing: the first consumer is alive
    assert (stolen, returned) == ([], 0)


def test_a_silent_consumers_messages_are_returned_by_another_consumers_heartbeat(
    make_broker: MakeBroker,
) -> None:
    # Given a consumer that leased two messages and then went silent, as if SIGKILLed
    survivor = make_broker(lease_timeout=SHORT_LEASE)
    silent = make_broker(lease_timeout=SHORT_LEASE)
    survivor.publish([Outgoing(QUEUE, envelope("first"), priority=2), Outgoing(QUEUE, envelope("second"))])
    assert len(silent.fetch([QUEUE], 2, timeout=1)) == 2
    go_silent(silent)

    # When a live consumer heartbeats until the silent one's lease lapses
    returned = eventually(lambda: survivor.heartbeat())

    # Then both messages are back, redelivered on their second attempt
    assert returned == 2
    fetched = survivor.fetch([QUEUE], 10, timeout=1)
    assert [(text_of(d), d.attempts, d.redelivered) for d in fetched] == [
        ("first", 2, True),
        ("second", 2, True),
    ]


def test_a_consumer_that_keeps_heartbeating_keeps_its_leases_past_the_lease_timeout(
    make_broker: MakeBroker,
) -> None:
    # Given a consumer holding a message, with a short lease
    holder = make_broker(lease_timeout=SHORT_LEASE)
    other = make_broker(lease_timeout=SHORT_LEASE)
    holder.publish_one(QUEUE, b"long task")
    [held] = holder.fetch([QUEUE], 1, timeout=1)

    # When it keeps heartbeating for three times the lease while another consumer watches
    watch_until = time.monotonic() + 3 * SHORT_LEASE
    while time.monotonic() < watch_until:
        holder.heartbeat()

        # Then the other consumer never gets the message back
        assert other.heartbeat() == 0
        assert other.fetch([QUEUE], 1, timeout=0.05) == []

    # And the holder can still ack it
    holder.ack([held])
    assert holder.size(QUEUE) == 0


def test_a_silent_consumer_keeps_its_messages_while_another_consumer_renews_its_lease(
    make_broker: MakeBroker,
) -> None:
    # Given a consumer (a pool child) holding a message and never heartbeating itself
    parent = make_broker(lease_timeout=SHORT_LEASE)
    child = make_broker(lease_timeout=SHORT_LEASE)
    watcher = make_broker(lease_timeout=SHORT_LEASE)
    parent.publish_one(QUEUE, envelope("long task"))
    assert len(child.fetch([QUEUE], 1, timeout=1)) == 1
    go_silent(child)

    # When another consumer (its parent) renews the child's lease with its own for three leases
    watch_until = time.monotonic() + 3 * SHORT_LEASE
    while time.monotonic() < watch_until:
        assert parent.heartbeat(also=[child.consumer_id]) == 0

        # Then no consumer gets the message back meanwhile
        assert watcher.heartbeat() == 0
        assert watcher.fetch([QUEUE], 1, timeout=0.05) == []

    # And once nobody renews it, it comes back like any lapsed consumer's
    go_silent(child)
    assert eventually(lambda: watcher.heartbeat()) == 1
    [again] = watcher.fetch([QUEUE], 1, timeout=1)
    assert (text_of(again), again.attempts) == ("long task", 2)


def test_reclaim_returns_a_gone_consumers_messages_at_once_as_a_lapsed_lease_would(
    make_broker: MakeBroker,
) -> None:
    # Given a consumer (a pool child) holding two messages under a lease far from lapsing
    parent, child = make_broker(), make_broker()
    parent.publish([Outgoing(QUEUE, envelope("first")), Outgoing(QUEUE, envelope("second"))])
    assert len(child.fetch([QUEUE], 2, timeout=1)) == 2

    # When another consumer (its parent, which saw it die) reclaims it
    returned = parent.reclaim(child.consumer_id)

    # Then both messages are back at once, redelivered, in their order
    assert returned == 2
    fetched = parent.fetch([QUEUE], 10, timeout=0)
    assert [(text_of(d), d.attempts, d.redelivered) for d in fetched] == [
        ("first", 2, True),
        ("second", 2, True),
    ]
    # And there is nothing more to reclaim from it, nor from an id nobody used, nor to recover
    assert parent.reclaim(child.consumer_id) == 0
    assert parent.reclaim("no-such-consumer") == 0
    assert parent.heartbeat() == 0


def _lease_under(broker: Broker, consumer_id: str, how: str) -> None:
    """In a forked child: take `consumer_id` as the prefork pool does, lease one message, die."""
    if how == "after reset_after_fork":
        broker.reset_after_fork()
    broker.consumer_id = consumer_id
    leased = broker.fetch([QUEUE], 1, timeout=GENEROUS_TIMEOUT)
    os._exit(0 if len(leased) == 1 and broker.consumer_id == consumer_id else 1)


@pytest.mark.parametrize("how", ["in this process", "after reset_after_fork", "first thing after fork"])
def test_a_consumer_id_assigned_by_the_caller_is_the_one_fetches_lease_under(
    make_broker: MakeBroker, how: str
) -> None:
    # Given a broker that has been used (so it holds connections), a message, and an id picked for a consumer
    parent, watcher = make_broker(), make_broker()
    parent.publish_one(QUEUE, envelope("job"))
    chosen = f"chosen-{uuid.uuid4().hex}"

    # When the consumer takes that id (in a forked child: as a prefork parent's child does) and fetches
    if how == "in this process":
        consumer = make_broker()
        consumer.reset_after_fork()
        consumer.consumer_id = chosen
        assert len(consumer.fetch([QUEUE], 1, timeout=1)) == 1
    elif isinstance(parent, MemoryBroker):
        pytest.skip("a forked child's memory broker is a copy the parent cannot see")
    else:
        context: Any = multiprocessing.get_context("fork")
        child = context.Process(target=_lease_under, args=(parent, chosen, how))
        child.start()
        child.join(GENEROUS_TIMEOUT * 3)
        assert child.exitcode == 0

    # Then the message is leased under that id: reclaiming it returns the message
    assert parent.consumer_id != chosen
    assert watcher.reclaim(chosen) == 1
    [again] = watcher.fetch([QUEUE], 1, timeout=1)
    assert (text_of(again), again.attempts) == ("job", 2)


# lifecycle and registry -----------------------------------------------------------------


def test_a_closed_broker_can_be_used_again(broker: Broker) -> None:
    # Given a broker that published and was closed
    broker.publish_one(QUEUE, b"kept")
    broker.close()

    # When it is used again, then it still sees the message
    assert payloads(broker.fetch([QUEUE], 1, timeout=1)) == [b"kept"]


def test_the_registry_picks_the_broker_class_by_url_scheme(tmp_path: Path) -> None:
    # Given URLs of each supported scheme, when their classes are looked up, then each is right
    assert broker_class_for("memory://") is MemoryBroker
    assert broker_class_for(_sqlite_url(tmp_path)) is SQLiteBroker
    assert broker_class_for(f"sqla+sqlite:///{tmp_path}/x.db") is SQLiteBroker
    assert broker_class_for(DEFAULT_BROKER_URL) is SQLiteBroker
    for url in ("redis://h:6379/0", "rediss://h/1", "redis+socket:///tmp/r.sock", "sentinel://h:26379"):
        assert broker_class_for(url) is RedisBroker
    for url in ("redis+cluster://h:7000,h2:7001", "rediss+cluster://h"):
        assert broker_class_for(url) is RedisClusterBroker


@pytest.mark.parametrize("url", ["kafka://user:secret@host/", "celeriac.db"])
def test_an_unsupported_broker_url_is_refused_naming_the_supported_schemes(url: str) -> None:
    # Given a URL no broker serves, when a broker is created for it
    with pytest.raises(ImproperlyConfigured) as refused:
        create_broker(url)

    # Then the error lists what is supported and does not echo the URL's secrets
    assert (
        "memory, redis, redis+cluster, redis+socket, rediss, rediss+cluster, sentinel, sqla+sqlite, sqlite"
        in str(refused.value)
    )
    assert "secret" not in str(refused.value)


# sqlite specifics ------------------------------------------------------------------------


@pytest.fixture
def sqlite_broker(tmp_path: Path) -> Iterator[SQLiteBroker]:
    broker = SQLiteBroker(_sqlite_url(tmp_path))
    yield broker
    broker.close()


def test_sqlite_messages_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    # Given messages published by a broker that is then closed
    writer = SQLiteBroker(_sqlite_url(tmp_path))
    writer.publish([Outgoing(QUEUE, b"durable"), Outgoing(QUEUE, b"later", eta=time.time() + 60)])
    writer.close()

    # When a new broker opens the same file
    reader = SQLiteBroker(_sqlite_url(tmp_path))
    try:
        # Then it sees both messages
        assert (reader.size(QUEUE), reader.scheduled(QUEUE)) == (2, 1)
        assert payloads(reader.fetch([QUEUE], 10, timeout=1)) == [b"durable"]
    finally:
        reader.close()


def test_sqlite_broker_puts_the_file_in_wal_mode_with_the_broker_tables(sqlite_broker: SQLiteBroker) -> None:
    # Given a broker that has been used
    sqlite_broker.publish_one(QUEUE, b"x")

    # When the file is inspected
    connection = sqlite3.connect(sqlite_broker.path)
    try:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()

    # Then it uses write-ahead logging and holds the broker's tables
    assert mode == "wal"
    assert {"celeriac_messages", "celeriac_consumers", "celeriac_dead_letters"} <= tables


def test_a_relative_sqlite_url_names_a_file_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the current directory is a scratch directory
    monkeypatch.chdir(tmp_path)

    # When a broker is made from a relative URL
    broker = create_broker("sqlite:///sub.db")

    # Then its file lives there, as an absolute path
    assert isinstance(broker, SQLiteBroker)
    assert broker.path == str(tmp_path / "sub.db")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/x.db", "sqlite:///:memory:"])
def test_a_sqlite_url_without_a_file_is_refused(url: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="must name a file"):
        create_broker(url)


def test_an_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match="synchronous"):
        create_broker(_sqlite_url(tmp_path), {"synchronous": "NORMAL; DROP TABLE x"})


def _drain(source: SQLiteBroker | str, start: Any, results: Any) -> None:
    """Fetch and ack until the queue is empty; report this consumer's id and what it saw."""
    broker = source if isinstance(source, SQLiteBroker) else SQLiteBroker(source)
    seen: list[tuple[int, int]] = []
    start.wait(GENEROUS_TIMEOUT)
    while True:
        batch = broker.fetch([QUEUE], 7, timeout=0.05)
        if not batch and broker.size(QUEUE) == 0:
            break
        seen.extend((int(d.payload), d.attempts) for d in batch)
        broker.ack(batch)
    results.put((broker.consumer_id, seen))
    broker.close()


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_many_processes_on_one_sqlite_file_get_every_message_exactly_once(
    sqlite_broker: SQLiteBroker, start_method: str
) -> None:
    # Given 2,000 messages in one file, published through a connection the parent keeps open
    total, workers = 2000, 3
    sqlite_broker.publish([Outgoing(QUEUE, str(n).encode()) for n in range(total)])

    # When three processes drain the queue at once (forked ones inherit the parent's broker)
    context: Any = multiprocessing.get_context(start_method)
    start, results = context.Barrier(workers), context.Queue()
    source: SQLiteBroker | str = sqlite_broker if start_method == "fork" else sqlite_broker.url
    processes = [context.Process(target=_drain, args=(source, start, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(GENEROUS_TIMEOUT)

    # Then every message was delivered once, on its first attempt, to distinct consumers
    # (how the 2,000 split between them is up to SQLite's lock and the machine's load)
    delivered = sorted(number for _, seen in reports for number, _ in seen)
    assert delivered == list(range(total))
    assert {attempts for _, seen in reports for _, attempts in seen} == {1}
    consumer_ids = {consumer_id for consumer_id, _ in reports} | {sqlite_broker.consumer_id}
    assert len(consumer_ids) == workers + 1
    assert [process.exitcode for process in processes] == [0] * workers
    assert sqlite_broker.size(QUEUE) == 0
    results.close()
    results.join_thread()
