"""The contract every result backend keeps, run against each one.

Backends are built through the registry from their URL, as the app builds them.
"redis-cluster" runs them on a private Redis Cluster (tests/redis_cluster.py).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from celeriac import states
from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend
from celeriac.backends.redis import RedisBackend
from celeriac.backends.registry import create_backend, supported_schemes
from celeriac.backends.sqlite import SQLiteBackend
from celeriac.exceptions import ImproperlyConfigured, ProtocolError, TimeoutError
from celeriac.protocol.failures import decode_exception
from tests.conftest import closing_factory

pytest_plugins = ("tests.redis_cluster",)

MakeBackend = Callable[..., ResultBackend]

SHORT_EXPIRY = 0.3
GENEROUS_TIMEOUT = 10.0
# A database of its own, emptied before each test that uses it.
REDIS_URL = "redis://127.0.0.1:6379/10"


class PaymentDeclined(Exception):
    """An exception of the kind a user's own task module defines."""


# fixtures and helpers ----------------------------------------------------------------


def _sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'results.db'}"


def require_redis(url: str = REDIS_URL) -> Any:
    """Return a client of an emptied test database; skip loudly without Redis (fail when CI is set)."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
    except Exception as exc:
        missing = f"no Redis server at {url} ({type(exc).__name__}: {exc})"
        if os.environ.get("CI"):
            pytest.fail(f"REDIS TESTS CANNOT RUN under CI: {missing}")
        pytest.skip(f"SKIPPING REDIS TESTS: {missing}; start Redis to run them (CI=1 makes this fail)")
    client.flushdb()
    return client


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        require_redis().close()
        return REDIS_URL
    if request.param == "redis-cluster":
        return str(request.getfixturevalue("cluster_url"))
    return "memory://" if request.param == "memory" else _sqlite_url(tmp_path)


def expires_keys_itself(backend: ResultBackend) -> bool:
    """Whether the store drops expired results on its own, leaving `cleanup()` nothing to do."""
    return isinstance(backend, RedisBackend)


@pytest.fixture
def make_backend(backend_url: str) -> Iterator[MakeBackend]:
    def make(*, expires: float | None = DEFAULT_EXPIRES) -> ResultBackend:
        backend = create_backend(backend_url, expires=expires)
        assert backend is not None
        return backend

    yield from closing_factory(make)


@pytest.fixture
def backend(make_backend: MakeBackend) -> ResultBackend:
    return make_backend()


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[SQLiteBackend]:
    backend = SQLiteBackend(_sqlite_url(tmp_path))
    yield backend
    backend.close()


def eventually(condition: Callable[[], bool], timeout: float = GENEROUS_TIMEOUT) -> None:
    """Poll `condition` until it holds, failing the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {timeout} s")
        time.sleep(0.01)


def is_pending(backend: ResultBackend, task_id: str) -> Callable[[], bool]:
    return lambda: backend.get_meta(task_id)["status"] == states.PENDING


def store_later(backend: ResultBackend, task_id: str, result: Any, state: str) -> threading.Timer:
    """Store a result from another thread shortly after the caller starts waiting."""
    timer = threading.Timer(0.05, backend.store_result, args=(task_id, result, state))
    timer.start()
    return timer


# reading what was never stored -------------------------------------------------------


def test_a_task_never_stored_reads_as_pending_with_celerys_meta_fields(backend: ResultBackend) -> None:
    # Given a backend that never heard of task "nobody"
    # When its meta is read
    meta = backend.get_meta("nobody")
    # Then it is PENDING, laid out as Celery lays it out
    assert meta == {
        "status": states.PENDING,
        "result": None,
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": "nobody",
    }


# successes ---------------------------------------------------------------------------

