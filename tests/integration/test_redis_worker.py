"""Real workers on the Redis broker and the Redis result backend: the round trip, and reliability.

Every test runs `celeriac worker` subprocesses against database 12 of the Redis at
127.0.0.1:6379, emptied before and after each test, and looks at the broker's keys with a
raw redis-py client (the layout is in celeriac/brokers/redis.py's header). Tasks record
each run by appending a line to a file in the project folder and block, where a test
needs them to, until the test creates a "release" file; the tests wait on those files,
on log lines and on Redis state, never on guessed sleeps.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celeriac import states
from celeriac.exceptions import NotRegistered, WorkerLostError
from tests.conftest import Project, WorkerProcess, require_service, wait_until

REDIS_URL = "redis://127.0.0.1:6379/12"  # this suite's own database
QUEUE = "celery"
DELAYED = f"celeriac.delayed.{QUEUE}"
DEAD = "celeriac.dead"
INFLIGHT_PREFIX = "celeriac.inflight."
CONSUMERS = "celeriac.consumers"
# A dead worker's lease lapses after this many seconds; a live worker's heartbeat then returns its messages.
FAST_LEASES = {"lease_timeout": 2.0}
ProjectFactory = Callable[..., Project]

TASKS = """
@app.task
def add(x, y):
    return x + y


@app.task
def fail(message):
    raise ValueError(message)


@app.task(bind=True, max_retries=3)
def flaky(self, key):
    record("runs", f"{key} {time.time()!r}")
    if self.request.retries < 1:
        raise self.retry(countdown=1)
    return self.request.retries


@app.task(bind=True, acks_late=True)
def late(self, key):
    record("runs", f"{key} redelivered={self.request.delivery_info['redelivered']}")
    wait_for_file("release")
    return f"done {key}"


@app.task
def early(key):
    record("runs", key)
    wait_for_file("release")
    return f"done {key}"


@app.task
def quick(key):
    record("runs", key)
    return f"done {key}"


@app.task(acks_late=True)
def slow(key, seconds):
    record("runs", key)
    time.sleep(seconds)
    return f"done {key}"


@app.task
def stamped(key):
    record("runs", f"{key} {time.time()!r}")
    return f"done {key}"


@app.task
def gated(index):
    record("runs", index)
    wait_for_file("go")
    return index
