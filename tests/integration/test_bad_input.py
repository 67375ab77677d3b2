"""Poison and malformed messages against a real worker: each ends in the dead-letter store, with a reason,
and the worker goes on serving."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from celeriac import states
from celeriac.brokers.base import DeadLetter
from celeriac.exceptions import NotRegistered, WorkerLostError
from celeriac.protocol import serializers
from celeriac.protocol.message import Envelope, decode_task, pack, unpack
from celeriac.result import AsyncResult
from tests.conftest import Project, wait_until

TASKS = """
@app.task
def add(x, y):
    return x + y


@app.task
def kind(value):
    return type(value).__name__


@app.task(acks_late=True)
def linger(name):
    (HERE / f"started-{name}-{os.getpid()}-{time.monotonic_ns()}").write_text("")
    time.sleep(120)
    return name


@app.task
def store(path, handle):
    return path
"""

ProjectFactory = Callable[..., Project]


def _dead_letters(project: Project, count: int = 1, timeout: float = 30.0) -> list[DeadLetter]:
    """Wait until the project's broker holds `count` dead letters and return them."""
    found: list[DeadLetter] = wait_until(
        lambda: (letters := project.app.broker.dead_letters()) and len(letters) >= count and letters,
        timeout,
        f"{count} dead letter(s)",
    )
    return found


def _assert_still_serving(project: Project) -> None:
    assert project.module.add.delay(20, 22).get(timeout=30) == 42


def _raw_task(project: Project, body: bytes, **headers: Any) -> str:
    """Publish a hand-built task envelope on the default queue; return its id."""
    task_id = str(uuid.uuid4())
    envelope = Envelope(
        body=body,
        content_type=serializers.JSON_TYPE,
        content_encoding="utf-8",
        headers={"lang": "py", "task": f"{project.module_name}.add", "id": task_id, **headers},
        properties={"correlation_id": task_id, "priority": 0},
    )
    project.app.broker.publish_one("celery", pack(envelope, routing_key="celery"))
    return task_id


def test_a_message_that_is_not_json_is_dead_lettered_and_the_worker_keeps_going(
    make_project: ProjectFactory,
) -> None:
    # Given a worker
    project = make_project(TASKS)
    worker = project.worker(pool="solo")
    # When raw bytes that are not JSON arrive on its queue
    project.app.broker.publish_one("celery", b"not json{")
    # Then they land in the dead-letter store, kept as they came, with a reason
    (dead,) = _dead_letters(project)
    assert dead.queue == "celery"
    assert dead.payload == b"not json{"
    assert "undecodable" in dead.reason and "JSON" in dead.reason
    worker.wait_for("moved to the dead-letter queue")
    # And the next good task still runs
    _assert_still_serving(project)
    assert project.app.broker.size("celery") == 0


def test_an_envelope_whose_body_is_not_args_kwargs_embed_is_dead_lettered(
    make_project: ProjectFactory,
) -> None:
    # Given a worker
    project = make_project(TASKS)
    worker = project.worker(pool="solo")
    # When a well-formed v2 envelope arrives whose body is a protocol v1 style dict
    task_id = _raw_task(project, json.dumps({"args": [1, 2], "kwargs": {}}).encode())
    # Then it is dead-lettered saying what is wrong with the body
    (dead,) = _dead_letters(project)
    assert "[args, kwargs, embed]" in dead.reason
    assert unpack(dead.payload).headers["id"] == task_id
    worker.wait_for("[args, kwargs, embed]")
    # And the worker goes on
    _assert_still_serving(project)


def _raw_document(project: Project, **fields: Any) -> bytes:
    """A kombu envelope for a valid call of `add(1, 2)`, with some of its fields replaced."""
    document: dict[str, Any] = {
        "body": base64.b64encode(b"[[1, 2], {}, {}]").decode(),
        "content-type": serializers.JSON_TYPE,
        "content-encoding": "utf-8",
        "headers": {"task": f"{project.module_name}.add", "id": str(uuid.uuid4())},
        "properties": {"body_encoding": "base64", "priority": 0},
    }
    document.update(fields)
    return json.dumps(document).encode()


