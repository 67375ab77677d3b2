"""A subprocess whose output is gathered line by line, to run a real `celeriac worker` from a test.

celeriac's own tests, its demo and its benchmarks start workers this way, and a project's
integration tests can too::

    worker = WatchedProcess(["celeriac", "-A", "tasks", "worker", "--pool", "solo"])
    worker.wait_for_line(lambda line: line.endswith("ready."), timeout=30)
    ...
    worker.process.terminate()

A thread reads the merged stdout and stderr, so the pipe never fills and the process never
blocks on its own logging.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ProcessExited(RuntimeError):
    """The process ended before printing the line waited for."""


class WatchedProcess:
    """Starts `argv` and keeps every line it prints (stdout and stderr merged).

    Args:
        argv: The command.
        cwd: Its working directory.
        env: Its environment (the current one if None).
        new_session: Start it in a session of its own, so its whole process group can be signalled.
    """

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        new_session: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []  # read under `changed`, or through `snapshot()`
        self.changed = threading.Condition()
        self.closed = False  # True once the output has ended
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, name="process-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def snapshot(self) -> list[str]:
        """The lines printed so far."""
        with self.changed:
            return list(self.lines)

    def count(self, text: str) -> int:
        """How many lines printed so far contain `text`."""
        with self.changed:
            return sum(text in line for line in self.lines)

    def wait_for_line(self, matches: Callable[[str], bool], timeout: float, start: int = 0) -> int:
        """Return the index of the first line from `start` on that `matches`.

        Raises:
            TimeoutError: No such line within `timeout` seconds.
            ProcessExited: The output ended without one.
        """
        deadline = time.monotonic() + timeout
        seen = start
        with self.changed:
            while True:
                for index in range(seen, len(self.lines)):
                    if matches(self.lines[index]):
                        return index
                seen = max(seen, len(self.lines))
                if self.closed:
                    raise ProcessExited(f"{self.argv[0]} ended without printing the line waited for")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line waited for within {timeout} s")
                self.changed.wait(remaining)

    def join_output(self, timeout: float = 5.0) -> None:
        """Wait for the reading thread to take the last of the output (after the process ended)."""
        self._reader.join(timeout)