ROUNDTRIP_VALUES = [
    pytest.param({"total": 3, "items": [{"sku": "a", "price": 1.5, "gift": True}]}, id="dict"),
    pytest.param([1, "two", None, [3.0]], id="list"),
    pytest.param(42, id="int"),
    pytest.param(None, id="none"),
    pytest.param("héllo ✓", id="unicode"),
    pytest.param(datetime(2024, 3, 31, 1, 30, 15, 123456, tzinfo=UTC), id="datetime"),
    pytest.param(Decimal("12.3400"), id="decimal"),
    pytest.param(UUID("7d9f3c0e-5b8a-4f3e-9c1d-2a6b8e4f0a11"), id="uuid"),
    pytest.param(
        {"when": datetime(2024, 1, 2, tzinfo=UTC), "amount": Decimal("-0.01"), "ids": [UUID(int=7)]},
        id="tagged-values-nested",
    ),
]


@pytest.mark.parametrize("value", ROUNDTRIP_VALUES)
def test_a_successful_result_reads_back_equal_and_of_the_same_type(
    backend: ResultBackend, value: Any
) -> None:
    # Given a task that succeeded with `value`
    backend.store_result("t1", value, states.SUCCESS)
    # When its meta is read back
    meta = backend.get_meta("t1")
    # Then the result is the same value, of the same type
    assert meta["status"] == states.SUCCESS
    assert meta["result"] == value
    assert type(meta["result"]) is type(value)
    assert meta["task_id"] == "t1"


def test_extra_fields_are_kept_beside_celerys_fields(backend: ResultBackend) -> None:
    # Given a result stored with extra fields (as a worker stores name, args, ...)
    backend.store_result("t1", 3, states.SUCCESS, extra={"name": "tasks.add", "args": [1, 2]})
    # When it is read back
    meta = backend.get_meta("t1")
    # Then the extra fields are there too
    assert meta["name"] == "tasks.add"
    assert meta["args"] == [1, 2]


# failures ----------------------------------------------------------------------------


def test_a_failure_keeps_the_exception_type_message_module_and_traceback(backend: ResultBackend) -> None:
    # Given a task that failed with ValueError('boom', 42)
    backend.store_result("t1", ValueError("boom", 42), states.FAILURE, traceback="Traceback ...")
    # When its meta is read back
    meta = backend.get_meta("t1")
    # Then it holds Celery's exception fields and the traceback
    assert meta["status"] == states.FAILURE
    assert meta["result"] == {"exc_type": "ValueError", "exc_message": ["boom", 42], "exc_module": "builtins"}
    assert meta["traceback"] == "Traceback ..."
    # And the same exception can be rebuilt from it
    rebuilt = decode_exception(meta["result"])
    assert type(rebuilt) is ValueError
    assert rebuilt.args == ("boom", 42)


def test_a_failure_with_a_users_own_exception_class_rebuilds_that_class(backend: ResultBackend) -> None:
    # Given a task that failed with an exception class from the user's module
    backend.store_result("t1", PaymentDeclined("card expired", 402), states.FAILURE)
    # When it is read back and rebuilt
    rebuilt = decode_exception(backend.get_meta("t1")["result"])
    # Then it is that very class, with the same args
    assert type(rebuilt) is PaymentDeclined
    assert rebuilt.args == ("card expired", 402)


# date_done ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(states.READY_STATES))
def test_date_done_is_a_timezone_aware_iso_time_once_a_task_is_ready(
    backend: ResultBackend, state: str
) -> None:
    # Given a task stored in a ready state
    before = datetime.now(UTC)
    result: Any = RuntimeError("x") if state in states.EXCEPTION_STATES else 1
    backend.store_result("t1", result, state)
    # When its meta is read back
    date_done = backend.get_meta("t1")["date_done"]
    # Then date_done is an ISO time with a timezone, taken at the store
    assert isinstance(date_done, str)
    done = datetime.fromisoformat(date_done)
    assert done.tzinfo is not None
    assert before <= done <= datetime.now(UTC)