def test_messages_with_malformed_headers_or_fields_are_dead_lettered_not_fatal(
    make_project: ProjectFactory,
) -> None:
    # Given a worker
    project = make_project(TASKS)
    worker = project.worker(pool="solo")
    # When messages arrive whose headers or envelope fields have the wrong shape
    poison = {
        "eta": _raw_task(project, b"[[1, 2], {}, {}]", eta="next tuesday"),
        "expires": _raw_task(project, b"[[1, 2], {}, {}]", expires="soon"),
        "timelimit": _raw_task(project, b"[[1, 2], {}, {}]", timelimit=5),
        "retries": _raw_task(project, b"[[1, 2], {}, {}]", retries="many"),
        "embed": _raw_task(project, b"[[1, 2], {}, [1]]"),
    }
    broker = project.app.broker
    broker.publish_one("celery", _raw_document(project, properties="oops"))
    broker.publish_one("celery", _raw_document(project, headers="task id"))
    # Then every one is dead-lettered with a reason, and the worker survives them all
    dead = _dead_letters(project, count=len(poison) + 2)
    assert len(dead) == len(poison) + 2
    assert all(letter.reason.startswith("undecodable message") for letter in dead)
    by_id = {unpack(letter.payload).headers["id"]: letter.reason for letter in dead[: len(poison)]}
    assert "next tuesday" in by_id[poison["eta"]]
    assert "soon" in by_id[poison["expires"]]
    assert "embed" in by_id[poison["embed"]]
    assert "headers and properties" in dead[-1].reason
    assert worker.proc.poll() is None
    wait_until(lambda: worker.count("moved to the dead-letter queue") == len(poison) + 2, 30, "the log lines")
    _assert_still_serving(project)
    assert "Traceback" not in worker.output


def test_a_message_naming_an_unknown_task_is_dead_lettered_and_fails_its_caller(
    make_project: ProjectFactory,
) -> None:
    # Given a worker that does not know a task named no.such.task
    project = make_project(TASKS)
    worker = project.worker(pool="solo")
    # When a producer sends that task by name
    result = project.app.send_task("no.such.task", args=(1, "two"), kwargs={"three": 3})
    # Then the message is dead-lettered as NotRegistered
    (dead,) = _dead_letters(project)
    assert "NotRegistered" in dead.reason
    assert "no.such.task" in dead.reason
    # And the caller sees FAILURE and gets NotRegistered from get()
    with pytest.raises(NotRegistered, match=r"no\.such\.task"):
        result.get(timeout=30)
    assert result.state == states.FAILURE
    # And the worker log says so
    line = worker.wait_for("moved to the dead-letter queue")
    assert "NotRegistered" in line and "no.such.task" in line
    # And the original payload is kept intact in the dead letter
    message = decode_task(unpack(dead.payload), project.app.accept_content)
    assert message.id == result.id
    assert message.name == "no.such.task"
    assert list(message.args) == [1, "two"]
    assert dict(message.kwargs) == {"three": 3}
    # And the worker still serves known tasks
    _assert_still_serving(project)


def test_a_pickled_message_is_refused_by_a_json_only_worker_with_advice(make_project: ProjectFactory) -> None:
    # Given a worker that accepts only JSON (the default)
    project = make_project(TASKS)
    assert project.app.conf.accept_content == ["json"]
    worker = project.worker(pool="solo")
    # When a producer sends a task serialised with pickle
    result = project.module.kind.apply_async(args=((1, 2),), serializer="pickle")
    # Then the message is dead-lettered
    (dead,) = _dead_letters(project)
    assert unpack(dead.payload).content_type == serializers.PICKLE_TYPE
    assert unpack(dead.payload).headers["id"] == result.id
    # And the log line tells how to accept it
    line = worker.wait_for("refusing content type")
    assert "accept_content" in line
    assert "pickle" in line
    # And the task did not run; the worker goes on
    assert result.state == states.PENDING
    _assert_still_serving(project)


