"""What the Redis result backend promises beyond the generic contract: Celery's bytes on
the wire, pub/sub waiting on one shared connection, and surviving a lost connection.

These tests talk to a real Redis (database 10, emptied before each test). Without one
they are skipped, loudly; with the CI environment variable set they fail instead.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import redis
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI"):
        raise
    pytest.skip("SKIPPING REDIS TESTS: redis-py is not installed", allow_module_level=True)

from celeriac import states
from celeriac.backends.redis import LISTENER_CLIENT_NAME, RedisBackend
from celeriac.backends.registry import create_backend
from celeriac.exceptions import BackendError, ImproperlyConfigured
from celeriac.protocol.failures import decode_exception
from tests.conftest import closing_factory, free_port
from tests.contracts.test_backend import GENEROUS_TIMEOUT, REDIS_URL, eventually, require_redis

MakeBackend = Callable[..., RedisBackend]

EXPIRES = 600
CELERY_FIELD_ORDER = ["status", "result", "traceback", "children", "date_done", "task_id"]
CELERY_DATE_DONE = "2026-11-24T02:16:27.426679+00:00"
REDIS_SERVER = shutil.which("redis-server")


# fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain client of the emptied test database, standing in for Celery or an operator."""
    client: redis.Redis = require_redis()
    yield client
    client.close()


@pytest.fixture
def make_backend(raw: redis.Redis) -> Iterator[MakeBackend]:
    def make(url: str = REDIS_URL, **settings: Any) -> RedisBackend:
        settings.setdefault("expires", EXPIRES)
        backend = create_backend(url, **settings)
        assert isinstance(backend, RedisBackend)
        return backend

    yield from closing_factory(make)


@pytest.fixture
def backend(make_backend: MakeBackend) -> RedisBackend:
    return make_backend()


def listener_subscriptions(raw: redis.Redis) -> list[int]:
    """How many channels each of our listeners' pub/sub connections to the test database holds."""
    clients = raw.client_list(_type="pubsub")
    return [int(c["sub"]) for c in clients if c["name"] == LISTENER_CLIENT_NAME and c["db"] == "10"]


def listener_threads() -> int:
    return sum(thread.name == "celeriac-result-listener" for thread in threading.enumerate())


def subscribers(raw: redis.Redis, channel: str) -> int:
    return int(dict(raw.pubsub_numsub(channel))[channel.encode()])


def wait_in_thread(backend: RedisBackend, task_id: str, outcomes: dict[str, Any]) -> threading.Thread:
    """Wait for `task_id` in another thread, recording its meta (or its error) in `outcomes`."""

    def run() -> None:
        try:
            outcomes[task_id] = backend.wait(task_id, timeout=GENEROUS_TIMEOUT, interval=5.0)
        except BaseException as exc:  # surfaced by the test's assertions
            outcomes[task_id] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def celery_meta(status: str, result: Any, task_id: str, *, spaced: bool = True) -> bytes:
    """A meta document as Celery's own Redis backend writes it (kombu's json.dumps)."""
    meta = {
        "status": status,
        "result": result,
        "traceback": "Traceback (most recent call last): ..." if status == states.FAILURE else None,
        "children": [],
        "date_done": CELERY_DATE_DONE,
        "task_id": task_id,
    }
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(meta, separators=separators).encode()


def celery_setex(raw: redis.Redis, key: str, document: bytes) -> None:
    """Write `document` as Celery does (SETEX, by name: redis-py deprecates its setex helper)."""
    raw.execute_command("SETEX", key, EXPIRES, document)


@contextlib.contextmanager
def subscribed(raw: redis.Redis, channel: str) -> Iterator[Any]:
    """A pub/sub connection subscribed to `channel`, its confirmation already read."""
    pubsub = raw.pubsub()
    try:
        pubsub.subscribe(channel)
        confirmation = pubsub.get_message(timeout=GENEROUS_TIMEOUT)
        assert confirmation is not None and confirmation["type"] == "subscribe"
        yield pubsub
    finally:
        pubsub.close()


# the bytes in Redis ------------------------------------------------------------------