@pytest.mark.parametrize("state", [states.STARTED, states.RETRY, states.RECEIVED])
def test_date_done_is_empty_while_a_task_is_not_ready(backend: ResultBackend, state: str) -> None:
    # Given a task stored in an unready state
    backend.store_result("t1", None, state)
    # When its meta is read back
    meta = backend.get_meta("t1")
    # Then it has that state and no date_done
    assert meta["status"] == state
    assert meta["date_done"] is None


# overwriting -------------------------------------------------------------------------


@pytest.mark.parametrize("later", [states.RETRY, states.STARTED, states.FAILURE])
def test_a_stored_success_is_never_overwritten_by_a_later_state(backend: ResultBackend, later: str) -> None:
    # Given a task that succeeded
    backend.store_result("t1", "done", states.SUCCESS)
    # When a late message stores another state for it (a redelivery, a stray retry)
    backend.store_result("t1", RuntimeError("late"), later)
    # Then the success stands
    meta = backend.get_meta("t1")
    assert meta["status"] == states.SUCCESS
    assert meta["result"] == "done"


def test_a_later_state_replaces_an_earlier_unfinished_one(backend: ResultBackend) -> None:
    # Given a task that started, then was retried
    backend.store_result("t1", None, states.STARTED)
    backend.store_result("t1", RuntimeError("flaky"), states.RETRY)
    assert backend.get_meta("t1")["status"] == states.RETRY
    # When it finally succeeds
    backend.store_result("t1", 5, states.SUCCESS)
    # Then the success replaces the retry
    assert backend.get_meta("t1")["result"] == 5


# expiry ------------------------------------------------------------------------------


def test_an_expired_result_reads_back_as_pending(make_backend: MakeBackend) -> None:
    # Given a backend that keeps ready results for a short while
    backend = make_backend(expires=SHORT_EXPIRY)
    # When a result is stored
    stored_at = time.monotonic()
    backend.store_result("t1", 1, states.SUCCESS)
    meta = backend.get_meta("t1")
    # Then it reads back while fresh (checked only when this read beat the expiry)
    if time.monotonic() - stored_at < SHORT_EXPIRY:
        assert meta["status"] == states.SUCCESS
    # And it reads as PENDING once its time is up
    eventually(is_pending(backend, "t1"))


def test_an_unfinished_state_does_not_expire(make_backend: MakeBackend) -> None:
    # Given a backend with a short expiry, one task still running and one finished
    backend = make_backend(expires=SHORT_EXPIRY)
    backend.store_result("running", None, states.STARTED)
    backend.store_result("finished", 1, states.SUCCESS)
    # When the finished one has expired
    eventually(is_pending(backend, "finished"))
    # Then the running one is still there: expiry applies to ready results only
    assert backend.get_meta("running")["status"] == states.STARTED


def test_an_expired_success_may_be_stored_again(make_backend: MakeBackend) -> None:
    # Given a success that has expired
    backend = make_backend(expires=SHORT_EXPIRY)
    backend.store_result("t1", "old", states.SUCCESS)
    eventually(is_pending(backend, "t1"))
    # When the same task id is stored again (as a re-run does)
    backend.store_result("t1", None, states.STARTED)
    # Then the new state is what reads back
    assert backend.get_meta("t1")["status"] == states.STARTED


def test_cleanup_deletes_expired_results_and_counts_them(make_backend: MakeBackend) -> None:
    # Given one expired result and one still running
    backend = make_backend(expires=SHORT_EXPIRY)
    backend.store_result("expired", 1, states.SUCCESS)
    backend.store_result("running", None, states.STARTED)
    eventually(is_pending(backend, "expired"))
    # When cleanup runs
    removed = backend.cleanup()
    # Then it deleted the expired one only (or found it gone already, where the store
    # expires keys itself), and a second run finds nothing
    assert removed == (0 if expires_keys_itself(backend) else 1)
    assert backend.cleanup() == 0
    assert backend.get_meta("running")["status"] == states.STARTED