def test_a_pickled_message_runs_when_pickle_is_accepted(make_project: ProjectFactory) -> None:
    # Given a worker whose accept_content includes pickle
    project = make_project(TASKS, accept_content=["json", "pickle"])
    project.worker(pool="solo")
    # When a producer sends a task serialised with pickle, and the same call as JSON
    pickled = project.module.kind.apply_async(args=((1, 2),), serializer="pickle")
    plain = project.module.kind.apply_async(args=((1, 2),))
    # Then both run, and the pickled one really travelled as pickle (its tuple survived)
    assert pickled.get(timeout=30) == "tuple"
    assert plain.get(timeout=30) == "list"
    assert project.app.broker.dead_letters() == []


def _start_linger_then_kill(project: Project) -> AsyncResult[Any]:
    """Send the acks_late `linger` task, let a worker start it, then SIGKILL that worker."""
    result: AsyncResult[Any] = project.module.linger.delay("once")
    first = project.worker(pool="solo")
    wait_until(lambda: list(project.path.glob("started-once-*")), 30, "the task to start")
    first.kill()
    return result


def test_a_message_redelivered_more_than_max_deliveries_is_dead_lettered(
    make_project: ProjectFactory,
) -> None:
    # Given a max of one delivery, and an acks_late task whose worker was SIGKILLed mid-run
    project = make_project(TASKS, worker_max_deliveries=1)
    result = _start_linger_then_kill(project)
    # When a second worker picks the message up again after the dead worker's lease lapses
    second = project.worker(pool="solo")
    # Then it goes to the dead-letter store instead of running a second time
    (dead,) = _dead_letters(project)
    assert "delivered 2 times" in dead.reason and "max_deliveries" in dead.reason
    assert unpack(dead.payload).headers["id"] == result.id
    second.wait_for("max_deliveries")
    assert len(list(project.path.glob("started-once-*"))) == 1
    assert project.app.broker.size("celery") == 0
    # And the caller is not left waiting: the task failed as a lost worker
    with pytest.raises(WorkerLostError, match="max_deliveries"):
        result.get(timeout=30)
    assert result.state == states.FAILURE
    # And the second worker goes on serving
    _assert_still_serving(project)


def test_a_killed_acks_late_task_within_max_deliveries_runs_again(make_project: ProjectFactory) -> None:
    # Given the default max deliveries, and an acks_late task whose worker was SIGKILLed mid-run
    project = make_project(TASKS)
    _start_linger_then_kill(project)
    # When a second worker starts
    second = project.worker(pool="solo")
    # Then the task is delivered again rather than dead-lettered
    wait_until(lambda: len(list(project.path.glob("started-once-*"))) == 2, 30, "the task to run again")
    assert project.app.broker.dead_letters() == []
    second.kill()


class Widget:
    """Something JSON cannot encode."""


def test_delay_with_an_unserialisable_argument_raises_and_publishes_nothing(
    make_project: ProjectFactory,
) -> None:
    # Given a task and a producer
    project = make_project(TASKS)
    store = project.module.store
    # When it is called with an argument JSON cannot encode, positionally and by keyword
    with pytest.raises(TypeError) as positional:
        store.delay("/tmp/x", Widget())
    with pytest.raises(TypeError) as keyword:
        store.delay("/tmp/x", handle=Widget())
    # Then the error names the argument and its type
    assert "'handle'" in str(positional.value) and "Widget" in str(positional.value)
    assert "argument 1" in str(positional.value)
    assert "keyword argument 'handle'" in str(keyword.value) and "Widget" in str(keyword.value)
    assert "json" in str(positional.value)
    # And nothing was published
    assert project.app.broker.size("celery") == 0
