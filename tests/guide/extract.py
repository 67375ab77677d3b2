"""Pull the code examples out of the guide our users follow (../shared/seed/celery-guide.txt).

The tests run these examples as written, with `celery` changed to `celeriac` in the
imports and, where the test says so, the broker URL changed.
"""

from __future__ import annotations

from pathlib import Path

GUIDE = Path(__file__).resolve().parents[3] / "shared" / "seed" / "celery-guide.txt"


def section(start: str, end: str) -> str:
    """Return the guide's text between the heading `start` and the next `end` marker."""
    text = GUIDE.read_text(encoding="utf-8")
    head = text.index(f"\n{start}\n") + len(start) + 2
    tail = text.index(f"\n{end}", head)
    return text[head:tail].strip("\n") + "\n"


def as_celeriac(code: str, url: str | None = None) -> str:
    """Change only the import (and the Redis URL, when `url` is given)."""
    code = code.replace("from celery import", "from celeriac import")
    code = code.replace("from celery.", "from celeriac.")
    if url is not None:
        code = code.replace("redis://localhost:6379/0", url)
    return code


def guide_tasks(url: str) -> str:
    """tasks.py as the guide builds it: "Basic Celery Setup" plus "Defining Your First Task"."""
    setup = section("Basic Celery Setup", "Defining Your First Task")
    first_task = section("Defining Your First Task", "Running the Worker")
    return as_celeriac(setup + "\n" + first_task, url)


def guide_calls() -> str:
    """call_tasks.py from "Calling Tasks"."""
    return as_celeriac(section("Calling Tasks", "Expected output:"))


def guide_call_output() -> list[str]:
    """The expected output lines of "Calling Tasks"."""
    calling = section("Calling Tasks", "Task Chaining")
    expected = calling.split("Expected output:", 1)[1]
    return [line for line in expected.strip().splitlines() if line.strip()]


def guide_chaining() -> str:
    """chaining.py from "Task Chaining"."""
    return as_celeriac(section("Task Chaining", "Expected output:"))


def chaining_task_definitions() -> str:
    """The three tasks chaining.py defines, for the worker's tasks.py (where a worker finds them)."""
    code = guide_chaining()
    start = code.index("@app.task")
    end = code.index("# Chain:")
    return code[start:end]


def guide_chaining_output() -> list[str]:
    """The expected output lines of "Task Chaining"."""
    text = section("Task Chaining", "Celery Beat")
    expected = text.split("Expected output:", 1)[1]
    return [line for line in expected.strip().splitlines() if line.strip()]
