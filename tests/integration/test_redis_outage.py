"""Redis going away and coming back under a running worker, a producer and a result waiter.

Each test starts its own `redis-server` on a free port, in a scratch folder, keeping nothing on
disk (`--save '' --appendonly no`), and kills it with SIGKILL to simulate a crash; the shared
Redis on 6379 is never touched. A killed server comes back empty (one test SAVEs a snapshot
on purpose), so what was queued before the crash is gone with it: these tests check that the
clients notice the outage, say so, reconnect and serve again, not that a crash keeps data.
They wait on log lines, on the server answering and on its pub/sub state and clock, never on
guessed sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from celeriac import states
from celeriac.brokers.base import Outgoing
from celeriac.brokers.redis import RedisBroker
from celeriac.exceptions import OperationalError
from tests.conftest import Project, wait_until
from tests.contracts.test_broker import envelope, text_of

QUEUE = "celery"
ProjectFactory = Callable[..., Project]

TASKS = """
@app.task
def add(x, y):
    return x + y


@app.task(acks_late=True)
def late(key):
    record("runs", key)
    wait_for_file("release")
    return f"done {key}"


@app.task
def early(key):
    record("runs", key)
    wait_for_file("release")
    return f"done {key}"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, killed (SIGKILL) and started again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--save", "", "--appendonly", "no", "--logfile", str(self.folder / "redis.log")]
        args += ["--enable-debug-command", "local"]  # DEBUG SLEEP stalls the server
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 20, f"redis-server on port {self.port} to answer")

    def kill(self) -> None:
        """Crash the server: SIGKILL, and wait until it is gone and its port is closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=20)
        wait_until(lambda: not self.answers(), 20, f"port {self.port} to close")

    def answers(self) -> bool:
        """Whether the server answers a PING now (one try: redis-py's own retries would take seconds)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        # Like require_service: skip loudly here, fail under CI.
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on PATH, and CI requires it")
        pytest.skip("redis-server is not on PATH: install Redis to run these tests")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=20)


def on_private_redis(make_project: ProjectFactory, server: PrivateRedis, **settings: object) -> Project:
    return make_project(
        TASKS,
        broker=server.url,
        backend=server.url,
        broker_transport_options={"lease_timeout": 2.0},
        **settings,
    )


def test_a_worker_rides_out_a_redis_restart_and_goes_on_consuming(
    make_project: ProjectFactory, private_redis: PrivateRedis
) -> None:
    # Given a worker on a private Redis, serving tasks
    project = on_private_redis(make_project, private_redis)
    worker = project.worker()
    assert project.module.add.delay(1, 1).get(timeout=20) == 2

    # When the server crashes (SIGKILL) and, once the worker has noticed, starts again on the same port
    private_redis.kill()
    outage = worker.wait_for("consumer: Cannot reach the broker at", timeout=30)
    private_redis.start()

    # Then the worker logged the outage with where and what, and logs that it is connected again
    assert f"127.0.0.1:{private_redis.port}" in outage
    assert "Trying again in" in outage
    worker.wait_for(f"consumer: Connected to {private_redis.url} again", timeout=30)
    # And it is still the same process, and runs a task sent after the restart
    assert worker.proc.poll() is None
    after = project.module.add.delay(2, 3)
    assert after.get(timeout=30) == 5
    assert after.state == states.SUCCESS
    worker.wait_for(f"[{after.id}] succeeded")
    # And its ack reached the restarted server: nothing stays leased
    client = private_redis.client()
    try:
        wait_until(
            lambda: not list(client.scan_iter("celeriac.inflight.*")), 20, "the in-flight lists to empty"
        )
        assert client.llen(QUEUE) == 0
    finally:
        client.close()


