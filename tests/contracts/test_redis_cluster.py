"""What the Redis Cluster broker and result backend promise beyond the generic contracts.

The slot rule (every multi-key step in one hash slot), recovery across queues that live on
different nodes, waiting for results through a subscription on any node, and the
``redis+cluster://`` URLs. Every test runs on the private three-master cluster of
tests/redis_cluster.py, emptied first, and looks at the raw keys through a redis-py
cluster client.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError

from celeriac import states
from celeriac.backends.redis import LISTENER_CLIENT_NAME
from celeriac.backends.redis_cluster import RedisClusterBackend
from celeriac.backends.registry import create_backend
from celeriac.brokers.base import Delivery, Outgoing
from celeriac.brokers.redis_cluster import RedisClusterBroker
from celeriac.exceptions import BackendError, ImproperlyConfigured, OperationalError
from celeriac.protocol.message import Envelope, pack, unpack
from celeriac.redis_cluster_connection import cluster_endpoint
from celeriac.redis_connection import Role, Translated
from tests.conftest import closing_factory, free_port, redis_answers, wait_until
from tests.contracts.test_broker_redis import drain_while_doubting

if TYPE_CHECKING:  # imported by pytest as a plugin, not here: see pytest_plugins
    from tests.redis_cluster import PrivateCluster

pytest_plugins = ("tests.redis_cluster",)

QUEUE = "celery"  # slot 3213
OTHER = "other"  # slot 11361: on another master of the three
SHORT_LEASE = 0.5
GENEROUS_TIMEOUT = 10.0
EXPIRES = 600

MakeBroker = Callable[..., RedisClusterBroker]
MakeBackend = Callable[..., RedisClusterBackend]


# fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
def raw(cluster_url: str, redis_cluster: PrivateCluster) -> Iterator[RedisCluster]:
    """A plain cluster client of the emptied cluster, for looking at the keys."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    yield client
    client.close()


@pytest.fixture
def make_broker(cluster_url: str) -> Iterator[MakeBroker]:
    yield from closing_factory(lambda **options: RedisClusterBroker(cluster_url, options))


@pytest.fixture
def make_backend(cluster_url: str) -> Iterator[MakeBackend]:
    def make(**settings: Any) -> RedisClusterBackend:
        settings.setdefault("expires", EXPIRES)
        backend = create_backend(cluster_url, **settings)
        assert isinstance(backend, RedisClusterBackend)
        return backend

    yield from closing_factory(make)


def task_envelope(name: str, queue: str = QUEUE, priority: int = 0) -> bytes:
    """A packed task message as Celery lays it out, routed to `queue`."""
    headers = {"lang": "py", "task": "proj.add", "id": name, "timelimit": [None, None], "stamps": {}}
    properties = {"correlation_id": name, "priority": priority, "delivery_mode": 2}
    return pack(Envelope(b"[[2, 2], {}, {}]", "application/json", "utf-8", headers, properties), queue)


def eventually(probe: Callable[[], Any], timeout: float = GENEROUS_TIMEOUT) -> Any:
    return wait_until(probe, timeout, "the condition")


def ids(deliveries: list[Delivery]) -> list[tuple[str, str, int]]:
    """(queue, task id or raw payload, attempts) of each delivery."""
    found = []
    for delivery in deliveries:
        try:
            name = str(unpack(delivery.payload).headers["id"])
        except Exception:
            name = repr(delivery.payload)
        found.append((delivery.queue, name, delivery.attempts))
    return found


# the broker's keys -------------------------------------------------------------------------


def test_the_two_queues_of_these_tests_live_on_different_masters(raw: RedisCluster) -> None:
    # The recovery tests below mean something only if their queues' slots are on two nodes
    assert raw.get_node_from_key(QUEUE) != raw.get_node_from_key(OTHER)