def test_cleanup_removes_the_sqlite_row_itself(tmp_path: Path) -> None:
    # Given an expired result in a SQLite file
    backend = SQLiteBackend(_sqlite_url(tmp_path), expires=SHORT_EXPIRY)
    try:
        backend.store_result("t1", 1, states.SUCCESS)
        eventually(is_pending(backend, "t1"))
        # When cleanup runs
        backend.cleanup()
    finally:
        backend.close()
    # Then the row is gone from the table, not just hidden
    with sqlite3.connect(tmp_path / "results.db") as connection:
        (count,) = connection.execute("SELECT count(*) FROM celeriac_results").fetchone()
    connection.close()
    assert count == 0


# forget ------------------------------------------------------------------------------


def test_forget_deletes_a_stored_result(backend: ResultBackend) -> None:
    # Given a stored success
    backend.store_result("t1", 1, states.SUCCESS)
    # When it is forgotten
    backend.forget("t1")
    # Then the task reads as never stored, and forgetting again is harmless
    assert backend.get_meta("t1")["status"] == states.PENDING
    backend.forget("t1")


# wait --------------------------------------------------------------------------------


def test_wait_returns_at_once_when_the_result_is_already_there(backend: ResultBackend) -> None:
    # Given a stored success
    backend.store_result("t1", 1, states.SUCCESS)
    # When waiting for it, with no time to spare
    meta = backend.wait("t1", timeout=0, interval=0.5)
    # Then it is returned
    assert meta["result"] == 1


def test_wait_returns_as_soon_as_another_thread_stores_the_result(backend: ResultBackend) -> None:
    # Given a result that another thread stores shortly
    started = time.monotonic()
    timer = store_later(backend, "t1", {"n": 7}, states.SUCCESS)
    try:
        # When waiting for it
        meta = backend.wait("t1", timeout=GENEROUS_TIMEOUT, interval=0.05)
    finally:
        timer.join()
    # Then the wait ends with the result, long before its timeout
    assert meta["status"] == states.SUCCESS
    assert meta["result"] == {"n": 7}
    assert time.monotonic() - started < GENEROUS_TIMEOUT / 2


def test_wait_skips_unready_states_and_returns_a_failure(backend: ResultBackend) -> None:
    # Given a task that is running, and will fail soon in another thread
    backend.store_result("t1", None, states.STARTED)
    timer = store_later(backend, "t1", KeyError("gone"), states.FAILURE)
    try:
        # When waiting for it without a timeout
        meta = backend.wait("t1", timeout=None, interval=0.05)
    finally:
        timer.join()
    # Then the wait returns the failure, not the STARTED state
    assert meta["status"] == states.FAILURE
    assert meta["result"]["exc_type"] == "KeyError"


def test_wait_raises_timeout_error_when_no_result_comes(backend: ResultBackend) -> None:
    # Given a task that is running and will not finish
    backend.store_result("t1", None, states.STARTED)
    started = time.monotonic()
    # When waiting a short while
    with pytest.raises(TimeoutError):
        backend.wait("t1", timeout=0.2, interval=0.05)
    # Then the wait gave up after its timeout, not before
    assert time.monotonic() - started >= 0.2


# serialisation errors ----------------------------------------------------------------


def test_an_unserialisable_result_raises_protocol_error_naming_the_type(backend: ResultBackend) -> None:
    # Given a result JSON cannot express
    # When it is stored
    # Then a ProtocolError says which type it was, and nothing is stored
    with pytest.raises(ProtocolError, match="object"):
        backend.store_result("t1", object(), states.SUCCESS)
    assert backend.get_meta("t1")["status"] == states.PENDING


# threads and processes ---------------------------------------------------------------


def test_many_threads_may_store_and_read_at_once(backend: ResultBackend) -> None:
    # Given eight threads each storing and reading back their own results
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(20):
                backend.store_result(f"{worker}-{n}", n, states.SUCCESS)
                assert backend.get_meta(f"{worker}-{n}")["result"] == n
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    # When they all run at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then none failed, and every result is readable from this thread too
    assert errors == []
    assert all(backend.get_meta(f"{w}-{n}")["result"] == n for w in range(8) for n in range(20))


