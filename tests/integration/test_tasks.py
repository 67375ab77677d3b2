"""Tasks run by real worker processes: request context, retries, hooks, routing, priority, eta, expiry."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.exceptions import MaxRetriesExceededError, TaskRevokedError
from tests.conftest import Project, wait_until

TIMEOUT = 30

RECORDING = """
import json

def record(name, **fields):
    # One JSON line per event, appended atomically enough for one line at a time.
    with open(HERE / name, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "at": time.time(), **fields}) + "\\n")
"""


def records(project: Project, name: str) -> list[dict[str, Any]]:
    """The JSON lines a task wrote to `name` in the project folder (none if it never wrote)."""
    path = project.path / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# the request context -------------------------------------------------------------------

REQUEST_TASKS = """
@app.task(bind=True)
def inspect(self, x, y=0):
    r = self.request
    return {
        "id": r.id, "task": r.task, "args": list(r.args), "kwargs": r.kwargs, "retries": r.retries,
        "hostname": r.hostname, "routing_key": r.delivery_info["routing_key"],
        "root_id": r.root_id, "parent_id": r.parent_id, "is_eager": r.is_eager,
        "called_directly": r.called_directly,
    }

@app.task(bind=True)
def root(self):
    return middle.delay().id

@app.task(bind=True)
def middle(self):
    return leaf.delay().id

@app.task(bind=True)
def leaf(self):
    return {"id": self.request.id, "root_id": self.request.root_id, "parent_id": self.request.parent_id}
"""


def test_a_bound_task_sees_its_request(make_project: Any) -> None:
    # Given a worker with a known node name
    project = make_project(REQUEST_TASKS)
    project.worker("-n", "alpha@%h", pool="threads")

    # When a bound task is sent with args and kwargs
    result = project.module.inspect.apply_async((1,), {"y": 2})
    seen = result.get(timeout=TIMEOUT)

    # Then self.request describes this very call, as run by that worker from the default queue
    assert seen == {
        "id": result.id,
        "task": project.module.inspect.name,
        "args": [1],
        "kwargs": {"y": 2},
        "retries": 0,
        "hostname": f"alpha@{socket.gethostname()}",
        "routing_key": "celery",
        "root_id": result.id,
        "parent_id": None,
        "is_eager": False,
        "called_directly": False,
    }


def test_a_task_sent_from_a_task_knows_its_parent_and_root(make_project: Any) -> None:
    # Given tasks that each send the next: root -> middle -> leaf
    project = make_project(REQUEST_TASKS)
    project.worker(pool="threads")

    # When the root is sent
    root = project.module.root.delay()
    middle_id = root.get(timeout=TIMEOUT)
    leaf_id = project.app.AsyncResult(middle_id).get(timeout=TIMEOUT)
    leaf = project.app.AsyncResult(leaf_id).get(timeout=TIMEOUT)

    # Then the leaf's parent is the middle task and its root is the first task
    assert leaf == {"id": leaf_id, "root_id": root.id, "parent_id": middle_id}
    assert len({root.id, middle_id, leaf_id}) == 3


# retries -------------------------------------------------------------------------------

RETRY_TASKS = (
    RECORDING
    + """