def test_a_producer_gets_an_operational_error_while_redis_is_down_and_sends_again_once_it_is_back(
    make_project: ProjectFactory, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an app on a private Redis that has published once, and one that never retries a publish
    project = on_private_redis(make_project, private_redis)
    impatient = on_private_redis(make_project, private_redis, task_publish_retry=False)
    project.module.add.delay(0, 0)
    impatient.module.add.delay(0, 0)

    # When the server is down and each sends a task
    private_redis.kill()
    caplog.set_level(logging.WARNING, logger="celeriac.sending")
    started = time.monotonic()
    with pytest.raises(OperationalError) as retried:
        project.module.add.delay(1, 2)
    retried_for = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(OperationalError) as at_once:
        impatient.module.add.delay(1, 2)
    failed_for = time.monotonic() - started

    # Then the default policy retried three times (Celery's 0 s, 0.2 s, 0.2 s pauses) and gave up
    # within a bounded time, saying the broker could not be reached
    message = str(retried.value).lower()
    assert message.startswith("could not publish to the broker after 4 attempts")
    assert f"cannot reach the redis broker at {private_redis.url}" in message
    assert retried_for < 10
    retry_logs = [
        r for r in caplog.records if r.getMessage().startswith("Broker unreachable while publishing")
    ]
    assert len(retry_logs) == 3
    # And without retries the error comes at once, after one attempt
    message = str(at_once.value).lower()
    assert message.startswith("could not publish to the broker after 1 attempts")
    assert f"cannot reach the redis broker at {private_redis.url}" in message
    assert failed_for < 2

    # And once the server is back, the same app objects publish again
    private_redis.start()
    sent = [project.module.add.delay(3, 4), impatient.module.add.delay(5, 6)]
    client = private_redis.client()
    try:
        waiting = [bytes(payload) for payload in client.lrange(QUEUE, 0, -1)]
    finally:
        client.close()
    assert len(waiting) == 2
    assert all(any(result.id.encode() in payload for payload in waiting) for result in sent)


def server_time(client: redis.Redis) -> float:
    """The Redis server's clock, which leases are measured by."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_broker_stall_shorter_than_the_lease_does_not_run_a_running_task_twice(
    make_project: ProjectFactory, private_redis: PrivateRedis, pool: str
) -> None:
    # Given an acks_late task running (and blocked) on a worker with 2 s leases and a 0.3 s socket
    # timeout (on prefork the child fetches under an id its parent renews; on threads the worker
    # process fetches and renews its own)
    lease = 2.0
    project = make_project(
        TASKS,
        broker=private_redis.url,
        backend=private_redis.url,
        broker_transport_options={"lease_timeout": lease, "socket_timeout": 0.3},
    )
    worker = project.worker(pool=pool)
    result = project.module.late.delay("once")
    wait_until(lambda: project.lines("runs") == ["once"], 20, "the task to start")
    client = private_redis.client()
    try:
        # When the server stalls for 1 s (half a lease): longer than the worker's 0.5 s between fetches
        # plus its socket timeout, so a fetch surely fails
        client.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        worker.wait_for("consumer: Cannot reach the broker at", timeout=20)
        worker.wait_for(f"consumer: Connected to {private_redis.url} again", timeout=20)
        # and the worker then lives on for one and a half leases (heartbeats come every third of a lease)
        until = server_time(client) + 1.5 * lease
        wait_until(lambda: server_time(client) > until, 4 * lease, "a lease and a half to pass")

        # Then the running task was not handed out again: its worker never stopped renewing its lease
        assert worker.count("lost worker") == 0
        assert project.lines("runs") == ["once"]
    finally:
        client.close()
    project.release()
    assert result.get(timeout=20) == "done once"
    assert project.lines("runs") == ["once"]


def stalled(server: PrivateRedis) -> bool:
    """Whether the server fails to answer a PING within 50 ms (it is busy, not down)."""
    client = redis.Redis.from_url(server.url, socket_timeout=0.05)
    try:
        client.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        client.close()


def test_messages_a_fetch_leased_after_losing_its_reply_go_back_unchanged_while_held_ones_stay(
    private_redis: PrivateRedis,
) -> None:
    # Given a consumer with a 0.3 s socket timeout holding a message (a running task's) and
    # one that another process (a pool child) has acked, and two messages waiting
    broker = RedisBroker(private_redis.url, {"socket_timeout": 0.3, "lease_timeout": 2.0})
    other = RedisBroker(private_redis.url)
    client = private_redis.client()
    try:
        broker.publish([Outgoing(QUEUE, envelope("held")), Outgoing(QUEUE, envelope("acked elsewhere"))])
        held, acked = broker.fetch([QUEUE], 2, timeout=1)
        other.ack([acked])
        waiting = [envelope("a"), envelope("b")]
        broker.publish([Outgoing(QUEUE, payload) for payload in waiting])
        consumer_id, inflight = broker.consumer_id, f"celeriac.inflight.{broker.consumer_id}"

        # When the server stalls for 1 s, so the consumer's next fetch times out, and the server
        # runs that fetch once the stall ends: its messages are leased, but their reply is lost
        sleeper = threading.Thread(target=lambda: private_redis.client().execute_command("DEBUG", "SLEEP", 1))
        sleeper.start()
        wait_until(lambda: stalled(private_redis), 5, "the server to stall")
        with pytest.raises(OperationalError):
            broker.fetch([QUEUE], 10, timeout=0)
        sleeper.join(10)
        wait_until(lambda: client.llen(inflight) == 3, 5, "the lost fetch to run")
        assert client.llen(QUEUE) == 0

        # Then the consumer's next fetch gets them, byte for byte, as first deliveries, in order
        fetched = broker.fetch([QUEUE], 10, timeout=1)
        assert [(text_of(d), d.attempts, d.payload) for d in fetched] == [
            ("a", 1, waiting[0]),
            ("b", 1, waiting[1]),
        ]
        # And the held message stayed leased to the same consumer, never returned to the queue
        assert broker.consumer_id == consumer_id
        assert sorted(client.lrange(inflight, 0, -1)) == sorted([held.payload, *waiting])
        assert client.llen(QUEUE) == 0
        broker.ack([held, *fetched])
        assert client.llen(inflight) == 0
    finally:
        client.close()
        broker.close()
        other.close()


def subscribers(client: redis.Redis, channel: str) -> int:
    """How many connections the server has subscribed to `channel` (0 while it is down)."""
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    except redis.ConnectionError:
        return 0


def gets(client: redis.Redis) -> int:
    """How many GET commands the server has run since it started."""
    stats = client.info("commandstats").get("cmdstat_get") or {}
    return int(stats.get("calls", 0))


def test_a_result_waiter_receives_a_result_stored_by_a_worker_after_the_backend_redis_restarted(
    make_project: ProjectFactory, private_redis: PrivateRedis
) -> None:
    # Given a task running (and blocked) on a worker, early-acked so the broker no longer holds it,
    # and a caller waiting for its result on the backend's pub/sub
    project = on_private_redis(make_project, private_redis)
    project.worker()
    result = project.module.early.delay("survivor")
    wait_until(lambda: project.lines("runs") == ["survivor"], 20, "the task to start")
    channel = f"celery-task-meta-{result.id}"
    client = private_redis.client()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiter = pool.submit(result.get, timeout=60)
            wait_until(lambda: subscribers(client, channel) == 1, 20, "the waiter to subscribe")

            # When the Redis server crashes and comes back (empty) while the task still runs,
            # and the task then finishes and its worker stores the result on the restarted server
            private_redis.kill()
            private_redis.start()
            project.release()

            # Then the waiter gets the result, whether its listener had re-subscribed before the
            # worker's PUBLISH or read the key after re-subscribing
            assert waiter.result(timeout=60) == "done survivor"
    finally:
        client.close()
    assert result.state == states.SUCCESS
    assert project.lines("runs") == ["survivor"]


def test_a_result_stored_while_the_waiter_was_disconnected_is_read_once_it_reconnects(
    make_project: ProjectFactory, private_redis: PrivateRedis
) -> None:
    # Given a caller waiting for a result on the backend's pub/sub (no worker: the test writes it)
    project = on_private_redis(make_project, private_redis)
    task_id = str(uuid.uuid4())
    result = project.app.AsyncResult(task_id)
    key = f"celery-task-meta-{task_id}"
    client = private_redis.client()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiter = pool.submit(result.get, timeout=60)
            wait_until(lambda: subscribers(client, key) == 1, 20, "the waiter to subscribe")
            # (it has read the key twice: before subscribing, and once the subscription was live)
            wait_until(lambda: gets(client) >= 2, 20, "the waiter to read the key")

            # When the result is stored without a PUBLISH the waiter could hear (as when the publish
            # happened while its connection was down) and the server restarts with it already
            # loaded from a snapshot, so nothing is ever published to the reconnected listener
            document = {
                "status": "SUCCESS",
                "result": 42,
                "traceback": None,
                "children": [],
                "date_done": "2026-01-01T00:00:00.000000+00:00",
                "task_id": task_id,
            }
            client.set(key, json.dumps(document))
            client.save()
            assert not waiter.done()
            private_redis.kill()
            private_redis.start()

            # Then the waiter, reading the key again after its listener reconnected, gets the result
            assert waiter.result(timeout=30) == 42
    finally:
        client.close()
    assert result.state == states.SUCCESS