def test_every_key_of_a_queue_lies_in_the_slot_of_its_hash_tag(
    make_broker: MakeBroker, raw: RedisCluster, redis_cluster: PrivateCluster
) -> None:
    # Given messages of every priority step in a queue: of the most urgent ones, one parked with
    # an eta, one dead-lettered, one leased and one left waiting
    broker = make_broker()
    urgent = [task_envelope(f"u{n}") for n in range(4)]
    broker.publish([Outgoing(QUEUE, payload) for payload in urgent])
    broker.publish([Outgoing(QUEUE, task_envelope(f"p{p}", priority=p), priority=p) for p in (3, 6, 9)])
    parked, dead, leased = broker.fetch([QUEUE], 3, timeout=1)
    broker.release([parked], eta=time.time() + 60)
    broker.dead_letter(dead, "poison")

    # When the keys of every node are listed
    keys = redis_cluster.all_keys()

    # Then the queue's keys are kombu's list name and tagged names, all in the slot of {celery}
    mine = {
        b"celery",
        b"{celery}\x06\x163",
        b"{celery}\x06\x166",
        b"{celery}\x06\x169",
        b"celeriac.delayed.{celery}",
        b"celeriac.dead.{celery}",
        b"celeriac.consumers.{celery}",
        f"celeriac.inflight.{{celery}}.{broker.consumer_id}".encode(),
    }
    assert mine | {b"_kombu.binding.celery", b"celeriac.queues"} == keys
    assert {key_slot(key) for key in mine} == {key_slot(b"celery")}
    # And the most urgent list still holds kombu's envelope under kombu's name
    assert raw.lrange(QUEUE, 0, -1) == [urgent[3]]
    assert raw.lrange(f"celeriac.inflight.{{celery}}.{broker.consumer_id}", 0, -1) == [leased.payload]
    assert raw.smembers("celeriac.queues") == {b"celery"}


@pytest.mark.parametrize("name", ["a{b}", "tail}", ""])
def test_a_queue_name_that_would_break_the_slot_rule_is_refused(make_broker: MakeBroker, name: str) -> None:
    # Given a queue name with a brace, or none at all
    broker = make_broker()

    # When it is published to or fetched from, then the broker refuses, saying why
    for use in (lambda: broker.publish_one(name, b"x"), lambda: broker.fetch([name], 1, timeout=0)):
        with pytest.raises(ImproperlyConfigured, match="cannot be used on Redis Cluster"):
            use()


# recovery across queues ---------------------------------------------------------------------


def test_a_lapsed_consumers_messages_return_to_the_queues_they_were_taken_from(
    make_broker: MakeBroker, raw: RedisCluster
) -> None:
    # Given a consumer that leased, from queues on two nodes, an envelope of each queue, a
    # payload that is not an envelope, and an envelope whose routing names the other queue,
    # and then went silent
    lost = make_broker(lease_timeout=SHORT_LEASE)
    lost.publish([Outgoing(QUEUE, task_envelope("c1")), Outgoing(OTHER, task_envelope("o1", OTHER))])
    raw.lpush(OTHER, b"\x00not json")
    raw.lpush(OTHER, task_envelope("routed elsewhere", QUEUE))
    assert len(lost.fetch([QUEUE, OTHER], 10, timeout=1)) == 4
    lost.close()

    # When another consumer heartbeats until its leases (one per queue) have lapsed
    survivor = make_broker(lease_timeout=SHORT_LEASE)
    returned: list[int] = []
    eventually(lambda: returned.append(survivor.heartbeat()) or sum(returned) >= 4)
    assert sum(returned) == 4

    # Then each message is back in the queue it came from, envelopes marked as redelivered,
    # the other payload unchanged, and nothing became a dead letter
    assert ids(survivor.fetch([QUEUE], 10, timeout=1)) == [(QUEUE, "c1", 2)]
    assert sorted(ids(survivor.fetch([OTHER], 10, timeout=1))) == [
        (OTHER, "b'\\x00not json'", 1),
        (OTHER, "o1", 2),
        (OTHER, "routed elsewhere", 2),
    ]
    assert survivor.dead_letters() == []


def test_reclaim_and_heartbeats_reach_the_leases_of_every_queue(
    make_broker: MakeBroker, raw: RedisCluster
) -> None:
    # Given a consumer (a pool child) holding a message of each of two queues
    parent, child = make_broker(), make_broker()
    parent.publish([Outgoing(QUEUE, task_envelope("c1")), Outgoing(OTHER, task_envelope("o1", OTHER))])
    assert len(child.fetch([QUEUE, OTHER], 10, timeout=1)) == 2

    # When its parent renews the child's leases with its own
    parent.heartbeat(also=[child.consumer_id])

    # Then the child's lease in each queue ends with the parent's
    for queue in (QUEUE, OTHER):
        consumers = f"celeriac.consumers.{{{queue}}}"
        assert raw.zscore(consumers, child.consumer_id) == raw.zscore(consumers, parent.consumer_id)

    # And when the parent reclaims the child, both messages come back and both leases go
    assert parent.reclaim(child.consumer_id) == 2
    assert ids(parent.fetch([QUEUE, OTHER], 10, timeout=0)) == [(QUEUE, "c1", 2), (OTHER, "o1", 2)]
    assert [raw.zscore(f"celeriac.consumers.{{{q}}}", child.consumer_id) for q in (QUEUE, OTHER)] == [
        None,
        None,
    ]