def test_a_closed_backend_can_be_used_again(backend: ResultBackend) -> None:
    # Given a backend that stored a result and was then closed
    backend.store_result("t1", 1, states.SUCCESS)
    backend.close()
    # When it is used again
    backend.store_result("t2", 2, states.SUCCESS)
    # Then it works, and (for durable backends) still has the first result
    assert backend.get_meta("t2")["result"] == 2


def _read_then_write(url: str) -> None:
    # Runs in a freshly spawned process: nothing is shared with the parent but the file.
    backend = SQLiteBackend(url)
    try:
        seen = backend.get_meta("from-parent")["result"]
        backend.store_result("from-child", {"saw": seen}, states.SUCCESS)
    finally:
        backend.close()


def test_sqlite_results_written_by_one_process_are_read_by_another(tmp_path: Path) -> None:
    # Given a result stored by this process
    url = _sqlite_url(tmp_path)
    backend = SQLiteBackend(url)
    try:
        backend.store_result("from-parent", "hello", states.SUCCESS)
        # When another process reads it and stores its own
        child = multiprocessing.get_context("spawn").Process(target=_read_then_write, args=(url,))
        child.start()
        child.join(GENEROUS_TIMEOUT)
        # Then the child saw ours, and we see the child's
        assert child.exitcode == 0
        assert backend.get_meta("from-child")["result"] == {"saw": "hello"}
    finally:
        backend.close()


def _use_inherited(backend: SQLiteBackend) -> None:
    # Runs in a forked child holding the parent's backend object (and its open connection).
    seen = backend.get_meta("from-parent")["result"]
    backend.store_result("from-child", {"saw": seen}, states.SUCCESS)
    backend.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_a_forked_child_opens_its_own_sqlite_connection(sqlite_backend: SQLiteBackend) -> None:
    # Given a backend whose connection is open in this process
    sqlite_backend.store_result("from-parent", "hello", states.SUCCESS)
    # When a forked child uses the very same backend object
    child = multiprocessing.get_context("fork").Process(target=_use_inherited, args=(sqlite_backend,))
    child.start()
    child.join(GENEROUS_TIMEOUT)
    # Then the child worked, and our own connection is unharmed
    assert child.exitcode == 0
    assert sqlite_backend.get_meta("from-child")["result"] == {"saw": "hello"}
    sqlite_backend.store_result("after", 1, states.SUCCESS)
    assert sqlite_backend.get_meta("after")["result"] == 1


def test_the_sqlite_backend_shares_its_file_with_other_tables(tmp_path: Path) -> None:
    # Given a database file that already holds someone else's table (a SQLite broker's)
    path = tmp_path / "results.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body BLOB)")
        connection.execute("INSERT INTO messages (body) VALUES (x'00')")
    connection.close()
    # When the backend stores results in the same file
    backend = SQLiteBackend(f"db+sqlite:///{path}")
    try:
        backend.store_result("t1", 1, states.SUCCESS)
        assert backend.get_meta("t1")["result"] == 1
    finally:
        backend.close()
    # Then the other table is untouched
    with sqlite3.connect(path) as connection:
        (count,) = connection.execute("SELECT count(*) FROM messages").fetchone()
    connection.close()
    assert count == 1


# the registry ------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "", "disabled"])
def test_no_backend_is_created_when_results_are_disabled(url: str | None) -> None:
    # Given a result_backend setting that turns results off
    # When a backend is created from it
    # Then there is none
    assert create_backend(url) is None


def test_an_unknown_scheme_is_refused_naming_the_supported_ones() -> None:
    # Given a URL whose scheme no backend claims
    # When a backend is created from it
    with pytest.raises(ImproperlyConfigured) as raised:
        create_backend("couchbase://somewhere")
    # Then the error names the scheme and every supported one
    message = str(raised.value)
    assert "couchbase" in message
    assert all(scheme in message for scheme in ["memory", "cache+memory", "sqlite", "db+sqlite", "redis"])


