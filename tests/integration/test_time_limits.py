"""Soft and hard time limits, set on the task, per call, or in settings, in every pool.

Every test runs a real `celeriac worker` subprocess on a real SQLite broker. The limited tasks
would otherwise run for a minute, so a limit that did not fire shows up as a timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from tests.conftest import Project

QUEUE = "celery"
ProjectFactory = Callable[..., Project]

TASKS = """
from celeriac.exceptions import SoftTimeLimitExceeded


def spin(seconds):
    # Short sleeps in a Python loop, not one long sleep: the threads pool raises its limits
    # in the task's thread as an asynchronous exception, which lands only between Python
    # instructions and so cannot interrupt a long sleep inside C.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


@app.task(soft_time_limit=0.5)
def catches_soft(key):
    record("runs", key)
    try:
        spin(60)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task(soft_time_limit=0.5)
def ignores_soft(key):
    record("runs", key)
    spin(60)
    return "finished"


@app.task(time_limit=1, acks_late=True)
def runs_away(key):
    record("runs", f"{key} {os.getpid()}")
    spin(60)
    return "finished"


@app.task(time_limit=1, acks_late=True, acks_on_failure_or_timeout=False)
def runs_away_kept(key):
    record("runs", f"{key} {os.getpid()}")
    spin(60)
    return "finished"


@app.task
def whoami(key):
    record("runs", f"{key} {os.getpid()}")
    return os.getpid()


@app.task
def unlimited(key):
    record("runs", key)
    try:
        spin(60)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@app.task
def stubborn(key):
    record("runs", key)
    try:
        spin(60)
    except SoftTimeLimitExceeded:
        record("soft", key)
        spin(60)
    return "finished"


@app.task(soft_time_limit=5, time_limit=10)
def patient(key):
    record("runs", key)
    spin(1)
    return "finished"


# The guide's process_large_file, with its options, shortened from ten seconds of work.
@app.task(time_limit=30, soft_time_limit=25, acks_late=True)
def process_large_file(file_path):
    start = time.time()
    time.sleep(0.2)
    elapsed = time.time() - start
    print(f"Processed {file_path} in {elapsed:.2f}s")
    return f"Completed: {file_path}"