"""


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain client on the suite's database, emptied before and after the test."""
    require_service("Redis", "127.0.0.1", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def on_redis(make_project: ProjectFactory, raw: redis.Redis) -> Callable[..., Project]:
    """Build a project whose broker and result backend are the suite's Redis database."""

    def build(**options: Any) -> Project:
        return make_project(
            TASKS,
            broker=REDIS_URL,
            backend=REDIS_URL,
            broker_transport_options=options.pop("broker_transport_options", FAST_LEASES),
            **options,
        )

    return build


def runs(project: Project) -> list[str]:
    """The keys of every task run so far, in the order they started."""
    return project.lines("runs")


def queued(raw: redis.Redis) -> int:
    """How many messages wait in the `celery` list (priority 0, where these tests publish)."""
    return int(raw.llen(QUEUE))


def in_flight(raw: redis.Redis) -> int:
    """How many messages are leased to any consumer right now."""
    return sum(int(raw.llen(key)) for key in raw.scan_iter(f"{INFLIGHT_PREFIX}*"))


def live_consumers(raw: redis.Redis) -> int:
    """How many consumers hold a lease that has not lapsed (by the Redis server's clock)."""
    seconds, micros = raw.time()
    return int(raw.zcount(CONSUMERS, f"({seconds + micros / 1e6!r}", "+inf"))


def all_acked(raw: redis.Redis) -> None:
    """Wait until nothing is leased (a late ack may follow the logged success by a moment)."""
    wait_until(lambda: in_flight(raw) == 0, 20, "every leased message to be acked")


def dead_records(raw: redis.Redis) -> list[dict[str, Any]]:
    """The dead-letter records, oldest first."""
    return [json.loads(record) for record in reversed(raw.lrange(DEAD, 0, -1))]


def exits_within(worker: WorkerProcess, timeout: float) -> int:
    """Wait for the worker process to exit; fail with its output if it does not."""
    try:
        return worker.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still running after {timeout}s; output:\n{worker.output}") from None


def envelope(task_name: str, task_id: str, args: list[Any]) -> bytes:
    """A kombu envelope as Celery would LPUSH it (wire spec section 2.1), built by hand."""
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(tuple(args)),
        "kwargsrepr": "{}",
        "origin": "gen0@test",
        "ignore_result": False,
    }
    properties = {
        "correlation_id": task_id,
        "reply_to": str(uuid.uuid4()),
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": QUEUE},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    document = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return json.dumps(document).encode()


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_the_guide_round_trip_works_on_redis(
    on_redis: Callable[..., Project], raw: redis.Redis, pool: str
) -> None:
    # Given a worker on the Redis broker with the Redis result backend
    project = on_redis()
    project.worker(pool=pool)
    tasks = project.module

    # When a task is called, another fails, and a third retries itself once after a 1 s countdown
    added = tasks.add.delay(4, 4)
    failed = tasks.fail.delay("boom")
    retried = tasks.flaky.delay("k")

    # Then the caller gets the sum, the failure re-raised, and the retry's eventual result
    assert added.get(timeout=20) == 8
    assert added.state == states.SUCCESS
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=20)
    assert failed.state == states.FAILURE
    assert retried.get(timeout=20) == 1
    assert retried.state == states.SUCCESS
    # And the retry ran a second time, once its countdown had passed
    (first_key, first_at), (second_key, second_at) = (line.split() for line in runs(project))
    assert first_key == second_key == "k"
    assert float(second_at) - float(first_at) >= 0.9
    # And nothing is left waiting or leased
    assert queued(raw) == 0
    all_acked(raw)


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_an_acks_late_task_whose_worker_is_killed_mid_run_completes_on_a_second_worker(
    on_redis: Callable[..., Project], raw: redis.Redis, pool: str
) -> None:
    # Given an acks_late task running (and blocked) on a worker whose lease lasts 2 s
    project = on_redis()
    first = project.worker(pool=pool)
    result = project.module.late.delay("a")
    wait_until(lambda: runs(project) == ["a redelivered=False"], 20, "the task to start on the first worker")
    assert in_flight(raw) == 1

    # When that worker is SIGKILLed mid-run and a second worker starts
    first.kill()
    project.release()
    second = project.worker(pool=pool)

    # Then the second worker gets the message back once the dead worker's lease lapses, and says so
    assert result.get(timeout=30) == "done a"
    assert result.state == states.SUCCESS
    second.wait_for("Returned 1 message(s) of a lost worker to their queues")
    second.wait_for(f"Task {project.module.late.name}[{result.id}] succeeded")
    # And the task saw, on its second run, that the message was a redelivery
    assert runs(project) == ["a redelivered=False", "a redelivered=True"]
    assert first.count("succeeded") == 0
    assert queued(raw) == 0
    all_acked(raw)


def test_a_task_longer_than_several_leases_is_never_delivered_twice_while_its_worker_lives(
    on_redis: Callable[..., Project], raw: redis.Redis
) -> None:
    # Given a worker and a second, idle worker heartbeating on the same Redis, with 1 s leases
    project = on_redis(broker_transport_options={"lease_timeout": 1.0})
    busy = project.worker(concurrency=1)
    idle = project.worker(concurrency=1)

    # When an acks_late task runs for 4 s (four lease timeouts) on one of them
    result = project.module.slow.delay("long", 4.0)
    wait_until(lambda: runs(project) == ["long"], 20, "the task to start")
    assert live_consumers(raw) >= 2  # both workers hold a lease, so both heartbeat

    # Then it completes once: the living worker's heartbeat kept its lease, nobody took the message back
    assert result.get(timeout=30) == "done long"
    assert runs(project) == ["long"]
    wait_until(lambda: busy.count("succeeded") + idle.count("succeeded"), 20, "the success to be logged")
    assert busy.count("succeeded") + idle.count("succeeded") == 1
    assert busy.count("received") + idle.count("received") == 1
    assert busy.count("lost worker") == idle.count("lost worker") == 0
    assert queued(raw) == 0
    all_acked(raw)


