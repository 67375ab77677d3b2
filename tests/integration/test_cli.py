"""The `celeriac` command line as users type it: help, -A forms, node names, pools, queues and purge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import ROOT, Project, WorkerProcess

TASKS = """
@app.task
def add(x, y):
    return x + y


other_name = app
"""

ProjectFactory = Callable[..., Project]
CONSOLE_SCRIPT = ROOT / ".venv" / "bin" / "celeriac"


def _celeriac(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return project.run(sys.executable, "-m", "celeriac", *args)


def _start(project: Project, *args: str) -> WorkerProcess:
    """Start `python -m celeriac <args>` in the project folder, exactly as given, and wait for ready."""
    worker = WorkerProcess([sys.executable, "-m", "celeriac", *args], project.path, project.env())
    project.workers.append(worker)
    worker.wait_for("ready.")
    return worker


def test_the_top_level_help_lists_the_app_option_and_the_commands(make_project: ProjectFactory) -> None:
    # Given an installed celeriac
    project = make_project()
    # When `python -m celeriac --help` runs
    done = _celeriac(project, "--help")
    # Then it succeeds and lists -A and the commands
    assert done.returncode == 0, done.stderr
    for text in ("-A, --app", "--broker", "worker", "purge"):
        assert text in done.stdout


def test_the_worker_help_lists_celerys_flags(make_project: ProjectFactory) -> None:
    # Given an installed celeriac
    project = make_project()
    # When `python -m celeriac worker --help` runs
    done = _celeriac(project, "worker", "--help")
    # Then every flag Celery users type is listed, pools included
    assert done.returncode == 0, done.stderr
    for flag in ("-l, --loglevel", "-c, --concurrency", "-P, --pool", "-Q, --queues", "-n, --hostname"):
        assert flag in done.stdout
    assert "--prefetch-multiplier" in done.stdout
    assert "prefork|threads|solo" in done.stdout


def test_n_expands_the_host_into_the_node_name_shown_in_the_banner(make_project: ProjectFactory) -> None:
    # Given a project
    project = make_project(TASKS)
    # When a worker starts with -n 'alpha@%h'
    worker = project.worker("-n", "alpha@%h", pool="solo")
    # Then the banner and the ready line name alpha@<this host>
    node = f"alpha@{socket.gethostname()}"
    assert f"{node} v" in worker.wait_for(node)
    assert f"{node} ready." in worker.output
    assert "%h" not in worker.output


def test_a_worker_finds_the_app_by_module_colon_attribute(make_project: ProjectFactory) -> None:
    # Given a module whose app is also bound to another name
    project = make_project(TASKS)
    # When a worker starts with -A module:other_name
    worker = _start(
        project, "-A", f"{project.module_name}:other_name", "worker", "--loglevel", "INFO", "--pool", "solo"
    )
    # Then it serves that app's tasks
    assert project.module.add.delay(2, 3).get(timeout=30) == 5
    assert f". {project.module_name}.add" in worker.output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{module}:nothing_here", "is not a celeriac app"),
        ("{module}:add", "is not a celeriac app"),
        ("plain", "has no celeriac app"),
        ("no_such_module_xyz", "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_an_app_option_that_names_no_app_fails_clearly(
    make_project: ProjectFactory, spec: str, message: str
) -> None:
    # Given a project, and next to it a module that defines no app
    project = make_project(TASKS)
    (project.path / "plain.py").write_text("VALUE = 1\n")
    # When a worker is started with -A naming something that holds no app
    done = _celeriac(project, "-A", spec.format(module=project.module_name), "worker", "--pool", "solo")
    # Then it exits non-zero with a one-line error, not a traceback
    assert done.returncode != 0
    assert message in done.stderr
    assert "Error:" in done.stderr
    assert "Traceback" not in done.stderr


def test_purge_removes_waiting_messages_and_says_how_many(make_project: ProjectFactory) -> None:
    # Given three messages waiting and no worker
    project = make_project(TASKS)
    for n in range(3):
        project.module.add.delay(n, n)
    assert project.app.broker.size("celery") == 3
    # When `celeriac -A module purge -f` runs
    done = _celeriac(project, "-A", project.module_name, "purge", "-f")
    # Then it says how many it deleted, and the queue is empty
    assert done.returncode == 0, done.stderr
    assert "Purged 3 messages" in done.stdout
    assert project.app.broker.size("celery") == 0
    # And a second purge finds nothing
    again = _celeriac(project, "-A", project.module_name, "purge", "-f")
    assert "Purged 0 messages" in again.stdout


def test_purge_without_force_asks_and_keeps_messages_when_refused(make_project: ProjectFactory) -> None:
    # Given two messages waiting
    project = make_project(TASKS)
    project.module.add.delay(1, 1)
    project.module.add.delay(2, 2)
    # When purge runs without -f and the user answers no
    done = subprocess.run(
        [sys.executable, "-m", "celeriac", "-A", project.module_name, "purge"],
        cwd=project.path,
        env=project.env(),
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it asked, deleted nothing, and said it aborted
    assert "Delete all messages waiting in celery?" in done.stdout
    assert done.returncode != 0
    assert "Aborted" in done.stderr
    assert project.app.broker.size("celery") == 2


def test_the_console_script_is_installed_and_works(make_project: ProjectFactory) -> None:
    # Given the project's virtualenv
    assert CONSOLE_SCRIPT.exists()
    assert os.access(CONSOLE_SCRIPT, os.X_OK)
    project = make_project(TASKS)
    project.module.add.delay(1, 1)
    # When the `celeriac` script runs --version and a purge
    version = project.run(str(CONSOLE_SCRIPT), "--version")
    purged = project.run(str(CONSOLE_SCRIPT), "-A", project.module_name, "purge", "-f")
    # Then both work as through python -m celeriac
    assert version.returncode == 0, version.stderr
    assert "version" in version.stdout
    assert purged.returncode == 0, purged.stderr
    assert "Purged 1 message from 1 known task queue." in purged.stdout


def test_loglevel_with_an_equals_sign_works_as_in_the_guide(make_project: ProjectFactory) -> None:
    # Given a project
    project = make_project(TASKS)
    # When a worker is started as the guide does, with --loglevel=info
    worker = _start(project, "-A", project.module_name, "worker", "--loglevel=info", "--pool", "solo")
    # Then INFO lines are logged, task receipts included
    assert project.module.add.delay(4, 4).get(timeout=30) == 8
    assert "INFO/MainProcess" in worker.wait_for("ready.")
    worker.wait_for(f"Task {project.module_name}.add[")


def test_an_unknown_loglevel_is_a_usage_error(make_project: ProjectFactory) -> None:
    # Given a project
    project = make_project(TASKS)
    # When a worker is started with a log level that does not exist
    done = _celeriac(project, "-A", project.module_name, "worker", "--loglevel=chatty", "--pool", "solo")
    # Then it exits with a usage error naming the option and the value
    assert done.returncode == 2
    assert "--loglevel" in done.stderr and "chatty" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("pool", "concurrency", "shown"), [("threads", 3, "3 (threads)"), ("solo", 4, "1 (solo)")]
)
def test_the_banner_shows_the_pool(
    make_project: ProjectFactory, pool: str, concurrency: int, shown: str
) -> None:
    # Given a project
    project = make_project(TASKS)
    # When a worker starts with --pool threads or solo
    worker = project.worker(pool=pool, concurrency=concurrency)
    # Then the banner shows the concurrency and the pool, and tasks run
    assert f".> concurrency: {shown}" in worker.output
    assert project.module.add.delay(1, 2).get(timeout=30) == 3


def test_q_limits_the_worker_to_the_named_queues(make_project: ProjectFactory) -> None:
    # Given a message on queue "fast" and one on the default queue
    project = make_project(TASKS)
    on_fast = project.module.add.apply_async((1, 1), queue="fast")
    project.module.add.apply_async((2, 2))
    # When a worker starts with -Q fast
    worker = project.worker("-Q", "fast", pool="solo")
    # Then it lists and serves only that queue
    assert on_fast.get(timeout=30) == 2
    assert ".> fast" in worker.output
    assert ".> celery " not in worker.output
    assert project.app.broker.size("celery") == 1