# A URL of each scheme; none is connected to by the test below.
EXAMPLE_URLS = {
    "redis+socket": "redis+socket:///var/run/redis/redis.sock",
    "sentinel": "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/10",
}
EXAMPLE_OPTIONS = {"sentinel": {"master_name": "mymaster"}}


@pytest.mark.parametrize("scheme", supported_schemes())
def test_every_supported_scheme_builds_a_backend_that_claims_it(scheme: str, tmp_path: Path) -> None:
    # Given a URL of each supported scheme
    url = f"{scheme}:///{tmp_path / 'results.db'}" if "sqlite" in scheme else f"{scheme}://"
    url = EXAMPLE_URLS.get(scheme, url)
    # When a backend is created from it
    backend = create_backend(
        url, serializer="json", expires=60, accept=["json"], options=EXAMPLE_OPTIONS.get(scheme)
    )
    assert backend is not None
    try:
        # Then its class lists that scheme, and it took the settings it was given
        assert scheme in type(backend).schemes
        assert backend.expires == 60
        assert backend.accept == frozenset({"application/json"})
    finally:
        backend.close()


def test_a_relative_sqlite_path_is_resolved_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Celery's spelling of a relative SQLite URL, in some directory
    monkeypatch.chdir(tmp_path)
    # When a backend is created from it and used
    backend = create_backend("db+sqlite:///results.db")
    assert isinstance(backend, SQLiteBackend)
    try:
        backend.store_result("t1", 1, states.SUCCESS)
    finally:
        backend.close()
    # Then the file is in that directory
    assert backend.path == str(tmp_path / "results.db")
    assert (tmp_path / "results.db").exists()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/results.db"])
def test_a_sqlite_url_that_names_no_file_is_refused(url: str) -> None:
    # Given a SQLite URL without a usable file path
    # When a backend is created from it
    # Then the error shows the spellings that work
    with pytest.raises(ImproperlyConfigured, match=re.escape("sqlite:///relative.db")):
        create_backend(url)


def test_a_chord_completes_exactly_once_with_its_parts_in_index_order(backend: ResultBackend) -> None:
    # Given a chord of 12 header tasks
    group_id = f"chord-{uuid.uuid4()}"
    backend.set_chord_size(group_id, 12)
    completions: list[list[dict[str, Any]]] = []
    lock = threading.Lock()

    def report(index: int) -> None:
        state = "FAILURE" if index == 5 else "SUCCESS"
        result: Any = ValueError("boom", index) if index == 5 else index * 10
        parts = backend.chord_part_done(group_id, index, f"t{index}", state, result)
        if parts is not None:
            with lock:
                completions.append(parts)

    # When every header task reports, from many threads at once and out of order
    threads = [threading.Thread(target=report, args=(index,)) for index in reversed(range(12))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then exactly one report completed the chord, and it got every part in index order
    assert len(completions) == 1
    parts = completions[0]
    assert [part["task_id"] for part in parts] == [f"t{index}" for index in range(12)]
    assert parts[0] == {"status": "SUCCESS", "result": 0, "task_id": "t0"}
    assert parts[5]["status"] == "FAILURE"
    assert parts[5]["result"]["exc_type"] == "ValueError"


def test_a_repeated_report_of_one_header_task_is_counted_once(backend: ResultBackend) -> None:
    # Given a chord of two
    group_id = f"chord-{uuid.uuid4()}"
    backend.set_chord_size(group_id, 2)
    # When the first task reports twice (a redelivered message), then the second once
    assert backend.chord_part_done(group_id, 0, "a", "SUCCESS", 1) is None
    assert backend.chord_part_done(group_id, 0, "a", "SUCCESS", 1) is None
    parts = backend.chord_part_done(group_id, 1, "b", "SUCCESS", 2)
    # Then the chord completes on the second task's report, with two parts
    assert parts is not None
    assert [part["result"] for part in parts] == [1, 2]