def test_a_prefetched_message_of_a_killed_worker_is_run_by_another_worker(
    on_redis: Callable[..., Project], raw: redis.Redis
) -> None:
    # Given a one-thread worker running an early-acked task that blocks, with a second message
    # prefetched (a prefork child gives such messages back once its task runs long)
    project = on_redis()
    first = project.worker(pool="threads", concurrency=1)
    started = project.module.early.delay("started")
    wait_until(lambda: runs(project) == ["started"], 20, "the first task to start")
    prefetched = project.module.quick.delay("prefetched")
    first.wait_for(f"[{prefetched.id}] received")
    assert queued(raw) == 0
    assert in_flight(raw) == 1  # leased to the first worker, not waiting; the started one was acked

    # When the worker is SIGKILLed and another worker starts
    first.kill()
    project.release()
    second = project.worker(pool="threads", concurrency=1)

    # Then the prefetched message comes back and runs on the second worker
    assert prefetched.get(timeout=30) == "done prefetched"
    second.wait_for("Returned 1 message(s) of a lost worker to their queues")
    # And the started task, acked before it ran (early ack), is not run again
    assert project.module.quick.delay("follow-up").get(timeout=20) == "done follow-up"
    assert runs(project) == ["started", "prefetched", "follow-up"]
    assert started.state == states.PENDING
    assert queued(raw) == 0
    all_acked(raw)


def test_a_message_redelivered_more_often_than_allowed_is_dead_lettered_and_fails(
    on_redis: Callable[..., Project], raw: redis.Redis
) -> None:
    # Given workers that allow two deliveries of a message, and an acks_late task whose workers die
    project = on_redis(broker_transport_options={"lease_timeout": 1.0}, worker_max_deliveries=2)
    result = project.module.late.delay("doomed")
    first = project.worker(pool="solo")
    wait_until(lambda: len(runs(project)) == 1, 20, "the first delivery to run")
    first.kill()
    second = project.worker(pool="solo")
    wait_until(lambda: len(runs(project)) == 2, 20, "the second delivery to run")
    second.kill()

    # When a third worker gets the message a third time
    third = project.worker(pool="solo")

    # Then it does not run it but moves it to the dead letters, saying why, and the result is a failure
    third.wait_for("moved to the dead-letter queue")
    (record,) = wait_until(lambda: dead_records(raw), 20, "a dead-letter record")
    assert record["queue"] == QUEUE
    assert record["reason"] == "delivered 3 times without completing (max_deliveries)"
    assert json.loads(record["payload"])["headers"]["id"] == result.id
    with pytest.raises(WorkerLostError, match="max_deliveries"):
        result.get(timeout=20)
    assert result.state == states.FAILURE
    assert runs(project) == ["doomed redelivered=False", "doomed redelivered=True"]
    assert queued(raw) == 0
    all_acked(raw)
    # And the third worker goes on serving
    assert project.module.add.delay(1, 2).get(timeout=20) == 3


def test_a_counted_down_task_waits_in_the_delayed_set_and_runs_once_when_due(
    on_redis: Callable[..., Project], raw: redis.Redis
) -> None:
    # Given two workers consuming the same queue
    project = on_redis()
    workers = [project.worker(), project.worker()]

    # When a task is sent with a 3 s countdown
    sent_at = time.time()
    result = project.module.stamped.apply_async(("later",), countdown=3)

    # Then a worker parks it in the queue's delayed set: not waiting in the list, not leased
    wait_until(lambda: raw.zcard(DELAYED) == 1, 20, "the message to be parked in the delayed set")
    ((payload, due),) = raw.zrange(DELAYED, 0, -1, withscores=True)
    assert json.loads(payload)["headers"]["id"] == result.id
    assert sent_at + 3 - 0.5 <= due <= sent_at + 3 + 0.5  # parked until its eta
    assert queued(raw) == 0
    assert in_flight(raw) == 0
    assert result.state == states.PENDING
    # And it runs once it is due, exactly once across both workers
    assert result.get(timeout=30) == "done later"
    ((key, ran_at),) = (line.split() for line in runs(project))
    assert key == "later"
    assert float(ran_at) >= sent_at + 3 - 0.05  # clock granularity aside, not before its eta
    succeeded = f"[{result.id}] succeeded"
    wait_until(lambda: sum(worker.count(succeeded) for worker in workers), 20, "the success to be logged")
    assert sum(worker.count(succeeded) for worker in workers) == 1
    assert sum(worker.count(f"[{result.id}] received") for worker in workers) == 1
    assert raw.zcard(DELAYED) == 0
    assert queued(raw) == 0