def test_what_a_lost_fetch_reply_leased_is_given_back_unchanged_in_each_queue(
    make_broker: MakeBroker, raw: RedisCluster
) -> None:
    # Given a consumer holding one message of each queue, and in each queue's in-flight list one
    # more payload it never received (as a fetch whose reply was lost leaves them)
    broker = make_broker()
    broker.publish(
        [Outgoing(QUEUE, task_envelope("held c")), Outgoing(OTHER, task_envelope("held o", OTHER))]
    )
    held = broker.fetch([QUEUE, OTHER], 10, timeout=1)
    for queue, payload in ((QUEUE, task_envelope("lost c")), (OTHER, b"\x00lost, not json")):
        raw.lpush(queue, payload)
        assert raw.lmove(queue, f"celeriac.inflight.{{{queue}}}.{broker.consumer_id}", "RIGHT", "LEFT")
    broker._ledger.fetch_failed()

    # When it fetches again
    again = broker.fetch([QUEUE, OTHER], 10, timeout=1)

    # Then the two it never received went back to their queues unchanged (first attempts), and
    # were fetched now; the two it holds stayed leased to it
    assert sorted(ids(again)) == [(QUEUE, "lost c", 1), (OTHER, "b'\\x00lost, not json'", 1)]
    for delivery in held:
        inflight = f"celeriac.inflight.{{{delivery.queue}}}.{broker.consumer_id}"
        assert delivery.payload in raw.lrange(inflight, 0, -1)
    assert broker.dead_letters() == []


def test_reading_the_inflight_lists_after_failures_never_takes_what_a_running_fetch_leased(
    make_broker: MakeBroker,
) -> None:
    # Given a consumer told every millisecond that a fetch failed (so it reads its in-flight
    # lists whenever no fetch of it runs), and plain payloads waiting in two queues
    broker = make_broker()
    total = 600
    broker.publish([Outgoing((QUEUE, OTHER)[n % 2], str(n).encode()) for n in range(total)])

    # When six threads drain both queues through it
    delivered = drain_while_doubting(broker, [QUEUE, OTHER], threads=6)

    # Then nothing a fetch had leased was given back: each message was delivered exactly once
    assert sorted(int(p) for p in delivered) == list(range(total))
    assert broker.size(QUEUE) == broker.size(OTHER) == 0


def test_dead_letters_of_every_queue_are_listed_together_oldest_first(make_broker: MakeBroker) -> None:
    # Given messages of two queues dead-lettered in turn
    broker = make_broker()
    broker.publish([Outgoing(q, f"{q}{n}".encode()) for n in range(3) for q in (QUEUE, OTHER)])
    fetched = broker.fetch([QUEUE], 10, timeout=1) + broker.fetch([OTHER], 10, timeout=1)
    order = sorted(fetched, key=lambda d: d.payload[-1:])
    for delivery in order:
        broker.dead_letter(delivery, "bad")

    # When they are listed, for all queues and for one
    every_one, some = broker.dead_letters(), broker.dead_letters(OTHER, limit=2)

    # Then all queues' letters come merged in the order they were set aside
    assert [letter.payload for letter in every_one] == [d.payload for d in order]
    assert [letter.payload for letter in some] == [b"other0", b"other1"]
    assert broker.dead_letters(limit=1)[0].payload == order[0].payload


# the result backend's keys --------------------------------------------------------------------


def test_a_result_is_stored_under_celerys_key_and_published_to_subscribers_on_every_node(
    make_backend: MakeBackend, raw: RedisCluster, redis_cluster: PrivateCluster
) -> None:
    # Given a subscriber to the task's channel on each node of the cluster
    backend = make_backend()
    listeners = [redis_cluster.node(port).pubsub() for port in redis_cluster.ports]
    try:
        for listener in listeners:
            listener.subscribe("celery-task-meta-t1")
            assert listener.get_message(timeout=GENEROUS_TIMEOUT)["type"] == "subscribe"

        # When a result is stored
        backend.store_result("t1", 42, states.SUCCESS)

        # Then Celery's key holds Celery's document with the expiry, and every node's subscriber got it
        document = raw.get("celery-task-meta-t1")
        assert orjson.loads(document)["result"] == 42
        assert raw.ttl("celery-task-meta-t1") in (EXPIRES - 1, EXPIRES)
        for listener in listeners:
            message = eventually(lambda listener=listener: listener.get_message(timeout=0.1))
            assert message["data"] == document
    finally:
        for listener in listeners:
            listener.close()


