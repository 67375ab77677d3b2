"""celeriac and the real Celery (5.7, test-only dependency) on one Redis, in both directions.

Each test writes the same tasks twice, once for each library, and runs a real worker of
one while the other is the client.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess, require_service

REDIS_URL = "redis://127.0.0.1:6379/11"  # this suite's own database
TIMEOUT = 30

TASKS = """
import os
from {library} import Celery

app = Celery("interop", broker={url!r}, backend={url!r})
app.conf.update(result_expires=600, broker_connection_retry_on_startup=True)


@app.task(name="interop.add")
def add(x, y):
    return x + y


@app.task(name="interop.fail")
def fail(x):
    raise ValueError("boom", x)


@app.task(name="interop.flaky", bind=True, max_retries=3)
def flaky(self, marker):
    # Fails on its first run, then succeeds and reports how many retries it took.
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise self.retry(countdown=1, exc=RuntimeError("first try"))
    return self.request.retries
"""


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[dict[str, ModuleType]]:
    """Import a Celery-side and a celeriac-side tasks module; flush this suite's Redis database."""
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    modules = {}
    for library in ("celery", "celeriac"):
        name = f"{library}_side_{tmp_path.name}".replace("-", "_")
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(TASKS.format(library=library, url=REDIS_URL)))
        sys.path.insert(0, str(tmp_path))
        try:
            modules[library] = importlib.import_module(name)
        finally:
            sys.path.remove(str(tmp_path))
    yield modules
    for module in modules.values():
        sys.modules.pop(module.__name__, None)


def _worker(library: str, module: ModuleType, folder: Path) -> WorkerProcess:
    import os

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), env.get("PYTHONPATH", "")])
    args = [
        sys.executable,
        "-m",
        library,
        "-A",
        module.__name__,
        "worker",
        "--loglevel",
        "INFO",
        "--pool",
        "solo",
    ]
    if library == "celery":
        args += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    worker = WorkerProcess(args, folder, env)
    worker.wait_for("ready.")
    return worker


@pytest.fixture
def run_worker(tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(library: str, module: ModuleType) -> WorkerProcess:
        worker = _worker(library, module, tmp_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=30)
        worker.cleanup()


DIRECTIONS = [("celery", "celeriac"), ("celeriac", "celery")]
IDS = ["celery-client-celeriac-worker", "celeriac-client-celery-worker"]


@pytest.mark.parametrize(("client", "server"), DIRECTIONS, ids=IDS)
def test_a_task_sent_by_one_side_runs_on_the_other(
    sides: dict[str, ModuleType], run_worker: Any, client: str, server: str
) -> None:
    # Given a worker of one library
    run_worker(server, sides[server])
    # When the other library's client sends a task and waits for it
    result = sides[client].add.delay(2, 3)
    # Then the client's get() returns what the other side's worker computed
    assert result.get(timeout=TIMEOUT) == 5
    assert result.status == "SUCCESS"


@pytest.mark.parametrize(("client", "server"), DIRECTIONS, ids=IDS)
def test_a_failure_on_one_side_re_raises_the_same_exception_on_the_other(
    sides: dict[str, ModuleType], run_worker: Any, client: str, server: str
) -> None:
    # Given a worker of one library
    run_worker(server, sides[server])
    # When a task that raises ValueError("boom", 7) runs there
    result = sides[client].fail.delay(7)
    # Then the other library's client re-raises ValueError with the same arguments
    with pytest.raises(ValueError) as raised:
        result.get(timeout=TIMEOUT)
    assert raised.value.args == ("boom", 7)
    assert result.status == "FAILURE"


@pytest.mark.parametrize(("client", "server"), DIRECTIONS, ids=IDS)
def test_a_retry_with_countdown_completes_across_sides(
    sides: dict[str, ModuleType], run_worker: Any, client: str, server: str, tmp_path: Path
) -> None:
    # Given a worker of one library and a task that retries once with a countdown
    run_worker(server, sides[server])
    # When the other side sends it
    result = sides[client].flaky.delay(str(tmp_path / "tried-once"))
    # Then it completes after exactly one retry
    assert result.get(timeout=TIMEOUT) == 1


def test_a_celery_countdown_task_runs_on_a_celeriac_worker_when_due(
    sides: dict[str, ModuleType], run_worker: Any
) -> None:
    # Given a celeriac worker
    run_worker("celeriac", sides["celeriac"])
    # When a Celery client sends a task with a countdown (Celery puts it straight on the queue)
    import time

    sent = time.time()
    result = sides["celery"].add.apply_async((20, 22), countdown=2)
    # Then it runs, and not before it is due
    assert result.get(timeout=TIMEOUT) == 42
    assert time.time() - sent >= 2
