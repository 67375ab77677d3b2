"""Shared fixtures: real worker processes on real brokers, started per test in a scratch folder."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from celeriac.testing import ProcessExited, WatchedProcess

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def require_service(name: str, host: str, port: int) -> None:
    """Skip loudly when a service is down; under CI (CI=true) fail instead."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        message = f"{name} at {host}:{port} is not reachable ({exc})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI requires it")
        pytest.skip(f"{message}: start it to run these tests")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a private server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_answers(port: int) -> bool:
    """Whether a Redis server (or Sentinel) on 127.0.0.1:`port` answers PING yet."""
    import redis  # only the Redis tests need it

    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


Closable = TypeVar("Closable")


def closing_factory(create: Callable[..., Closable]) -> Iterator[Callable[..., Closable]]:
    """The body of a factory fixture: yield `create`, then close everything it made.

    Use as ``yield from closing_factory(lambda **options: SomeBroker(url, options))``.
    """
    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Closable:
        thing = create(*args, **kwargs)
        made.append(thing)
        return thing

    yield make
    for thing in made:
        thing.close()


class WorkerProcess(WatchedProcess):
    """A `celeriac worker` subprocess whose output is collected line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        super().__init__(args, cwd, env, new_session=True)
        self._terminated = False

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.process

    @property
    def output(self) -> str:
        return "\n".join(self.snapshot())

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """Wait until a line containing `text` is printed; return that line."""
        try:
            index = self.wait_for_line(lambda line: text in line, timeout)
        except (TimeoutError, ProcessExited):
            raise AssertionError(f"worker never printed {text!r}; output:\n" + self.output) from None
        return self.snapshot()[index]

    def signal(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            self._terminated = True
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the worker's main process (its children die with it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """Warm shutdown (unless one was already asked for); return the exit code."""
        if self.proc.poll() is None and not self._terminated:
            self.signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.join_output()
        return code

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Project:
    """A scratch folder holding a tasks module, its app (imported here too), and its workers."""

    def __init__(self, path: Path, module_name: str, module: ModuleType) -> None:
        self.path = path
        self.module_name = module_name
        self.module = module
        self.app = module.app
        self.workers: list[WorkerProcess] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.path), str(ROOT), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def worker(
        self, *extra: str, pool: str = "prefork", concurrency: int = 2, ready: bool = True
    ) -> WorkerProcess:
        """Start a worker for this project's app and wait for it to be ready."""
        args = [
            sys.executable,
            "-m",
            "celeriac",
            "-A",
            self.module_name,
            "worker",
            "--loglevel",
            "INFO",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            *extra,
        ]
        worker = WorkerProcess(args, self.path, self.env())
        self.workers.append(worker)
        if ready:
            worker.wait_for("ready.")
        return worker

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command in the project folder with the package importable."""
        return subprocess.run(
            list(args), cwd=self.path, env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def lines(self, name: str) -> list[str]:
        """The lines tasks have `record`ed in the file `name`, in order."""
        path = self.path / name
        return path.read_text().splitlines() if path.exists() else []

    def release(self, name: str = "release") -> None:
        """Create the file that tasks blocked in `wait_for_file(name)` wait for."""
        (self.path / name).touch()

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.cleanup()
        self.app.close()
        sys.modules.pop(self.module_name, None)


APP_TEMPLATE = """
import os
import time
from pathlib import Path

from celeriac import Celery

HERE = Path(__file__).resolve().parent
app = Celery({name!r}, broker={broker!r}, backend={backend!r})
app.conf.update({settings})


def record(name, line):
    # Tasks leave evidence that they ran by appending a line to a file in the project folder.
    with open(HERE / name, "a") as stream:
        stream.write(f"{{line}}\\n")


def wait_for_file(name):
    # Tasks that must stay running until the test says so wait for a file the test creates.
    while not (HERE / name).exists():
        time.sleep(0.02)
"""


@pytest.fixture
def make_project(tmp_path: Path) -> Iterator[Callable[..., Project]]:
    """Build a project: `make_project(tasks_source, broker=..., backend=..., **settings)`."""
    made: list[Project] = []

    def build(
        source: str = "",
        *,
        broker: str | None = None,
        backend: str | None = None,
        **settings: Any,
    ) -> Project:
        name = f"proj{next(_counter)}_{os.getpid()}"
        folder = tmp_path / name
        folder.mkdir()
        broker = broker or f"sqlite:///{folder / 'broker.db'}"
        backend = backend if backend is not None else f"sqlite:///{folder / 'results.db'}"
        settings.setdefault("broker_transport_options", {"lease_timeout": 3.0, "polling_interval": 0.05})
        header = APP_TEMPLATE.format(name=name, broker=broker, backend=backend or None, settings=settings)
        (folder / f"{name}.py").write_text(header + textwrap.dedent(source))
        sys.path.insert(0, str(folder))
        try:
            module = importlib.import_module(name)
        finally:
            sys.path.remove(str(folder))
        project = Project(folder, name, module)
        made.append(project)
        return project

    yield build
    for project in made:
        project.cleanup()
