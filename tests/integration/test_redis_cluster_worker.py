"""Real workers on Redis Cluster: the broker and the result backend both on redis+cluster://.

Every test runs `celeriac worker` subprocesses against the private three-master cluster of
tests/redis_cluster.py, emptied first. Tasks record each run in a file of the project
folder and block, where a test needs them to, until the test creates a "release" file; the
tests wait on those files, on log lines and on results, never on guessed sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celeriac import chord, group, states
from tests.conftest import Project, wait_until

pytest_plugins = ("tests.redis_cluster",)

ProjectFactory = Callable[..., Project]
FAST_LEASES = {"lease_timeout": 2.0}  # a dead worker's messages come back about 2 s after it dies

TASKS = """
@app.task
def add(x, y):
    return x + y


@app.task
def total(numbers):
    return sum(numbers)


@app.task
def stamped(key):
    record("runs", f"{key} {time.time()!r}")
    return key


@app.task(bind=True, acks_late=True)
def late(self, key):
    record("runs", f"{key} redelivered={self.request.delivery_info['redelivered']}")
    wait_for_file("release")
    return f"done {key}"
"""


def on_cluster(make_project: ProjectFactory, url: str) -> Project:
    """A project whose broker and result backend are the private cluster."""
    return make_project(TASKS, broker=url, backend=url, broker_transport_options=FAST_LEASES)


def test_a_worker_on_redis_cluster_runs_tasks_groups_chords_and_countdowns(
    make_project: ProjectFactory, cluster_url: str
) -> None:
    # Given a prefork worker on a Redis Cluster broker and result backend
    project = on_cluster(make_project, cluster_url)
    project.worker()
    tasks = project.module

    # When a task, a group and a chord are called
    # Then each result comes back through the cluster
    assert tasks.add.delay(2, 3).get(timeout=20) == 5
    assert group(tasks.add.s(n, n) for n in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]
    assert chord(tasks.add.s(n, n) for n in range(5))(tasks.total.s()).get(timeout=20) == 20

    # And a task sent with a countdown runs once it is due, not before
    sent = time.time()
    delayed = tasks.stamped.apply_async(("later",), countdown=1)
    assert delayed.get(timeout=20) == "later"
    [line] = project.lines("runs")
    assert float(line.split()[1]) - sent >= 0.9


def test_an_acks_late_task_of_a_sigkilled_worker_completes_on_a_second_worker(
    make_project: ProjectFactory, cluster_url: str
) -> None:
    # Given an acks_late task running (and blocked) on a worker whose lease lasts 2 s
    project = on_cluster(make_project, cluster_url)
    first = project.worker()
    result = project.module.late.delay("a")
    wait_until(lambda: project.lines("runs") == ["a redelivered=False"], 20, "the task to start")

    # When that worker is SIGKILLed mid-run and a second worker starts
    first.kill()
    project.release()
    second = project.worker()

    # Then the second worker gets the message back once the dead worker's lease lapses, and runs it
    assert result.get(timeout=30) == "done a"
    assert result.state == states.SUCCESS
    second.wait_for("Returned 1 message(s) of a lost worker to their queues")
    assert project.lines("runs") == ["a redelivered=False", "a redelivered=True"]
