"""`make demo`: the guide's first example, end to end, against a real celeriac worker on SQLite.

1. lays out `.demo/` in the repository root with the guide's `tasks.py` and `call_tasks.py`
   (copies of `examples/guide/`, the guide's code with only the import changed, using
   `sqlite:///tasks.db` as broker and result backend);
2. starts `python -m celeriac -A tasks worker --loglevel=info --concurrency 2` there and waits
   for its "ready." line;
3. runs `call_tasks.py` as the guide does;
4. waits for the image task's result;
5. shows the worker's log of the tasks it received and finished;
6. stops the worker with SIGTERM (warm shutdown) and checks that it exits with status 0.

On any failure it prints the worker's whole output and exits with status 1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from celeriac.testing import ProcessExited, WatchedProcess

ROOT = Path(__file__).resolve().parent.parent
GUIDE = Path(__file__).resolve().parent / "guide"
DEMO = ROOT / ".demo"
GUIDE_FILES = ("tasks.py", "call_tasks.py")
SQLITE_SUFFIXES = (".db", ".db-wal", ".db-shm", ".db-journal")

READY_TIMEOUT = 30.0  # seconds for the worker to print "ready."
CALLS_TIMEOUT = 60.0  # seconds for call_tasks.py to finish
RESULT_TIMEOUT = 30.0  # seconds for the image task's result
LOG_TIMEOUT = 10.0  # seconds for a log line once its task is done
STOP_TIMEOUT = 20.0  # seconds for the warm shutdown

CALL_OUTPUT = ("Task ID:", "Task status:", "Result:", "Image task ID:", "Pending:")
TASK_EVENT = re.compile(r"Task \S+\[[0-9a-f-]+\] (received|succeeded)")


class DemoFailed(Exception):
    """A step did not go as the guide says."""


class WorkerProcess(WatchedProcess):
    """A worker subprocess whose merged stdout and stderr are collected line by line."""

    def wait_until(self, matches: Callable[[str], bool], timeout: float, what: str, start: int = 0) -> int:
        """Return the index of the first line from `start` on that `matches`; fail after `timeout`."""
        try:
            return self.wait_for_line(matches, timeout, start)
        except ProcessExited:
            self.process.wait(5)  # let the exit status settle
            raise DemoFailed(f"the worker exited (status {self.process.poll()}) before {what}") from None
        except TimeoutError:
            raise DemoFailed(f"no sign of {what} from the worker within {timeout:.0f} s") from None

    def stop(self, timeout: float) -> int:
        """Ask for a warm shutdown (SIGTERM) and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise DemoFailed(f"the worker did not stop within {timeout:.0f} s of SIGTERM") from exc
        self._reader.join(timeout=5)
        return status

    def kill(self) -> None:
        """Kill the worker if it still runs (its pool children die with the pipe and their parent)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(timeout=5)


# output ------------------------------------------------------------------------------------


def heading(number: int, title: str) -> None:
    print(f"\n== {number}. {title} " + "=" * max(3, 72 - len(title)), flush=True)


def show(prefix: str, lines: Sequence[str]) -> None:
    for line in lines:
        print(f"{prefix} | {line}")
    sys.stdout.flush()


# steps -------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of the subprocesses: the checkout importable even without installing it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # task prints and logs arrive as they happen
    return env


def prepare() -> None:
    DEMO.mkdir(exist_ok=True)
    for path in DEMO.iterdir():
        if path.name.endswith(SQLITE_SUFFIXES):
            path.unlink()
    for name in GUIDE_FILES:
        (DEMO / name).write_bytes((GUIDE / name).read_bytes())
    print(f"{DEMO.relative_to(ROOT)}/ is ready: {', '.join(GUIDE_FILES)} copied from examples/guide/,")
    print("old SQLite files removed; broker and result backend: sqlite:///tasks.db")


def start_worker(env: dict[str, str]) -> tuple[WorkerProcess, int]:
    argv = [
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
    print(
        f"$ cd {DEMO.relative_to(ROOT)} && python -m celeriac -A tasks worker --loglevel=info --concurrency 2"
    )
    started = time.monotonic()
    worker = WorkerProcess(argv, DEMO, env)
    ready = worker.wait_until(lambda line: line.endswith("ready."), READY_TIMEOUT, 'its "ready." line')
    show("worker", worker.snapshot()[: ready + 1])
    print(f"\nThe worker is ready ({time.monotonic() - started:.2f} s after start).")
    return worker, ready


def run_calls(env: dict[str, str]) -> str:
    print("$ python call_tasks.py")
    try:
        done = subprocess.run(
            [sys.executable, "call_tasks.py"],
            cwd=DEMO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CALLS_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoFailed(f"call_tasks.py did not finish within {CALLS_TIMEOUT:.0f} s") from exc
    lines = done.stdout.splitlines()
    show("call_tasks.py", lines)
    if done.returncode != 0:
        show("call_tasks.py (stderr)", done.stderr.splitlines())
        raise DemoFailed(f"call_tasks.py exited with status {done.returncode}")
    for prefix in CALL_OUTPUT:
        if not any(line.startswith(prefix) for line in lines):
            raise DemoFailed(f"call_tasks.py printed no {prefix!r} line")
    image_id = next(line for line in lines if line.startswith("Image task ID:")).split(":", 1)[1].strip()
    return image_id


def wait_for_image(image_id: str) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # works from a checkout that is not installed
    from celeriac import Celery
    from celeriac.exceptions import TimeoutError as ResultTimeout
    from celeriac.result import AsyncResult

    url = f"sqlite:///{DEMO / 'tasks.db'}"
    app = Celery("demo", broker=url, backend=url, set_as_current=False)
    try:
        result: AsyncResult[object] = AsyncResult(image_id, app=app)
        print(f"AsyncResult({image_id!r}).status = {result.status}")
        started = time.monotonic()
        try:
            value = result.get(timeout=RESULT_TIMEOUT)
        except ResultTimeout as exc:
            raise DemoFailed(f"the image task gave no result within {RESULT_TIMEOUT:.0f} s") from exc
        print(f"AsyncResult(...).get() = {value!r}  (waited {time.monotonic() - started:.2f} s)")
        print(f"AsyncResult(...).status = {result.status}")
    finally:
        app.close()


def show_task_log(worker: WorkerProcess, ready: int, image_id: str) -> None:
    worker.wait_until(
        lambda line: f"[{image_id}] succeeded" in line, LOG_TIMEOUT, "the image task's success", ready
    )
    lines = worker.snapshot()[ready + 1 :]
    show("worker", [line for line in lines if TASK_EVENT.search(line)])
    printed = [line for line in lines if not line.startswith("[")]
    if printed:
        print("\nWhat the tasks printed (in the worker):")
        show("worker", printed)


def stop_worker(worker: WorkerProcess) -> None:
    print("Sending SIGTERM (warm shutdown) ...")
    before = len(worker.snapshot())
    status = worker.stop(STOP_TIMEOUT)
    show("worker", worker.snapshot()[before:])
    if status != 0:
        raise DemoFailed(f"the worker exited with status {status} after SIGTERM, not 0")
    print("The worker stopped cleanly (exit status 0).")


def main() -> int:
    began = time.monotonic()
    env = child_env()
    worker: WorkerProcess | None = None
    try:
        heading(1, "Set up .demo/ with the guide's tasks.py")
        prepare()
        heading(2, "Start a worker")
        worker, ready = start_worker(env)
        heading(3, "Call the tasks (the guide's call_tasks.py)")
        image_id = run_calls(env)
        heading(4, "Wait for the image task's result")
        wait_for_image(image_id)
        heading(5, "What the worker logged")
        show_task_log(worker, ready, image_id)
        heading(6, "Stop the worker")
        stop_worker(worker)
    except Exception as exc:
        sys.stdout.flush()
        if not isinstance(exc, DemoFailed):
            traceback.print_exc()
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        if worker is not None:
            worker.kill()
            print(f"\nThe worker's output (exit status {worker.process.returncode}):", file=sys.stderr)
            for line in worker.snapshot():
                print(f"worker | {line}", file=sys.stderr)
        return 1
    finally:
        if worker is not None:
            worker.kill()
    print(f"\nDemo finished in {time.monotonic() - began:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
