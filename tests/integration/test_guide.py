"""The guide's first sections, run as written with only the import (and broker URL) changed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, WorkerProcess
from tests.guide.extract import (
    GUIDE,
    chaining_task_definitions,
    guide_call_output,
    guide_calls,
    guide_chaining,
    guide_chaining_output,
    guide_tasks,
)

pytestmark = pytest.mark.skipif(not GUIDE.exists(), reason=f"the guide is not at {GUIDE}")

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture
def guide_project(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(guide_tasks("sqlite:///tasks.db"))
    (tmp_path / "call_tasks.py").write_text(guide_calls())
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start_guide_worker(folder: Path) -> WorkerProcess:
    # The guide's command: `celery -A tasks worker --loglevel=info`, with our program name.
    args = [
        sys.executable,
        "-m",
        "celeriac",
        "-A",
        "tasks",
        "worker",
        "--loglevel=info",
        "--concurrency",
        "2",
    ]
    worker = WorkerProcess(args, folder, _env())
    worker.wait_for("ready.")
    return worker


def test_the_guide_examples_run_unchanged_but_for_the_import(guide_project: Path) -> None:
    # Given the guide's tasks.py and a worker started the way the guide starts it
    worker = _start_guide_worker(guide_project)
    try:
        # When the guide's call_tasks.py runs
        done = subprocess.run(
            [sys.executable, "call_tasks.py"],
            cwd=guide_project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Then it prints what the guide says it prints, ids aside
        assert done.returncode == 0, done.stderr
        printed = done.stdout.strip().splitlines()
        expected = guide_call_output()
        caller_lines = [line for line in expected if not line.startswith(("Sending", "Welcome"))]
        assert len(printed) == len(caller_lines)
        for got, want in zip(printed, caller_lines, strict=True):
            label, _, _value = want.partition(": ")
            assert got.startswith(label + ": ")
            if label.endswith("ID"):
                assert UUID.match(got.split(": ", 1)[1])
            else:
                assert got == want
        # And the task's own prints appear in the worker's output
        worker.wait_for("Welcome email sent to Alice at user@example.com")
        worker.wait_for("Processed image: /uploads/photo.jpg", timeout=30)
    finally:
        assert worker.stop() == 0
        worker.cleanup()


def test_the_worker_banner_has_celerys_shape(guide_project: Path) -> None:
    # Given the guide's tasks.py
    worker = _start_guide_worker(guide_project)
    try:
        # Then the banner names the app, transport, results, pool, queues and tasks
        output = worker.output
        assert re.search(r"celeriac@\S+ v\d+\.\d+\.\d+", output)
        assert "[config]" in output
        assert re.search(r"\.> app:\s+tasks:0x[0-9a-f]+", output)
        assert ".> transport:   sqlite:///tasks.db" in output
        assert ".> results:     sqlite:///tasks.db" in output
        assert ".> concurrency: 2 (prefork)" in output
        assert re.search(r"\.> celery\s+exchange=celery\(direct\) key=celery", output)
        assert "[tasks]\n  . tasks.process_image\n  . tasks.send_welcome_email" in output
        assert output.index("[tasks]") < output.index("ready.")
    finally:
        assert worker.stop() == 0
        worker.cleanup()


def test_the_guide_backend_may_be_spelt_the_celery_way(guide_project: Path) -> None:
    # Given the guide's tasks.py with Celery's SQLAlchemy-style result URL
    source = (guide_project / "tasks.py").read_text()
    source = source.replace("backend='sqlite:///tasks.db'", "backend='db+sqlite:///results.db'")
    (guide_project / "tasks.py").write_text(source)
    worker = _start_guide_worker(guide_project)
    try:
        # When a task is sent and its result read
        check = (
            "from tasks import send_welcome_email\n"
            "print(send_welcome_email.delay('a@b.c', 'A').get(timeout=20))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", check],
            cwd=guide_project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Then the result comes back from results.db
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "{'status': 'sent', 'email': 'a@b.c'}"
        assert (guide_project / "results.db").exists()
    finally:
        worker.stop()
        worker.cleanup()


def test_the_guide_chain_and_group_example_runs(guide_project: Path) -> None:
    # Given the guide's chaining tasks where the worker can import them (in tasks.py, as a
    # user would put them: the guide defines them in the calling script, whose tasks are
    # named after the app, tasks.add and so on)
    with (guide_project / "tasks.py").open("a") as tasks:
        tasks.write("\n\n" + chaining_task_definitions())
    (guide_project / "chaining.py").write_text(guide_chaining())
    worker = _start_guide_worker(guide_project)
    try:
        # When the guide's chaining.py runs as written
        done = subprocess.run(
            [sys.executable, "chaining.py"],
            cwd=guide_project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Then it prints the chain's and the group's results as the guide shows
        assert done.returncode == 0, done.stderr
        expected = guide_chaining_output()
        printed = done.stdout.strip().splitlines()
        assert printed == [line for line in expected if line.startswith(("Chain result", "Group results"))]
        # And the tasks' own prints appear in the worker's output
        for line in expected:
            if not line.startswith(("Chain result", "Group results")):
                worker.wait_for(line)
    finally:
        assert worker.stop() == 0
        worker.cleanup()
