"""Results through real worker processes: values, failures, states, timeouts, expiry, and fresh handles."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celeriac import AsyncResult, Celery, states
from celeriac.exceptions import BackendError, TimeoutError
from tests.conftest import wait_until

TIMEOUT = 30

TASKS = """
class PaymentDeclined(Exception):
    '''A custom error defined next to the tasks; the caller imports this module too.'''

@app.task
def add(x, y):
    return x + y

@app.task
def boom():
    raise ValueError("boom", 42)  # the raising line

@app.task
def decline(card):
    raise PaymentDeclined(f"card {card} declined")

class Widget:
    pass

@app.task
def make_widget():
    return Widget()

@app.task
def wait_for_release(name):
    (HERE / f"{name}.running").touch()
    release = HERE / name
    while not release.exists():
        time.sleep(0.01)
    return "released"

@app.task(ignore_result=True)
def quiet_wait_for_release(name):
    (HERE / f"{name}.running").touch()
    release = HERE / name
    while not release.exists():
        time.sleep(0.01)
    (HERE / f"{name}.done").touch()
    return "released"

@app.task(ignore_result=True)
def quiet(fail):
    if fail:
        raise ValueError("kept despite ignore_result")
    return "dropped"
"""


# values and failures -------------------------------------------------------------------


def test_get_reraises_a_builtin_exception_with_its_arguments(make_project: Any) -> None:
    # Given a task that raises ValueError("boom", 42)
    project = make_project(TASKS)
    project.worker(pool="threads")

    # When its result is awaited
    result = project.module.boom.delay()
    with pytest.raises(ValueError) as raised:
        result.get(timeout=TIMEOUT)

    # Then the caller gets a ValueError with the same arguments
    assert type(raised.value) is ValueError
    assert raised.value.args == ("boom", 42)
    # And the stored traceback shows the line that raised
    assert result.traceback is not None
    assert 'raise ValueError("boom", 42)  # the raising line' in result.traceback
    assert "ValueError: ('boom', 42)" in result.traceback


def test_get_reraises_a_custom_exception_of_the_tasks_module(make_project: Any) -> None:
    # Given a task raising an exception class defined in its module (importable here too)
    project = make_project(TASKS)
    project.worker(pool="threads")

    # When its result is awaited
    result = project.module.decline.delay("4242")

    # Then the caller gets that very class, with its message
    with pytest.raises(project.module.PaymentDeclined, match="card 4242 declined"):
        result.get(timeout=TIMEOUT)


def test_get_without_propagate_returns_the_exception(make_project: Any) -> None:
    # Given a failed task
    project = make_project(TASKS)
    project.worker(pool="threads")
    result = project.module.decline.delay("1111")

    # When its result is read with propagate=False
    value = result.get(timeout=TIMEOUT, propagate=False)

    # Then the exception is returned, not raised, and is also the result
    assert isinstance(value, project.module.PaymentDeclined)
    assert str(value) == "card 1111 declined"
    assert isinstance(result.result, project.module.PaymentDeclined)


def test_ready_successful_and_failed_follow_the_outcome(make_project: Any) -> None:
    # Given one task that succeeds and one that fails, and a third no worker has run yet
    project = make_project(TASKS)
    never_run = project.module.add.apply_async((1, 1), queue="nobody-listens")
    assert (never_run.ready(), never_run.successful(), never_run.failed()) == (False, False, False)
    assert never_run.state == states.PENDING
    project.worker(pool="threads")

    # When both finish
    good = project.module.add.delay(2, 2)
    bad = project.module.boom.delay()
    assert good.get(timeout=TIMEOUT) == 4
    bad.get(timeout=TIMEOUT, propagate=False)

    # Then the flags say which is which
    assert (good.ready(), good.successful(), good.failed()) == (True, True, False)
    assert (bad.ready(), bad.successful(), bad.failed()) == (True, False, True)
    assert good.state == states.SUCCESS and bad.state == states.FAILURE
    assert good.traceback is None


def test_date_done_is_an_aware_utc_datetime(make_project: Any) -> None:
    # Given a finished task
    project = make_project(TASKS)
    project.worker(pool="threads")
    before = datetime.now(UTC)
    result = project.module.add.delay(1, 2)
    assert result.get(timeout=TIMEOUT) == 3

    # Then date_done is a timezone-aware UTC time between sending and now
    done = result.date_done
    assert isinstance(done, datetime)
    assert done.tzinfo is not None
    assert done.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= done <= datetime.now(UTC) + timedelta(seconds=1)


def test_forget_removes_the_result(make_project: Any) -> None:
    # Given a finished task
    project = make_project(TASKS)
    project.worker(pool="threads")
    result = project.module.add.delay(3, 4)
    assert result.get(timeout=TIMEOUT) == 7

    # When its result is forgotten
    result.forget()

    # Then it reads PENDING, from this handle and from a fresh one
    assert result.state == states.PENDING
    assert result.result is None
    assert project.app.AsyncResult(result.id).state == states.PENDING


def test_a_result_that_cannot_be_serialised_ends_in_failure_naming_its_type(make_project: Any) -> None:
    # Given a task returning an object JSON cannot encode
    project = make_project(TASKS)
    project.worker(pool="threads")

    # When its result is awaited
    result = project.module.make_widget.delay()

    # Then the task failed, with an error naming the type it returned
    with pytest.raises(Exception, match="Widget") as raised:
        result.get(timeout=TIMEOUT)
    assert "json" in str(raised.value)
    assert result.state == states.FAILURE


# states while waiting ------------------------------------------------------------------


def test_started_is_visible_while_a_tracked_task_runs(make_project: Any) -> None:
    # Given task_track_started, and a task that blocks until a release file appears
    project = make_project(TASKS, task_track_started=True)
    project.worker(pool="prefork", concurrency=1)

    # When it is sent
    result = project.module.wait_for_release.delay("release-started")

    # Then while it runs its state is STARTED, with the worker's pid and node name
    wait_until((project.path / "release-started.running").exists, TIMEOUT, "the task to start")
    assert result.state == states.STARTED
    info = result.info
    assert isinstance(info, dict)
    assert isinstance(info["pid"], int) and info["pid"] != project.workers[0].proc.pid
    assert info["hostname"].startswith("celeriac@")
    assert not result.ready()

    # When it is released, it finishes
    (project.path / "release-started").touch()
    assert result.get(timeout=TIMEOUT) == "released"
    assert result.state == states.SUCCESS


def test_without_track_started_a_running_task_reads_pending(make_project: Any) -> None:
    # Given the default settings and a task that blocks until released
    project = make_project(TASKS)
    project.worker(pool="threads")

    # When it is running
    result = project.module.wait_for_release.delay("release-pending")
    wait_until((project.path / "release-pending.running").exists, TIMEOUT, "the task to start")

    # Then it reads PENDING (Celery's default) until it ends
    assert result.state == states.PENDING
    (project.path / "release-pending").touch()
    assert result.get(timeout=TIMEOUT) == "released"


def test_get_with_a_timeout_raises_timeout_error_when_no_worker_runs_the_task(make_project: Any) -> None:
    # Given no worker at all
    project = make_project(TASKS)
    result = project.module.add.delay(1, 1)

    # When the caller waits half a second
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        result.get(timeout=0.5)
    waited = time.monotonic() - started

    # Then celeriac's TimeoutError came after about that long
    assert 0.45 <= waited < 5
    assert result.state == states.PENDING


def test_an_ignored_task_sent_by_name_is_never_left_started(make_project: Any) -> None:
    # Given task_track_started, and an ignore_result task that blocks until released
    project = make_project(TASKS, task_track_started=True)
    project.worker(pool="threads")
    client = Celery(
        "client",
        broker=project.app.conf.broker_url,
        backend=project.app.conf.result_backend,
        set_as_current=False,
    )
    try:
        # When a client that does not know the task sends it by name (its header says keep the result)
        result = client.send_task(f"{project.module_name}.quiet_wait_for_release", args=("release-quiet",))
        wait_until((project.path / "release-quiet.running").exists, TIMEOUT, "the task to start")

        # Then no STARTED state is stored for it, since no final state ever will be
        assert result.state == states.PENDING
        (project.path / "release-quiet").touch()
        wait_until((project.path / "release-quiet.done").exists, TIMEOUT, "the task to finish")
        assert result.state == states.PENDING
    finally:
        client.close()


# configuration -------------------------------------------------------------------------


def test_get_without_a_result_backend_says_how_to_configure_one(make_project: Any) -> None:
    # Given an app with no result backend, and a worker that runs its tasks
    project = make_project(TASKS, backend="")
    worker = project.worker(pool="threads")

    # When a task is sent, it still runs
    result = project.module.add.delay(2, 2)
    worker.wait_for(f"[{result.id}] succeeded", TIMEOUT)

    # Then get() explains that a backend must be configured, and how
    with pytest.raises(BackendError) as raised:
        result.get(timeout=1)
    message = str(raised.value)
    assert "No result backend is configured" in message
    assert "backend=" in message
    assert "result_backend" in message
    with pytest.raises(BackendError):
        _ = result.state
    # And code written for Celery, which catches NotImplementedError here, still does
    with pytest.raises(NotImplementedError):
        result.get(timeout=1)


def test_store_errors_even_if_ignored_keeps_the_failures_of_ignored_tasks(make_project: Any) -> None:
    # Given task_store_errors_even_if_ignored, and an ignore_result task, on a one-at-a-time worker
    project = make_project(TASKS, task_store_errors_even_if_ignored=True)
    project.worker(pool="solo")

    # When it succeeds once and fails once
    succeeded = project.module.quiet.delay(False)
    failed = project.module.quiet.delay(True)

    # Then the failure is stored and raised, and the success (run first) is not stored
    with pytest.raises(ValueError, match="kept despite ignore_result"):
        failed.get(timeout=TIMEOUT)
    assert succeeded.state == states.PENDING


def test_result_expires_makes_a_finished_result_read_pending_later(make_project: Any) -> None:
    # Given results that expire after one second
    project = make_project(TASKS, result_expires=1)
    project.worker(pool="threads")
    result = project.module.add.delay(5, 5)
    assert result.get(timeout=TIMEOUT) == 10

    # When time passes, then a fresh handle reads it as PENDING again
    wait_until(
        lambda: project.app.AsyncResult(result.id).state == states.PENDING, TIMEOUT, "the result to expire"
    )
    assert project.app.AsyncResult(result.id).result is None


def test_a_fresh_handle_reads_the_stored_status(make_project: Any) -> None:
    # Given a finished task and a failed one
    project = make_project(TASKS)
    project.worker(pool="threads")
    good = project.module.add.delay(20, 22)
    bad = project.module.decline.delay("0000")
    assert good.get(timeout=TIMEOUT) == 42
    bad.get(timeout=TIMEOUT, propagate=False)

    # When new handles are made from the ids alone
    fresh_good = AsyncResult(good.id, app=project.app)
    fresh_bad = AsyncResult(bad.id, app=project.app)

    # Then they read the stored status and value
    assert fresh_good.status == states.SUCCESS
    assert fresh_good.result == 42
    assert fresh_bad.status == states.FAILURE
    assert isinstance(fresh_bad.result, project.module.PaymentDeclined)
    assert fresh_good == good.id and hash(fresh_good) == hash(good)

    # And so does a separate app on the same backend, in this process and in another one
    other = Celery("reader", backend=project.app.conf.result_backend, set_as_current=False)
    try:
        assert other.AsyncResult(good.id).get(timeout=TIMEOUT) == 42
    finally:
        other.close()
    script = (
        "from celeriac import Celery\n"
        f"app = Celery('reader', backend={project.app.conf.result_backend!r})\n"
        f"r = app.AsyncResult({good.id!r})\n"
        "print(r.status, r.result)\n"
    )
    done = project.run(sys.executable, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SUCCESS 42"