def test_the_meta_key_holds_celerys_json_in_celerys_field_order_with_a_ttl_of_expires(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given a success stored with a group and a parent, as a worker stores one
    backend.store_result("t1", {"n": 5}, states.SUCCESS, extra={"group_id": "g1", "parent_id": "p1"})
    # When the key is read raw
    stored = raw.get("celery-task-meta-t1")
    assert stored is not None
    meta = json.loads(stored)
    # Then it is Celery's JSON, fields in Celery's order, expiring after `result_expires`
    assert list(meta) == [*CELERY_FIELD_ORDER[:5], "group_id", "parent_id", "task_id"]
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == {"n": 5}
    assert meta["task_id"] == "t1"
    assert raw.ttl("celery-task-meta-t1") in (EXPIRES - 1, EXPIRES)


def test_an_unfinished_state_and_a_backend_without_expiry_write_keys_that_never_expire(
    make_backend: MakeBackend, raw: redis.Redis
) -> None:
    # Given a task that has started, and a backend told to keep results forever
    make_backend().store_result("running", None, states.STARTED)
    make_backend(expires=None).store_result("kept", 1, states.SUCCESS)
    # When their keys are inspected
    # Then neither has a TTL (Redis answers -1), and both hold Celery's field order
    assert raw.ttl("celery-task-meta-running") == -1
    assert raw.ttl("celery-task-meta-kept") == -1
    assert list(json.loads(raw.get("celery-task-meta-kept") or b"{}")) == CELERY_FIELD_ORDER


def test_a_subscriber_on_the_tasks_channel_receives_the_stored_json(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given a subscriber on the task's channel, as a Celery client subscribes
    with subscribed(raw, "celery-task-meta-t1") as pubsub:
        # When the result is stored
        backend.store_result("t1", [1, 2], states.SUCCESS)
        message = pubsub.get_message(timeout=GENEROUS_TIMEOUT)
    # Then the very bytes of the key were published on the channel named like it
    assert message is not None
    assert message["channel"] == b"celery-task-meta-t1"
    assert message["data"] == raw.get("celery-task-meta-t1")


def test_a_success_and_a_failure_written_by_celery_read_back_and_the_exception_decodes(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given metas written raw by a Celery worker: a success, and a ValueError failure
    celery_setex(raw, "celery-task-meta-ok", celery_meta("SUCCESS", {"total": 3}, "ok"))
    failure = {"exc_type": "ValueError", "exc_message": ["boom", 42], "exc_module": "builtins"}
    celery_setex(raw, "celery-task-meta-bad", celery_meta("FAILURE", failure, "bad"))
    # When celeriac reads them
    ok, bad = backend.get_meta("ok"), backend.get_meta("bad")
    # Then the success is there, and the failure rebuilds as the same exception
    assert (ok["status"], ok["result"], ok["date_done"]) == ("SUCCESS", {"total": 3}, CELERY_DATE_DONE)
    assert bad["status"] == states.FAILURE
    assert bad["traceback"].startswith("Traceback")
    rebuilt = decode_exception(bad["result"])
    assert type(rebuilt) is ValueError
    assert rebuilt.args == ("boom", 42)


# never overwriting a success ---------------------------------------------------------


def test_a_success_is_not_overwritten_by_a_later_retry_nor_is_the_retry_published(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given a success, and a subscriber on the task's channel
    backend.store_result("t1", "done", states.SUCCESS)
    before = raw.get("celery-task-meta-t1")
    with subscribed(raw, "celery-task-meta-t1") as pubsub:
        # When a late RETRY is stored for the same task
        backend.store_result("t1", RuntimeError("late"), states.RETRY)
        message = pubsub.get_message(timeout=0.2)
    # Then the stored bytes are untouched, and nobody was told of the retry
    assert raw.get("celery-task-meta-t1") == before
    assert message is None


@pytest.mark.parametrize("layout", ["compact", "spaced", "status-not-first"])
def test_a_success_written_by_celery_in_any_json_layout_is_not_overwritten(
    backend: RedisBackend, raw: redis.Redis, layout: str
) -> None:
    # Given a success written by another writer, in one JSON layout or another
    document = celery_meta("SUCCESS", 5, "t1", spaced=layout != "compact")
    if layout == "status-not-first":
        meta = json.loads(document)
        document = json.dumps({"task_id": meta.pop("task_id"), **meta}).encode()
    raw.set("celery-task-meta-t1", document)
    # When celeriac stores a late STARTED for the task
    backend.store_result("t1", None, states.STARTED)
    # Then the success stands
    assert raw.get("celery-task-meta-t1") == document


def test_with_the_pickle_serializer_a_success_is_not_overwritten_either(make_backend: MakeBackend) -> None:
    # Given a backend storing pickles (which the Lua check cannot read), and a success
    backend = make_backend(serializer="pickle", accept=["pickle"])
    backend.store_result("t1", {"n": 1}, states.SUCCESS)
    # When a late RETRY is stored, and another task first starts then fails
    backend.store_result("t1", RuntimeError("late"), states.RETRY)
    backend.store_result("t2", None, states.STARTED)
    backend.store_result("t2", KeyError("k"), states.FAILURE)
    # Then the success stands, and unfinished states are still replaced
    assert backend.get_meta("t1")["result"] == {"n": 1}
    assert backend.get_meta("t2")["status"] == states.FAILURE


def test_threads_that_come_and_go_share_the_backends_connections(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given a backend already in use, and how many connections the test database has
    backend.store_result("warm", 0, states.SUCCESS)

    def connections() -> int:
        return sum(c["db"] == "10" and "subscribe" not in c["cmd"] for c in raw.client_list())

    before = connections()

    # When thirty short-lived threads, one after another, each store and read a result
    def store_and_read(n: int) -> None:
        backend.store_result(f"t{n}", n, states.SUCCESS)
        assert backend.get_meta(f"t{n}")["result"] == n

    for n in range(30):
        thread = threading.Thread(target=store_and_read, args=(n,))
        thread.start()
        thread.join(GENEROUS_TIMEOUT)

    # Then they reused the same connection: none is left behind by a thread that ended
    assert connections() == before
    assert [backend.get_meta(f"t{n}")["result"] for n in range(30)] == list(range(30))


# waiting -----------------------------------------------------------------------------


def test_wait_returns_within_moments_of_a_store_from_another_thread(backend: RedisBackend) -> None:
    # Given a result another thread stores a little later, noting when it did
    stored: dict[str, float] = {}

    def store() -> None:
        stored["at"] = time.monotonic()
        backend.store_result("t1", 42, states.SUCCESS)

    timer = threading.Timer(0.3, store)
    timer.start()
    try:
        # When waiting with a long timeout, and an interval a poller would sleep through
        meta = backend.wait("t1", timeout=GENEROUS_TIMEOUT, interval=5.0)
        returned_at = time.monotonic()
    finally:
        timer.join()
    # Then the wait ended just after the store: it was told, it did not poll
    assert meta["result"] == 42
    assert returned_at - stored["at"] < 0.5


def test_fifty_concurrent_waiters_share_one_subscription_connection_and_all_get_their_results(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given fifty threads each waiting for its own task
    outcomes: dict[str, Any] = {}
    threads = [wait_in_thread(backend, f"t{n}", outcomes) for n in range(50)]
    try:
        # When they are all waiting
        # Then one pub/sub connection serves them, holding their fifty channels (and its
        # own wake-up channel), read by the waiting threads themselves: no thread of its own
        eventually(lambda: listener_subscriptions(raw) == [51])
        assert listener_threads() == 0
        # And when their results are stored, each gets its own
        for n in range(50):
            backend.store_result(f"t{n}", n, states.SUCCESS)
    finally:
        for thread in threads:
            thread.join(GENEROUS_TIMEOUT)
    assert [outcomes[f"t{n}"]["result"] for n in range(50)] == list(range(50))
    # And each channel is unsubscribed once nobody waits on it
    eventually(lambda: listener_subscriptions(raw) == [1])


def test_two_waiters_on_one_task_share_its_subscription_and_both_get_the_result(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given two threads waiting for the same task
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    threads = [wait_in_thread(backend, "t1", first), wait_in_thread(backend, "t1", second)]
    try:
        # When both are waiting, the task's channel has one subscriber: the listener
        eventually(lambda: listener_subscriptions(raw) == [2])
        assert subscribers(raw, "celery-task-meta-t1") == 1
        # And the result is stored
        backend.store_result("t1", "shared", states.SUCCESS)
    finally:
        for thread in threads:
            thread.join(GENEROUS_TIMEOUT)
    # Then both got it
    assert first["t1"]["result"] == second["t1"]["result"] == "shared"


def test_wait_reads_the_key_after_the_listener_reconnects_so_a_result_stored_in_the_gap_is_not_missed(
    backend: RedisBackend, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a thread waiting for a task, through the backend's listener
    outcomes: dict[str, Any] = {}
    waiter = wait_in_thread(backend, "t1", outcomes)
    eventually(lambda: subscribers(raw, "celery-task-meta-t1") == 1)
    # And a listener that will pause before reconnecting, until the test lets it
    # (patched, because a real reconnect is too quick to store anything in between)
    listener = backend._listener
    assert listener is not None
    in_gap, end_gap = threading.Event(), threading.Event()
    reconnect = listener._open

    def held_reconnect() -> Any:
        in_gap.set()
        end_gap.wait(GENEROUS_TIMEOUT)
        return reconnect()

    monkeypatch.setattr(listener, "_open", held_reconnect)
    try:
        # When its pub/sub connection is killed by the server
        (client_id,) = [c["id"] for c in raw.client_list(_type="pubsub") if c["name"] == LISTENER_CLIENT_NAME]
        assert raw.client_kill_filter(_id=client_id, _type="pubsub") == 1
        assert in_gap.wait(GENEROUS_TIMEOUT)
        # And the result is stored (and published to nobody) while it is away
        eventually(lambda: subscribers(raw, "celery-task-meta-t1") == 0)
        backend.store_result("t1", "during the gap", states.SUCCESS)
        assert "t1" not in outcomes
    finally:
        end_gap.set()
        waiter.join(GENEROUS_TIMEOUT)
    # Then, once reconnected, the waiter read the key and got the result
    assert outcomes["t1"]["result"] == "during the gap"


def test_closing_the_backend_releases_its_waiters_with_backend_error(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given a thread waiting for a task that will not finish
    outcomes: dict[str, Any] = {}
    waiter = wait_in_thread(backend, "t1", outcomes)
    eventually(lambda: subscribers(raw, "celery-task-meta-t1") == 1)
    # When the backend is closed
    backend.close()
    waiter.join(GENEROUS_TIMEOUT)
    # Then the waiter stops at once with BackendError
    assert isinstance(outcomes["t1"], BackendError)
    # And the backend still works afterwards
    backend.store_result("t2", 2, states.SUCCESS)
    assert backend.wait("t2", timeout=1, interval=1)["result"] == 2


def _wait_in_forked_child(backend: RedisBackend) -> None:
    # Runs in a forked child holding the parent's backend, listener and all.
    backend.reset_after_fork()
    timer = threading.Timer(0.1, backend.store_result, args=("from-child", "hi", states.SUCCESS))
    timer.start()
    meta = backend.wait("from-child", timeout=GENEROUS_TIMEOUT, interval=5.0)
    timer.join()
    backend.close()
    raise SystemExit(0 if meta["result"] == "hi" else 1)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_its_own_connections_and_listener(backend: RedisBackend) -> None:
    # Given a backend whose listener is running in this process
    timer = threading.Timer(0.1, backend.store_result, args=("in-parent", 1, states.SUCCESS))
    timer.start()
    assert backend.wait("in-parent", timeout=GENEROUS_TIMEOUT, interval=5.0)["result"] == 1
    timer.join()
    # When a forked child resets the same backend object and waits with it
    child = multiprocessing.get_context("fork").Process(target=_wait_in_forked_child, args=(backend,))
    child.start()
    child.join(GENEROUS_TIMEOUT)
    # Then the child got its result, and the parent's listener still works
    assert child.exitcode == 0
    timer = threading.Timer(0.1, backend.store_result, args=("after", 2, states.SUCCESS))
    timer.start()
    assert backend.wait("after", timeout=GENEROUS_TIMEOUT, interval=5.0)["result"] == 2
    timer.join()


# groups ------------------------------------------------------------------------------


def test_a_saved_group_reads_back_and_is_stored_as_celery_stores_it(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    # Given a group of two tasks
    result = [["g1", None], [[["t1", None], None], [["t2", None], None]]]
    # When it is saved
    backend.save_group("g1", result)
    # Then Celery's key holds Celery's document, with the result expiry
    assert json.loads(raw.get("celery-taskset-meta-g1") or b"") == {"result": result}
    assert raw.ttl("celery-taskset-meta-g1") in (EXPIRES - 1, EXPIRES)
    # And it restores as it was saved, until it is deleted
    assert backend.restore_group("g1") == result
    backend.delete_group("g1")
    assert backend.restore_group("g1") is None


def test_a_group_saved_by_celery_restores(backend: RedisBackend, raw: redis.Redis) -> None:
    # Given a group meta written raw by Celery
    celery_setex(raw, "celery-taskset-meta-g2", b'{"result": [["g2", null], [[["a", null], null]]]}')
    # When it is restored
    # Then its result tuple is there
    assert backend.restore_group("g2") == [["g2", None], [[["a", None], None]]]


# errors and configuration ------------------------------------------------------------


def test_an_unreachable_server_raises_backend_error_naming_it_without_the_password() -> None:
    # Given a backend pointing at a port nobody listens on, with a password in the URL
    backend = create_backend("redis://:s3cret@127.0.0.1:1/0")
    assert backend is not None
    try:
        started = time.monotonic()
        # When it is used, Then each use fails with a BackendError that says where
        for use in (
            lambda: backend.store_result("t1", 1, states.SUCCESS),
            lambda: backend.get_meta("t1"),
            lambda: backend.wait("t1", timeout=1, interval=1),
        ):
            with pytest.raises(BackendError, match=r"cannot reach the Redis result backend") as raised:
                use()
            assert "127.0.0.1:1" in str(raised.value)
            assert "s3cret" not in str(raised.value)
            assert isinstance(raised.value.__cause__, redis.ConnectionError)
        # And soon: a few quick retries, not a long stall
        assert time.monotonic() - started < 5
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("url", "options", "complaint"),
    [
        ("sentinel://127.0.0.1:26379", None, "master_name"),
        ("sentinel://127.0.0.1:26379;redis://x", {"master_name": "m"}, "bad sentinel URL"),
        ("sentinel://127.0.0.1:26379/zero", {"master_name": "m"}, "must be a number"),
        ("redis+socket://", None, "names no socket"),
        ("redis://127.0.0.1/0", {"global_keyprefix": "app:"}, "global_keyprefix"),
    ],
)
def test_an_unusable_url_or_option_is_refused_when_the_backend_is_made(
    url: str, options: dict[str, Any] | None, complaint: str
) -> None:
    # Given a Redis URL or transport option the backend cannot use
    # When a backend is made from it
    # Then it is refused at once, saying what is wrong
    with pytest.raises(ImproperlyConfigured, match=complaint):
        create_backend(url, options=options)


# other ways to reach the server ------------------------------------------------------


def _spawn_redis(args: list[str], ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + GENEROUS_TIMEOUT
    while True:
        try:
            if ready():
                return process
        except redis.RedisError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"{args[0]} did not start: {args}")
        time.sleep(0.02)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths must be short (~100 bytes): pytest's tmp_path can be too long.
    path = Path(tempfile.mkdtemp(prefix="celeriac-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(REDIS_SERVER is None, reason="needs the redis-server program")
def test_a_redis_socket_url_reaches_the_server_and_its_virtual_host_database(short_tmp: Path) -> None:
    # Given a private Redis server listening on a unix socket only
    socket_path = short_tmp / "redis.sock"
    probe = redis.Redis(unix_socket_path=str(socket_path), db=3)
    server = _spawn_redis(
        [
            str(REDIS_SERVER),
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--save",
            "",
            "--dir",
            str(short_tmp),
        ],
        lambda: bool(probe.ping()),
    )
    backend = create_backend(f"redis+socket://{socket_path}?virtual_host=3", expires=EXPIRES)
    assert backend is not None
    try:
        # When a result is stored and waited for through Celery's redis+socket URL
        timer = threading.Timer(0.1, backend.store_result, args=("t1", "via socket", states.SUCCESS))
        timer.start()
        meta = backend.wait("t1", timeout=GENEROUS_TIMEOUT, interval=5.0)
        timer.join()
        # Then it came back, from database 3 of that server
        assert meta["result"] == "via socket"
        assert probe.exists("celery-task-meta-t1") == 1
    finally:
        backend.close()
        probe.close()
        server.terminate()
        server.wait(GENEROUS_TIMEOUT)


@pytest.mark.skipif(REDIS_SERVER is None, reason="needs the redis-server program")
def test_a_sentinel_url_finds_the_master_by_name(raw: redis.Redis, short_tmp: Path) -> None:
    # Given a Sentinel watching the test server as master "celeriac-test"
    port = free_port()
    config = short_tmp / "sentinel.conf"
    config.write_text(f"port {port}\nsentinel monitor celeriac-test 127.0.0.1 6379 1\n")
    probe = redis.Redis(port=port)
    sentinel = _spawn_redis(
        [str(REDIS_SERVER), str(config), "--sentinel"],
        lambda: probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "celeriac-test") is not None,
    )
    backend = create_backend(
        f"sentinel://127.0.0.1:{port}/10;sentinel://127.0.0.1:1",
        expires=EXPIRES,
        options={"master_name": "celeriac-test", "socket_connect_timeout": 2},
    )
    assert backend is not None
    try:
        # When a result is stored and waited for through it
        timer = threading.Timer(0.1, backend.store_result, args=("t1", "via sentinel", states.SUCCESS))
        timer.start()
        meta = backend.wait("t1", timeout=GENEROUS_TIMEOUT, interval=5.0)
        timer.join()
        # Then it came back, and it is in the master's database 10
        assert meta["result"] == "via sentinel"
        assert raw.exists("celery-task-meta-t1") == 1
    finally:
        backend.close()
        probe.close()
        sentinel.terminate()
        sentinel.wait(GENEROUS_TIMEOUT)