def test_a_chords_keys_share_the_slot_of_its_group_tag(
    make_backend: MakeBackend, redis_cluster: PrivateCluster
) -> None:
    # Given a chord of two, one of whose header tasks has reported
    backend = make_backend()
    backend.set_chord_size("g1", 2)
    assert backend.chord_part_done("g1", 0, "t0", states.SUCCESS, 1) is None

    # Then its counting keys are Celery's names with the group id as hash tag, in one slot
    keys = {key for key in redis_cluster.all_keys() if key.startswith(b"celery-taskset-meta-")}
    assert keys == {
        b"celery-taskset-meta-{g1}.s",
        b"celery-taskset-meta-{g1}.j",
        b"celery-taskset-meta-{g1}.d",
    }
    assert {key_slot(key) for key in keys} == {key_slot(b"g1")}

    # And the second report completes it, once, with both parts in order
    parts = backend.chord_part_done("g1", 1, "t1", states.SUCCESS, 2)
    assert parts is not None and [part["result"] for part in parts] == [1, 2]
    assert backend.chord_part_done("g1", 1, "t1", states.SUCCESS, 2) is None


def test_a_saved_group_is_celerys_key_and_reads_back(make_backend: MakeBackend, raw: RedisCluster) -> None:
    # Given a group of two tasks, when it is saved
    backend = make_backend()
    result = [["g1", None], [[["t1", None], None], [["t2", None], None]]]
    backend.save_group("g1", result)

    # Then Celery's key holds Celery's document, and it restores until deleted
    assert orjson.loads(raw.get("celery-taskset-meta-g1")) == {"result": result}
    assert backend.restore_group("g1") == result
    backend.delete_group("g1")
    assert backend.restore_group("g1") is None


def test_with_the_pickle_serializer_a_success_is_not_overwritten(make_backend: MakeBackend) -> None:
    # Given a pickled success
    backend = make_backend(serializer="pickle", accept=["pickle"])
    backend.store_result("t1", {"done": True}, states.STARTED)
    backend.store_result("t1", {"done": True}, states.SUCCESS)

    # When a late retry is stored, then the success stands
    backend.store_result("t1", RuntimeError("late"), states.RETRY)
    assert backend.get_meta("t1")["result"] == {"done": True}
    assert backend.wait("t1", timeout=1, interval=1)["status"] == states.SUCCESS


def _listeners(redis_cluster: PrivateCluster) -> list[tuple[int, dict[str, Any]]]:
    """Our result listeners' pub/sub connections, with the port of the node each is on."""
    found = []
    for port in redis_cluster.ports:
        node = redis_cluster.node(port)
        try:
            found += [
                (port, c) for c in node.client_list(_type="pubsub") if c["name"] == LISTENER_CLIENT_NAME
            ]
        finally:
            node.close()
    return found


