"""Nothing is lost and nothing runs twice that should not: workers that die, restart or shut down.

Every test runs real `celeriac worker` subprocesses on a real SQLite broker. Tasks record each
run by appending a line to a file in the project folder, and block, where a test needs them
to, until the test creates a "release" file; the tests wait on those files, on log lines and
on broker and backend state, never on guessed sleeps.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from collections.abc import Callable

import pytest

from celeriac import states
from tests.conftest import Project, WorkerProcess, wait_until

# A dead worker's leases lapse after this many seconds; a live worker's heartbeat then returns them.
FAST_LEASES = {"lease_timeout": 2.0, "polling_interval": 0.05}
QUEUE = "celery"
ProjectFactory = Callable[..., Project]

TASKS = """
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


@app.task
def quick(key):
    record("runs", key)
    return f"done {key}"


@app.task
def batch(index):
    record("runs", index)
    if index >= 50:
        wait_for_file("go")
    time.sleep(0.005)
    return index
"""


def runs(project: Project) -> list[str]:
    """The keys of every task run so far, in the order they started."""
    return project.lines("runs")


def exits_within(worker: WorkerProcess, timeout: float) -> int:
    """Wait for the worker process to exit; fail with its output if it does not."""
    try:
        return worker.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still running after {timeout}s; output:\n{worker.output}") from None


def release(project: Project, name: str = "release") -> None:
    """Create the file that blocked tasks wait for."""
    project.release(name)


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_an_acks_late_task_whose_worker_is_killed_mid_run_completes_on_another_worker(
    make_project: ProjectFactory, pool: str
) -> None:
    # Given an acks_late task running (and blocked) on a worker
    project = make_project(TASKS, broker_transport_options=FAST_LEASES)
    first = project.worker(pool=pool)
    result = project.module.late.delay("a")
    wait_until(lambda: runs(project) == ["a"], 20, "the task to start on the first worker")

    # When that worker is SIGKILLed mid-run and another worker starts
    first.kill()
    release(project)
    second = project.worker(pool=pool)

    # Then the second worker gets the message back once the dead worker's lease lapses, and runs it
    assert result.get(timeout=30) == "done a"
    assert result.state == states.SUCCESS
    assert runs(project) == ["a", "a"]
    second.wait_for("Returned 1 message(s) of a lost worker to their queues")
    second.wait_for(f"Task {project.module.late.name}[{result.id}] succeeded")
    assert first.count("succeeded") == 0
    assert project.app.broker.size(QUEUE) == 0


def test_a_prefetched_message_of_a_killed_worker_is_run_by_another_worker(
    make_project: ProjectFactory,
) -> None:
    # Given a one-thread worker running an early-acked task that blocks, with a second message
    # prefetched (a prefork child gives such messages back once its task runs long, and the
    # solo pool does not fetch while a task runs)
    pool = "threads"
    project = make_project(TASKS, broker_transport_options=FAST_LEASES)
    first = project.worker(pool=pool, concurrency=1)
    started = project.module.early.delay("started")
    wait_until(lambda: runs(project) == ["started"], 20, "the first task to start")
    prefetched = project.module.quick.delay("prefetched")
    first.wait_for(f"[{prefetched.id}] received")
    assert project.app.broker.size(QUEUE) == 0  # leased by the first worker, not waiting

    # When the worker is SIGKILLed and another worker starts
    first.kill()
    release(project)
    second = project.worker(pool=pool, concurrency=1)

    # Then the prefetched message comes back and runs on the second worker
    assert prefetched.get(timeout=30) == "done prefetched"
    second.wait_for("Returned 1 message(s) of a lost worker to their queues")
    # And the started task, acked before it ran (early ack), is not run again
    follow_up = project.module.quick.delay("follow-up")
    assert follow_up.get(timeout=20) == "done follow-up"
    assert runs(project) == ["started", "prefetched", "follow-up"]
    assert started.state == states.PENDING
    assert project.app.broker.size(QUEUE) == 0


def test_a_task_counted_down_two_hours_stays_in_the_broker_across_a_worker_restart(
    make_project: ProjectFactory,
) -> None:
    # Given a task sent with a two-hour countdown, and a live worker that ran a task sent after it
    project = make_project(TASKS)
    first = project.worker()
    delayed = project.module.quick.apply_async(("delayed",), countdown=7200)
    assert project.module.quick.delay("before").get(timeout=20) == "done before"

    # When the worker restarts and runs another task sent after it
    assert first.stop() == 0
    second = project.worker()
    assert project.module.quick.delay("after").get(timeout=20) == "done after"

    # Then the delayed task has not run and still waits in the broker
    assert runs(project) == ["before", "after"]
    assert delayed.state == states.PENDING
    assert project.app.broker.size(QUEUE) == 1
    assert project.app.broker.scheduled(QUEUE) == 1
    assert second.count(f"[{delayed.id}]") == 0
    assert first.count(f"[{delayed.id}]") == 0


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_warm_shutdown_loses_nothing_and_runs_nothing_twice(
    make_project: ProjectFactory, pool: str
) -> None:
    # Given 200 quick tasks on a two-slot worker that prefetches, where tasks from number 50 on
    # wait for a "go" file, so the shutdown surely comes mid-way (the thread pool also holds
    # jobs it has not started, beyond one per thread)
    project = make_project(TASKS)
    results = [project.module.batch.delay(index) for index in range(200)]
    first = project.worker("--prefetch-multiplier", "4", pool=pool, concurrency=2)
    wait_until(lambda: len(runs(project)) >= 52, 30, "the worker to reach the gated tasks")
    wait_until(lambda: first.count("received") > 52, 20, "the worker to prefetch past the gated tasks")

    # When the worker is asked to stop (SIGTERM) and the running tasks may then finish
    first.signal(signal.SIGTERM)
    first.wait_for("worker: Warm shutdown (MainProcess)")
    release(project, "go")

    # Then it exits cleanly, having finished what it started and given back what it had
    # prefetched (each prefork child logs what it returns)
    assert exits_within(first, 30) == 0
    first.wait_for(" stopped.")
    finished = first.count("succeeded")
    assert finished == 52
    ran = [int(line) for line in runs(project)]
    assert len(set(ran)) == len(ran) == finished
    assert set(range(50)) <= set(ran)
    returned = re.findall(r"Returned (\d+) prefetched message\(s\) to the queue", first.output)
    prefetched = sum(int(count) for count in returned)
    assert prefetched == first.count("received") - finished > 0
    assert project.app.broker.size(QUEUE) == 200 - finished

    # And a second worker finishes the rest: every task succeeded, each exactly once
    project.worker("--prefetch-multiplier", "4", pool=pool, concurrency=2)
    assert [result.get(timeout=60) for result in results] == list(range(200))
    assert all(result.state == states.SUCCESS for result in results)
    counts = Counter(int(line) for line in runs(project))
    assert sorted(counts) == list(range(200))
    assert set(counts.values()) == {1}
    assert project.app.broker.size(QUEUE) == 0


def test_a_cold_shutdown_gives_back_the_jobs_a_thread_pool_had_not_started(
    make_project: ProjectFactory,
) -> None:
    # Given a one-thread worker whose thread runs a blocked task, with three more jobs taken
    # from the broker and waiting in the pool behind it
    project = make_project(TASKS)
    worker = project.worker(pool="threads", concurrency=1)
    project.module.early.delay("blocker")
    wait_until(lambda: runs(project) == ["blocker"], 20, "the blocking task to start")
    waiting = [project.module.quick.delay(f"waiting-{index}") for index in range(3)]
    for result in waiting:
        worker.wait_for(f"[{result.id}] received")

    # When the worker gets SIGQUIT (a cold shutdown at once)
    worker.signal(signal.SIGQUIT)
    exits_within(worker, 10)

    # Then the waiting jobs never ran, and their messages are back as they were fetched: not
    # marked redelivered (the blocking task was acked when it started, so it is gone)
    assert runs(project) == ["blocker"]
    returned = project.app.broker.fetch([QUEUE], 10, timeout=5)
    assert [delivery.redelivered for delivery in returned] == [False, False, False]
    project.app.broker.release(returned, redelivered=False)

    # And a new worker runs each of them once
    release(project)
    project.worker(pool="threads", concurrency=1)
    assert [result.get(timeout=20) for result in waiting] == [f"done waiting-{index}" for index in range(3)]
    assert Counter(runs(project)) == Counter(["blocker", "waiting-0", "waiting-1", "waiting-2"])


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_running_task_finishes_during_a_warm_shutdown(make_project: ProjectFactory, pool: str) -> None:
    # Given a long task running on a worker
    project = make_project(TASKS)
    worker = project.worker(pool=pool)
    result = project.module.early.delay("long")
    wait_until(lambda: runs(project) == ["long"], 20, "the task to start")

    # When the worker is asked for a warm shutdown while the task still runs
    worker.signal(signal.SIGTERM)
    worker.wait_for("worker: Warm shutdown (MainProcess)")
    assert worker.proc.poll() is None  # it waits for the task
    release(project)

    # Then the task completes successfully before the worker exits cleanly
    assert exits_within(worker, 30) == 0
    assert result.state == states.SUCCESS
    assert result.get(timeout=5) == "done long"
    worker.wait_for(" stopped.")
    output = worker.output
    succeeded = output.index(f"[{result.id}] succeeded")
    assert output.index("Warm shutdown") < succeeded < output.index(" stopped.")
    assert runs(project) == ["long"]


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_second_sigterm_stops_the_worker_at_once_and_returns_an_acks_late_message(
    make_project: ProjectFactory, pool: str
) -> None:
    # Given an acks_late task running (and blocked) on a worker
    project = make_project(TASKS)
    worker = project.worker(pool=pool)
    result = project.module.late.delay("cold")
    wait_until(lambda: runs(project) == ["cold"], 20, "the task to start")

    # When the worker gets SIGTERM (warm shutdown) and then SIGTERM again (cold shutdown)
    worker.signal(signal.SIGTERM)
    worker.wait_for("worker: Warm shutdown (MainProcess)")
    worker.signal(signal.SIGTERM)

    # Then it exits promptly although the task never finished
    exits_within(worker, 10)
    worker.wait_for("worker: Cold shutdown (MainProcess)")
    assert result.state == states.PENDING
    # And the unacked message is back in the queue at once (no lease had to lapse)
    assert project.app.broker.size(QUEUE) == 1

    # And a new worker runs it to success
    release(project)
    project.worker(pool=pool)
    assert result.get(timeout=20) == "done cold"
    assert runs(project) == ["cold", "cold"]
    assert project.app.broker.size(QUEUE) == 0
