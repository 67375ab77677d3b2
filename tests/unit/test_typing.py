"""The decorator keeps the function's signature, so mypy checks `.delay()` calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SNIPPET = """
from typing import Any
from celeriac import Celery, Task

app = Celery("t", broker="memory://")

@app.task
def add(x: int, y: int) -> int:
    return x + y

@app.task(bind=True, max_retries=3)
def label(self: Task[Any, Any], x: int) -> str:
    return str(x)

total: int = add.delay(1, 2).get()
text: str = label.delay(4).get()
add.delay("one", 2)
label.delay("four")
"""


def test_mypy_checks_task_arguments_and_result_types(tmp_path: Path) -> None:
    # Given a module that calls tasks right and wrong
    module = tmp_path / "calls.py"
    module.write_text(SNIPPET)
    # When mypy --strict checks it
    env = dict(os.environ, MYPYPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            str(module),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    # Then exactly the two wrong calls are reported, bare and bound tasks alike
    errors = [line for line in done.stdout.splitlines() if ": error:" in line and "calls.py" in line]
    assert len(errors) == 2, done.stdout
    assert 'Argument 1 to "delay" of "Task" has incompatible type "str"; expected "int"' in errors[0]
    assert 'Argument 1 to "delay" of "Task" has incompatible type "str"; expected "int"' in errors[1]