"""


def lines(project: Project, name: str = "runs") -> list[str]:
    path = project.path / name
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_soft_time_limit_raises_soft_time_limit_exceeded_inside_the_task(
    make_project: ProjectFactory, pool: str
) -> None:
    # Given a worker, and two tasks with a half-second soft limit that would otherwise run a minute
    project = make_project(TASKS)
    worker = project.worker(pool=pool)
    tasks = project.module

    # When one task catches SoftTimeLimitExceeded and the other lets it propagate
    caught = tasks.catches_soft.delay("caught")
    propagated = tasks.ignores_soft.delay("propagated")

    # Then the first cleans up and returns normally
    assert caught.get(timeout=20) == "cleaned up"
    assert caught.state == states.SUCCESS
    # And the second fails with SoftTimeLimitExceeded
    with pytest.raises(SoftTimeLimitExceeded):
        propagated.get(timeout=20)
    assert propagated.state == states.FAILURE
    worker.wait_for(f"{tasks.ignores_soft.name}[{propagated.id}] raised unexpected: SoftTimeLimitExceeded")
    # And each ran once, in the worker that is still serving
    assert sorted(lines(project)) == ["caught", "propagated"]
    assert tasks.whoami.delay("after").get(timeout=20)


def _past_the_hard_limit(make_project: ProjectFactory, task: str, key: str) -> tuple[Project, Any, Any]:
    """A one-child prefork worker whose `task` ran past its hard limit and failed with TimeLimitExceeded."""
    project = make_project(TASKS)
    worker = project.worker(concurrency=1)
    result = getattr(project.module, task).delay(key)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=20)
    return project, worker, result


def test_a_hard_time_limit_kills_the_prefork_child_which_is_replaced_and_not_redelivered(
    make_project: ProjectFactory,
) -> None:
    # Given a one-child prefork worker, when an acks_late task runs past its one-second hard limit
    project, worker, result = _past_the_hard_limit(make_project, "runs_away", "runaway")
    tasks = project.module

    # Then it fails with TimeLimitExceeded and the worker logs it
    assert result.state == states.FAILURE
    worker.wait_for(f"Hard time limit (1.0s) exceeded for {tasks.runs_away.name}[{result.id}]")
    # And a later task runs on the same worker, in a new child process
    follow_up = tasks.whoami.delay("follow-up").get(timeout=20)
    (runaway_line,) = [line for line in lines(project) if line.startswith("runaway ")]
    killed_pid = int(runaway_line.split()[1])
    assert follow_up != killed_pid
    assert worker.proc.poll() is None
    # And although it was acks_late, the message is not delivered again: once the worker has
    # stopped and given back everything it held, nothing is left in the broker
    assert worker.stop() == 0
    assert lines(project) == [runaway_line, f"follow-up {follow_up}"]
    assert project.app.broker.size(QUEUE) == 0
    assert project.app.broker.dead_letters() == []


def test_a_killed_child_s_task_that_keeps_failed_messages_is_dead_lettered_and_logged_once(
    make_project: ProjectFactory,
) -> None:
    # Given a one-child prefork worker, when an acks_late task that keeps its message on
    # failure (acks_on_failure_or_timeout=False) runs past its hard limit and its child is killed
    project, worker, _ = _past_the_hard_limit(make_project, "runs_away_kept", "kept")
    tasks = project.module

    # Then the message is set aside as a dead letter with the reason, not run again
    worker.wait_for("moved to the dead-letter queue")
    assert tasks.whoami.delay("follow-up").get(timeout=20)
    assert worker.stop() == 0
    [letter] = project.app.broker.dead_letters()
    assert "TimeLimitExceeded" in letter.reason
    assert [line.split()[0] for line in lines(project)] == ["kept", "follow-up"]
    # And the dead-lettering is logged once
    assert worker.count("moved to the dead-letter queue") == 1


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_hard_time_limit_fails_an_in_process_task_without_redelivery(
    make_project: ProjectFactory, pool: str
) -> None:
    # Given a worker whose pool runs tasks inside its own process, and an acks_late task
    # with a one-second hard limit
    project = make_project(TASKS)
    worker = project.worker(pool=pool, concurrency=1)
    tasks = project.module

    # When the task runs past its hard limit
    result = tasks.runs_away.delay("runaway")

    # Then it fails with TimeLimitExceeded
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=20)
    assert result.state == states.FAILURE
    # And the same worker process goes on running tasks
    assert tasks.whoami.delay("follow-up").get(timeout=20) == worker.proc.pid
    # And the acks_late message was acked as failed, not delivered again
    assert worker.stop() == 0
    assert [line.split()[0] for line in lines(project)] == ["runaway", "follow-up"]
    assert project.app.broker.size(QUEUE) == 0
    assert project.app.broker.dead_letters() == []


def test_the_guides_process_large_file_options_let_a_short_task_succeed(make_project: ProjectFactory) -> None:
    # Given the guide's task options: time_limit=30, soft_time_limit=25, acks_late=True
    project = make_project(TASKS)
    worker = project.worker()

    # When a short run of it is sent
    result = project.module.process_large_file.delay("/data/big.csv")

    # Then it completes, prints its line in the worker, and its message is acked
    assert result.get(timeout=20) == "Completed: /data/big.csv"
    assert result.state == states.SUCCESS
    worker.wait_for("Processed /data/big.csv in ")
    assert worker.stop() == 0
    assert project.app.broker.size(QUEUE) == 0
    assert "TimeLimitExceeded" not in worker.output


def test_time_limits_given_per_call_are_honoured(make_project: ProjectFactory) -> None:
    # Given a worker and tasks that set no limits of their own
    project = make_project(TASKS)
    worker = project.worker()
    tasks = project.module

    # When one is sent with a soft limit and another with a soft and a hard limit, per call
    soft = tasks.unlimited.apply_async(("soft",), soft_time_limit=0.5)
    hard = tasks.stubborn.apply_async(("hard",), soft_time_limit=0.5, time_limit=1.5)

    # Then the soft limit raised SoftTimeLimitExceeded in the first
    assert soft.get(timeout=20) == "cleaned up"
    # And the second, which carried on past its soft limit, was stopped at its hard limit
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=20)
    worker.wait_for(f"Hard time limit (1.5s) exceeded for {tasks.stubborn.name}[{hard.id}]")
    assert lines(project, "soft") == ["hard"]
    assert sorted(lines(project)) == ["hard", "soft"]


def test_the_time_limit_settings_apply_to_tasks_that_set_none(make_project: ProjectFactory) -> None:
    # Given an app whose settings give every task a soft and a hard limit
    project = make_project(TASKS, task_soft_time_limit=0.5, task_time_limit=1.5)
    worker = project.worker(concurrency=3)
    tasks = project.module

    # When tasks without limits of their own run past them, and one with longer limits of its own too
    soft = tasks.unlimited.delay("soft")
    hard = tasks.stubborn.delay("hard")
    own = tasks.patient.delay("own")

    # Then the soft limit setting raised SoftTimeLimitExceeded in both
    assert soft.get(timeout=20) == "cleaned up"
    # And the hard limit setting stopped the one that carried on
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=20)
    worker.wait_for(f"Hard time limit (1.5s) exceeded for {tasks.stubborn.name}[{hard.id}]")
    assert lines(project, "soft") == ["hard"]
    # And the task with its own, longer limits ran its full second: its own limits won
    assert own.get(timeout=20) == "finished"
    assert sorted(lines(project)) == ["hard", "own", "soft"]