def test_an_unknown_task_and_a_non_json_payload_are_dead_lettered_and_the_worker_keeps_going(
    on_redis: Callable[..., Project], raw: redis.Redis
) -> None:
    # Given a worker on the Redis broker
    project = on_redis()
    worker = project.worker()

    # When an envelope naming a task nobody registered, then bytes that are not JSON, are pushed raw
    unknown_id = str(uuid.uuid4())
    raw.lpush(QUEUE, envelope("no.such.task", unknown_id, [1]))
    raw.lpush(QUEUE, b"\xffnot json{")

    # Then both land in the dead letters, kept as they came, each with its reason
    # (two children consume at once, so the order of the two records is not known)
    records = wait_until(lambda: len(dead_records(raw)) == 2 and dead_records(raw), 20, "two dead letters")
    unknown, garbage = sorted(records, key=lambda record: record.get("payload_encoding") == "hex")
    assert unknown["queue"] == garbage["queue"] == QUEUE
    assert unknown["reason"] == "NotRegistered: no task named 'no.such.task' in this worker"
    assert json.loads(unknown["payload"])["headers"]["id"] == unknown_id
    assert garbage["reason"].startswith("undecodable message")
    assert bytes.fromhex(garbage["payload"]) == b"\xffnot json{"
    assert garbage["payload_encoding"] == "hex"
    wait_until(lambda: worker.count("moved to the dead-letter queue") == 2, 20, "both to be logged")
    # And the unknown task's result is a failure naming it
    unknown_result = project.app.AsyncResult(unknown_id)
    with pytest.raises(NotRegistered, match=r"no\.such\.task"):
        unknown_result.get(timeout=20)
    # And the worker keeps serving
    assert project.module.add.delay(20, 22).get(timeout=20) == 42
    assert worker.proc.poll() is None
    assert queued(raw) == 0
    all_acked(raw)


def test_a_warm_shutdown_returns_prefetched_messages_and_nothing_runs_twice(
    on_redis: Callable[..., Project], raw: redis.Redis
) -> None:
    # Given twelve gated tasks and a two-child prefork worker where each child prefetches four:
    # two tasks running, and the six messages held behind them given back for idle workers
    project = on_redis()
    results = [project.module.gated.delay(index) for index in range(12)]
    first = project.worker("--prefetch-multiplier", "4", concurrency=2)
    wait_until(lambda: len(runs(project)) == 2, 20, "two tasks to start")
    wait_until(lambda: first.count("received") == 8, 20, "the children to prefetch eight")
    held_back = "Returned 3 prefetched message(s) to the queue while a long task runs"
    wait_until(lambda: first.count(held_back) == 2, 20, "both children to give back what they hold")
    assert queued(raw) == 10
    assert in_flight(raw) == 0  # the running tasks were acked before they started

    # When the worker is asked to stop (SIGTERM)
    first.signal(signal.SIGTERM)
    first.wait_for("worker: Warm shutdown (MainProcess)")
    assert first.proc.poll() is None  # it waits for its running tasks

    # Then once the running tasks may finish it exits cleanly, having run only what it had started
    project.release("go")
    assert exits_within(first, 30) == 0
    assert first.count("succeeded") == 2
    assert first.count("received") == 8
    assert in_flight(raw) == 0
    assert queued(raw) == 10

    # And a second worker finishes the rest: every task succeeded, each exactly once
    second = project.worker("--prefetch-multiplier", "4", concurrency=2)
    assert [result.get(timeout=30) for result in results] == list(range(12))
    wait_until(lambda: second.count("succeeded") >= 10, 20, "the second worker to log its successes")
    assert second.count("succeeded") == 10
    counts = Counter(int(line) for line in runs(project))
    assert sorted(counts) == list(range(12))
    assert set(counts.values()) == {1}
    assert queued(raw) == 0
    all_acked(raw)