@app.task(bind=True, max_retries=3)
def flaky(self, succeed_on):
    record("flaky.log", id=self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_on:
        raise self.retry(countdown=1)
    return {"retries": self.request.retries}

@app.task(bind=True, max_retries=1)
def always_fails_with(self, note):
    record("fails.log", retries=self.request.retries)
    raise self.retry(exc=ValueError(note), countdown=0)

@app.task(bind=True, max_retries=1)
def always_retries(self):
    record("retries.log", retries=self.request.retries)
    raise self.retry(countdown=0)

@app.task(autoretry_for=(KeyError,), retry_backoff=0.25, retry_jitter=False, max_retries=5)
def settles(failures):
    runs = HERE / "settles.log"
    so_far = len(runs.read_text().splitlines()) if runs.exists() else 0
    record("settles.log")
    if so_far < failures:
        raise KeyError(f"not yet ({so_far})")
    return so_far

@app.task(bind=True)
def retries_once(self):
    r = self.request
    record("once.log", retries=r.retries, queue=r.delivery_info["routing_key"], expires=r.expires)
    if r.retries == 0:
        raise self.retry(countdown=0)
    return r.retries

@app.task(bind=True)
def once_later(self):
    if self.request.retries == 0:
        raise self.retry(exc=ValueError("try again"), countdown=1.5)
    return "second time lucky"
"""
)


def test_retry_runs_the_task_again_with_the_same_id_and_more_retries(make_project: Any) -> None:
    # Given a task that retries itself with a countdown of 1 s until its second retry
    project = make_project(RETRY_TASKS)
    project.worker(pool="threads")

    # When it is sent
    result = project.module.flaky.delay(2)

    # Then it ends in SUCCESS, having run three times under one id with retries 0, 1, 2
    assert result.get(timeout=TIMEOUT) == {"retries": 2}
    assert result.state == states.SUCCESS
    runs = records(project, "flaky.log")
    assert [run["retries"] for run in runs] == [0, 1, 2]
    assert {run["id"] for run in runs} == {result.id}
    # And each retry waited out its countdown
    assert runs[1]["at"] - runs[0]["at"] >= 0.9
    assert runs[2]["at"] - runs[1]["at"] >= 0.9


def test_retrying_past_max_retries_raises_the_original_exception(make_project: Any) -> None:
    # Given a task that always retries with exc=ValueError and allows one retry
    project = make_project(RETRY_TASKS)
    project.worker(pool="threads")

    # When it is sent
    result = project.module.always_fails_with.delay("out of patience")

    # Then the caller gets the ValueError itself, after the first run and one retry
    with pytest.raises(ValueError, match="out of patience"):
        result.get(timeout=TIMEOUT)
    assert result.state == states.FAILURE
    assert [run["retries"] for run in records(project, "fails.log")] == [0, 1]


def test_retrying_past_max_retries_without_an_exception_raises_max_retries_exceeded(
    make_project: Any,
) -> None:
    # Given a task that always retries without an exception and allows one retry
    project = make_project(RETRY_TASKS)
    project.worker(pool="threads")

    # When it is sent
    result = project.module.always_retries.delay()

    # Then the caller gets MaxRetriesExceededError naming the task
    with pytest.raises(MaxRetriesExceededError, match="always_retries"):
        result.get(timeout=TIMEOUT)
    assert [run["retries"] for run in records(project, "retries.log")] == [0, 1]


def test_autoretry_for_backs_off_exponentially_then_succeeds(make_project: Any) -> None:
    # Given a task that raises KeyError twice, autoretried with a 0.25 s backoff factor and no jitter
    project = make_project(RETRY_TASKS)
    project.worker(pool="threads")

    # When it is sent
    result = project.module.settles.delay(2)

    # Then it succeeds on the third run
    assert result.get(timeout=TIMEOUT) == 2
    runs = records(project, "settles.log")
    assert len(runs) == 3
    # And the waits between runs were at least 0.25 s, then 0.5 s (factor * 2 ** retries)
    assert runs[1]["at"] - runs[0]["at"] >= 0.25 - 0.05
    assert runs[2]["at"] - runs[1]["at"] >= 0.5 - 0.05


def test_a_retried_task_keeps_its_queue_and_expiry(make_project: Any) -> None:
    # Given a worker consuming only queue 'other'
    project = make_project(RETRY_TASKS)
    project.worker("-Q", "other", pool="threads")

    # When a task that retries once is sent there with an expiry a minute ahead
    result = project.module.retries_once.apply_async(queue="other", expires=60)

    # Then the retry ran from the same queue, under the same expiry, and succeeded
    assert result.get(timeout=TIMEOUT) == 1
    first, second = records(project, "once.log")
    assert (first["retries"], second["retries"]) == (0, 1)
    assert first["queue"] == second["queue"] == "other"
    assert first["expires"] is not None
    assert datetime.fromisoformat(second["expires"]) == datetime.fromisoformat(first["expires"])


def test_the_retry_state_is_visible_while_the_countdown_runs(make_project: Any) -> None:
    # Given a task that retries once with a 1.5 s countdown and exc=ValueError
    project = make_project(RETRY_TASKS)
    project.worker(pool="threads")

    # When it is sent
    result = project.module.once_later.delay()

    # Then while it waits, its state is RETRY and its info is the exception it retried for
    wait_until(lambda: result.state == states.RETRY, TIMEOUT, "the RETRY state")
    assert isinstance(result.info, ValueError)
    assert str(result.info) == "try again"
    assert not result.ready()
    # And then it runs again and succeeds
    assert result.get(timeout=TIMEOUT) == "second time lucky"
    assert result.state == states.SUCCESS


# hooks and shared tasks ----------------------------------------------------------------

HOOK_TASKS = (
    RECORDING
    + """
from celeriac import Task

class Recorded(Task):
    def on_success(self, retval, task_id, args, kwargs):
        record("hooks.log", hook="on_success", id=task_id, retval=retval, args=list(args))

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record("hooks.log", hook="on_failure", id=task_id, exc=repr(exc), einfo=str(einfo))

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        record("hooks.log", hook="on_retry", id=task_id, exc=repr(exc))

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        record("hooks.log", hook="after_return", id=task_id, status=status)

@app.task(base=Recorded)
def double(x):
    return x * 2

@app.task(base=Recorded)
def explode(x):
    raise RuntimeError(f"exploded on {x}")

@app.task(base=Recorded, bind=True)
def hesitate(self):
    if self.request.retries == 0:
        raise self.retry(exc=LookupError("not yet"), countdown=0)
    return "went ahead"
"""
)


def test_a_custom_task_classs_hooks_run_in_the_worker(make_project: Any) -> None:
    # Given tasks built on a Task subclass whose hooks write to a file
    project = make_project(HOOK_TASKS)
    project.worker(pool="prefork", concurrency=1)

    # When one succeeds, one fails, and one retries once then succeeds
    good = project.module.double.delay(21)
    bad = project.module.explode.delay(7)
    retried = project.module.hesitate.delay()
    assert good.get(timeout=TIMEOUT) == 42
    with pytest.raises(RuntimeError, match="exploded on 7"):
        bad.get(timeout=TIMEOUT)
    assert retried.get(timeout=TIMEOUT) == "went ahead"

    # Then on_success / on_failure ran, each followed by after_return, in a worker process
    wait_until(lambda: len(records(project, "hooks.log")) >= 7, TIMEOUT, "seven hook calls")
    by_task: dict[str, list[dict[str, Any]]] = {}
    for entry in records(project, "hooks.log"):
        by_task.setdefault(entry["id"], []).append(entry)
    assert [e["hook"] for e in by_task[good.id]] == ["on_success", "after_return"]
    assert by_task[good.id][0]["retval"] == 42
    assert by_task[good.id][0]["args"] == [21]
    assert by_task[good.id][1]["status"] == states.SUCCESS
    assert [e["hook"] for e in by_task[bad.id]] == ["on_failure", "after_return"]
    assert "exploded on 7" in by_task[bad.id][0]["exc"]
    assert "raise RuntimeError" in by_task[bad.id][0]["einfo"]
    assert by_task[bad.id][1]["status"] == states.FAILURE
    # And a retry calls on_retry but not after_return (as in Celery): that comes with the final outcome
    assert [e["hook"] for e in by_task[retried.id]] == ["on_retry", "on_success", "after_return"]
    assert "not yet" in by_task[retried.id][0]["exc"]
    assert by_task[retried.id][2]["status"] == states.SUCCESS
    assert {e["pid"] for e in records(project, "hooks.log")}.isdisjoint({os.getpid()})


SHARED_TASKS = """
from celeriac import shared_task

@shared_task
def multiply(x, y):
    return x * y

@shared_task(name="shared.greeting", bind=True)
def greeting(self, who):
    return f"hello {who} from {self.request.id}"
"""


def test_a_shared_task_runs_through_the_app(make_project: Any) -> None:
    # Given shared tasks defined in the app's module
    project = make_project(SHARED_TASKS)
    project.worker(pool="threads")

    # Then they are registered with the app under their names
    assert f"{project.module_name}.multiply" in project.app.tasks
    assert "shared.greeting" in project.app.tasks

    # When they are sent, through the shared task and through the app's registry
    product = project.module.multiply.delay(6, 7)
    greeting = project.app.tasks["shared.greeting"].delay("world")

    # Then the worker runs them
    assert product.get(timeout=TIMEOUT) == 42
    assert greeting.get(timeout=TIMEOUT) == f"hello world from {greeting.id}"


# results that are not kept, and sending by name ----------------------------------------

SIMPLE_TASKS = (
    RECORDING
    + """
@app.task
def add(x, y):
    return x + y

@app.task(ignore_result=True)
def fire_and_forget(tag):
    record("ran.log", tag=tag)
    return "not stored"

@app.task
def mark(tag):
    record("ran.log", tag=tag)
    return tag

@app.task(bind=True)
def where(self, tag):
    record("ran.log", tag=tag)
    return {"tag": tag, "queue": self.request.delivery_info["routing_key"], "host": self.request.hostname}
"""
)


def test_ignore_result_stores_nothing_though_the_task_ran(make_project: Any) -> None:
    # Given a one-at-a-time worker
    project = make_project(SIMPLE_TASKS)
    project.worker(pool="solo")

    # When an ignore_result task is sent, then a normal task sent with ignore_result=True,
    # then a task whose result is kept (run after both, by the solo worker)
    ignored = project.module.fire_and_forget.delay("decorated")
    per_call = project.module.mark.apply_async(("per-call",), ignore_result=True)
    after = project.module.add.delay(1, 1)
    assert after.get(timeout=TIMEOUT) == 2

    # Then both ignored tasks ran, but their results read PENDING
    assert [r["tag"] for r in records(project, "ran.log")] == ["decorated", "per-call"]
    assert ignored.state == states.PENDING
    assert per_call.state == states.PENDING
    assert ignored.result is None


def test_send_task_sends_by_name_from_an_app_that_lacks_the_task(make_project: Any) -> None:
    # Given a worker, and a client app on the same broker and backend that registers no tasks
    project = make_project(SIMPLE_TASKS)
    project.worker(pool="threads")
    client = Celery(
        "client",
        broker=project.app.conf.broker_url,
        backend=project.app.conf.result_backend,
        set_as_current=False,
    )
    try:
        assert f"{project.module_name}.add" not in client.tasks

        # When the client sends the task by its name
        result = client.send_task(f"{project.module_name}.add", args=(2, 3))

        # Then the worker runs it and the client reads the result
        assert result.get(timeout=TIMEOUT) == 5
        assert result.successful()
    finally:
        client.close()


# priority and routing ------------------------------------------------------------------


def test_higher_priority_tasks_run_first(make_project: Any) -> None:
    # Given tasks queued before any worker runs, low priority first
    project = make_project(SIMPLE_TASKS)
    sent = [
        project.module.mark.apply_async(("low-a",), priority=0),
        project.module.mark.apply_async(("low-b",), priority=0),
        project.module.mark.apply_async(("high",), priority=9),
        project.module.mark.apply_async(("middle",), priority=5),
    ]

    # When a one-at-a-time worker starts
    project.worker(pool="solo", concurrency=1)
    for result in sent:
        result.get(timeout=TIMEOUT)

    # Then the most urgent ran first, and equal priorities ran in the order sent
    assert [r["tag"] for r in records(project, "ran.log")] == ["high", "middle", "low-a", "low-b"]


def test_a_task_sent_to_another_queue_is_run_only_by_a_worker_consuming_it(make_project: Any) -> None:
    # Given a worker on the default queue only
    project = make_project(SIMPLE_TASKS)
    project.worker("-n", "default@%h", pool="threads")

    # When one task is sent to queue 'other' and one to the default queue
    elsewhere = project.module.where.apply_async(("elsewhere",), queue="other")
    here = project.module.where.delay("here")

    # Then the default worker runs only its own, and the other stays queued
    assert here.get(timeout=TIMEOUT)["host"] == f"default@{socket.gethostname()}"
    assert elsewhere.state == states.PENDING
    assert project.app.broker.size("other") == 1

    # When a worker consuming 'other' starts
    project.worker("-n", "other@%h", "-Q", "other", pool="threads")

    # Then that worker runs it, from that queue
    assert elsewhere.get(timeout=TIMEOUT) == {
        "tag": "elsewhere",
        "queue": "other",
        "host": f"other@{socket.gethostname()}",
    }
    assert [r["tag"] for r in records(project, "ran.log")] == ["here", "elsewhere"]


ROUTED_TASKS = """
@app.task(bind=True, name="billing.charge")
def charge(self):
    return self.request.delivery_info["routing_key"]

@app.task(bind=True, name="billing.refund")
def refund(self):
    return self.request.delivery_info["routing_key"]

@app.task(bind=True, name="reports.daily")
def daily(self):
    return self.request.delivery_info["routing_key"]
"""


def test_task_routes_send_tasks_to_queues_by_name_and_by_glob(make_project: Any) -> None:
    # Given routes: one exact name, then a glob for the rest of billing
    project = make_project(
        ROUTED_TASKS,
        task_routes={"billing.refund": {"queue": "refunds"}, "billing.*": {"queue": "billing"}},
    )

    # When tasks are sent before any worker runs
    charge = project.module.charge.delay()
    refund = project.module.refund.delay()
    daily = project.module.daily.delay()
    forced = project.module.charge.apply_async(queue="celery")

    # Then each waits in the queue its route chose; an explicit queue beats the routes
    sizes = {q: project.app.broker.size(q) for q in ("refunds", "billing", "celery")}
    assert sizes == {"refunds": 1, "billing": 1, "celery": 2}

    # When a worker consumes all three queues, each task reports the queue it came from
    project.worker("-Q", "refunds,billing,celery", pool="threads")
    assert refund.get(timeout=TIMEOUT) == "refunds"
    assert charge.get(timeout=TIMEOUT) == "billing"
    assert daily.get(timeout=TIMEOUT) == "celery"
    assert forced.get(timeout=TIMEOUT) == "celery"


# expiry and eta ------------------------------------------------------------------------


def test_a_task_that_expired_before_it_ran_is_revoked_and_never_runs(make_project: Any) -> None:
    # Given a worker
    project = make_project(SIMPLE_TASKS)
    project.worker(pool="solo")

    # When a task is sent already expired, followed by a normal one
    expired = project.module.mark.apply_async(("expired",), expires=datetime.now(UTC) - timedelta(seconds=5))
    after = project.module.mark.delay("after")

    # Then the expired one ends REVOKED, and get() says so
    with pytest.raises(TaskRevokedError):
        expired.get(timeout=TIMEOUT)
    assert expired.state == states.REVOKED
    # And its body never ran (the solo worker finished the next task too)
    assert after.get(timeout=TIMEOUT) == "after"
    assert [r["tag"] for r in records(project, "ran.log")] == ["after"]


ETA_TASKS = """
@app.task
def when():
    return time.time()
"""


def test_a_task_with_an_eta_does_not_run_before_it(make_project: Any) -> None:
    # Given a running worker
    project = make_project(ETA_TASKS)
    project.worker(pool="threads")

    # When a task is sent with an eta 2 s ahead
    eta = datetime.now(UTC) + timedelta(seconds=2)
    result = project.module.when.apply_async(eta=eta)

    # Then it runs at or after the eta, not before
    ran_at = wait_until(lambda: result.ready() and result.get(), TIMEOUT, "the eta task to run")
    assert ran_at >= eta.timestamp()
    assert ran_at - eta.timestamp() < 10


def test_a_naive_eta_is_read_as_utc(make_project: Any) -> None:
    # Given a running worker and an app with enable_utc (the default)
    project = make_project(ETA_TASKS)
    project.worker(pool="threads")

    # When a task is sent with a naive UTC eta 1 s ahead
    eta = datetime.now(UTC) + timedelta(seconds=1)
    result = project.module.when.apply_async(eta=eta.replace(tzinfo=None))

    # Then it runs at or after that instant, and not hours off
    ran_at = result.get(timeout=TIMEOUT)
    assert eta.timestamp() <= ran_at < eta.timestamp() + 10