def _the_live_listener(redis_cluster: PrivateCluster, outcome: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The one listener subscribed to its wake-up channel and one result channel, and its node's port."""
    try:
        [(port, connection)] = eventually(
            lambda: [(p, c) for p, c in _listeners(redis_cluster) if c["sub"] == "2"]
        )
    except AssertionError as failure:  # say what there is instead, should this ever fail
        seen = [(p, c["sub"], c["cmd"], c["age"]) for p, c in _listeners(redis_cluster)]
        waiter_state = outcome or "still waiting"
        raise AssertionError(f"listeners (port, sub, cmd, age): {seen}; waiter: {waiter_state}") from failure
    return port, connection


def test_a_waiter_whose_listener_loses_its_node_connection_moves_to_the_next_node_and_gets_its_result(
    make_backend: MakeBackend, redis_cluster: PrivateCluster
) -> None:
    # Given a waiter whose shared subscription is live on some node
    backend = make_backend()
    backend.get_meta("warm-up")  # the cluster client now knows every node
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            # Longer than every wait of the test below: a waiter that gave up would unsubscribe
            outcome["meta"] = backend.wait("t1", 3 * GENEROUS_TIMEOUT, 1.0)
        except BaseException as exc:  # surfaced by the assertion below
            outcome["meta"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    port, connection = _the_live_listener(redis_cluster, outcome)

    # When that connection is killed
    node = redis_cluster.node(port)
    node.client_kill_filter(_id=connection["id"])
    node.close()

    # Then the listener subscribes again on another node, and the waiter gets the result stored next
    moved_to, _ = _the_live_listener(redis_cluster, outcome)
    assert moved_to != port
    backend.store_result("t1", "after the move", states.SUCCESS)
    waiter.join(GENEROUS_TIMEOUT)
    assert not isinstance(outcome["meta"], BaseException), outcome["meta"]
    assert outcome["meta"]["result"] == "after the move"


# URLs and failures -----------------------------------------------------------------------------

ROLE = Role(
    "Redis test", "test_options", frozenset({"socket_connect_timeout"}), {}, OperationalError, BackendError
)


def test_a_cluster_url_names_its_nodes_credentials_and_options() -> None:
    # Given a URL with credentials, three nodes (one IPv6, one on the default port) and an option
    url = "rediss+cluster://me:p%40ss@h1:7000,[::1]:7001,h3/0?socket_timeout=3"

    # When it is read with a transport option
    found = cluster_endpoint(url, {"socket_connect_timeout": 2, "ignored": 1}, ROLE)

    # Then every node, the credentials, the options and TLS are taken, and no text shows the password
    assert found.nodes == (("h1", 7000), ("::1", 7001), ("h3", 6379))
    assert dict(found.client_options) == {
        "socket_timeout": 3.0,
        "username": "me",
        "password": "p@ss",
        "socket_connect_timeout": 2,
    }
    assert found.tls
    assert "p%40ss" not in found.redacted and "p@ss" not in repr(found)
    assert cluster_endpoint("redis+cluster://", {}, ROLE).nodes == (("localhost", 6379),)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+cluster://h:7000/3", "only database 0"),
        ("redis+cluster://h:7000?db=2", "database other than 0"),
        ("redis+cluster://h:port", "Unusable"),
        ("redis://h:7000", "not a Redis Cluster URL"),
    ],
)
def test_an_unusable_cluster_url_is_refused(url: str, complaint: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=complaint):
        cluster_endpoint(url, {}, ROLE)


def test_an_unreachable_cluster_raises_the_roles_error_without_the_password() -> None:
    # Given a broker and a backend on a port where nothing listens, with a password in the URL
    url = "redis+cluster://:s3cret@127.0.0.1:1"
    broker = RedisClusterBroker(url)
    backend = create_backend(url)
    assert backend is not None
    uses: list[tuple[Callable[[], Any], type[Exception]]] = [
        (lambda: broker.publish_one(QUEUE, b"x"), OperationalError),
        (lambda: broker.fetch([QUEUE], 1, timeout=0), OperationalError),
        (lambda: backend.get_meta("t1"), BackendError),
    ]

    # When each is used, then it raises its role's error naming the address but not the password
    for use, error in uses:
        with pytest.raises(error) as failure:
            use()
        assert "127.0.0.1:1" in str(failure.value)
        assert "s3cret" not in str(failure.value)
    broker.close()
    backend.close()


def _cannot_connect() -> RedisClusterException:
    try:
        raise redis.ConnectionError("Connection refused")
    except redis.ConnectionError as lost:
        try:
            raise RedisClusterException("Redis Cluster cannot be connected") from lost
        except RedisClusterException as exc:
            return exc


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (_cannot_connect(), OperationalError),
        (RedisClusterException("All slots are not covered after query all startup_nodes."), OperationalError),
        (SlotNotCoveredError('Slot "3213" is not covered by the cluster.'), OperationalError),
        (ClusterDownError("The cluster is down"), OperationalError),
        (RedisClusterException("LPUSH - all keys must map to the same key slot"), BackendError),
    ],
)
def test_the_cluster_clients_own_errors_of_an_outage_say_unreachable_and_others_failed(
    error: Exception, raised: type[Exception]
) -> None:
    # Given an error the cluster client raises (what a worker must ride out, or a plain failure),
    # when it passes through the translation every broker and backend call makes,
    # then it becomes the role's "unreachable" error only when the cluster may come back
    with pytest.raises(raised) as translated, Translated(ROLE, "redis+cluster://h:1"):
        raise error
    assert translated.type is raised


def test_a_cluster_url_naming_a_server_not_in_cluster_mode_is_refused(
    redis_cluster: PrivateCluster, tmp_path: Path
) -> None:
    # Given a private Redis server that is not in cluster mode (started like the cluster's nodes)
    server = shutil.which("redis-server")
    assert server is not None
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: redis_answers(port))

        # When a cluster broker uses it, then it is told to use a redis:// URL instead
        broker = RedisClusterBroker(f"redis+cluster://127.0.0.1:{port}")
        with pytest.raises(ImproperlyConfigured, match="not in cluster mode"):
            broker.publish_one(QUEUE, b"x")
        broker.close()
    finally:
        process.kill()
        process.wait(30)
