"""The prefork pool's supervision: children consume for themselves, the parent replaces the dead.

Real `celeriac worker --pool prefork` subprocesses on a real SQLite broker. The default lease
(20 s) is kept on purpose: what a dead child held must come back at once, because its parent
reclaims it, not because a lease lapsed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from celeriac import states
from celeriac.exceptions import WorkerLostError
from tests.conftest import Project, wait_until

ProjectFactory = Callable[..., Project]
SLOW_LEASES = {"lease_timeout": 20.0, "polling_interval": 0.05}  # longer than any wait below

TASKS = """
import os


@app.task
def early(key):
    record("runs", f"{key} {os.getpid()}")
    wait_for_file("release")
    return f"done {key}"


@app.task(acks_late=True, reject_on_worker_lost=True)
def requeued(key):
    record("runs", f"{key} {os.getpid()}")
    if len(read_lines("runs")) == 1:
        wait_for_file("release")
    return f"done {key}"


@app.task
def quick(key):
    record("runs", f"{key} {os.getpid()}")
    return f"done {key}"


def read_lines(name):
    path = HERE / name
    return path.read_text().splitlines() if path.exists() else []
"""


def runs(project: Project) -> list[tuple[str, int]]:
    """(key, pid of the child that ran it) for every run so far."""
    return [(key, int(pid)) for key, pid in (line.split() for line in project.lines("runs"))]


def test_a_child_killed_mid_task_reports_it_lost_and_is_replaced(make_project: ProjectFactory) -> None:
    # Given a one-child worker that prefetched four messages: one early-ack task running long,
    # so the child has given the other three back for anyone idle to take
    project = make_project(TASKS, broker_transport_options=SLOW_LEASES)
    blocked = project.module.early.delay("blocked")
    waiting = [project.module.quick.delay(f"after-{index}") for index in range(3)]
    worker = project.worker("--prefetch-multiplier", "4", concurrency=1)
    wait_until(lambda: len(runs(project)) == 1, 20, "the first task to start")
    worker.wait_for("Returned 3 prefetched message(s) to the queue while a long task runs")
    assert worker.count("received") == 4
    assert project.app.broker.size("celery") == 3
    [(_, child_pid)] = runs(project)
    assert child_pid != worker.proc.pid

    # When the child is killed under its task
    os.kill(child_pid, signal.SIGKILL)

    # Then the task fails with WorkerLostError, as Celery reports it
    with pytest.raises(WorkerLostError, match="signal 9"):
        blocked.get(timeout=20)
    worker.wait_for(f"Process running {project.module.early.name}[{blocked.id}] died (signal 9)")
    # And a fresh child runs the three other messages
    assert [result.get(timeout=20) for result in waiting] == [f"done after-{index}" for index in range(3)]
    fresh = {pid for key, pid in runs(project) if key.startswith("after-")}
    assert len(fresh) == 1 and child_pid not in fresh
    # And the worker goes on serving, its lost task not run again
    assert project.module.quick.delay("later").get(timeout=20) == "done later"
    assert [key for key, _ in runs(project)].count("blocked") == 1
    assert project.app.broker.size("celery") == 0


def test_an_acks_late_task_that_rejects_on_worker_lost_runs_again_after_its_child_dies(
    make_project: ProjectFactory,
) -> None:
    # Given an acks_late task with reject_on_worker_lost running on a two-child worker
    project = make_project(TASKS, broker_transport_options=SLOW_LEASES)
    worker = project.worker(concurrency=2)
    result = project.module.requeued.delay("again")
    wait_until(lambda: len(runs(project)) == 1, 20, "the task to start")
    [(_, child_pid)] = runs(project)

    # When its child is killed
    os.kill(child_pid, signal.SIGKILL)

    # Then its message goes back to the queue and a child runs it again to success
    assert result.get(timeout=20) == "done again"
    assert [key for key, _ in runs(project)] == ["again", "again"]
    assert runs(project)[1][1] != child_pid
    worker.wait_for(f"Process running {project.module.requeued.name}[{result.id}] died (signal 9)")
    assert result.state == states.SUCCESS


def test_two_long_tasks_run_at_once_even_when_one_child_prefetched_both(make_project: ProjectFactory) -> None:
    # Given a two-child worker whose children prefetch four messages each
    project = make_project(TASKS)
    worker = project.worker("--prefetch-multiplier", "4", concurrency=2)

    # When two blocking tasks are sent together (one child may lease both)
    results = [project.module.early.delay(f"both-{index}") for index in range(2)]

    # Then both run at the same time, in two different children, while the parent runs none
    wait_until(lambda: len(runs(project)) == 2, 20, "both tasks to start")
    pids = {pid for _, pid in runs(project)}
    assert len(pids) == 2 and worker.proc.pid not in pids
    project.release("release")
    assert [result.get(timeout=20) for result in results] == ["done both-0", "done both-1"]
