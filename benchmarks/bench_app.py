"""The app and task that `throughput.py` measures; the worker loads it with `-A bench_app`.

Configured from the environment, so the benchmark's producer and its worker agree:
  CELERIAC_BENCH_DIR      folder of the SQLite broker file (and of the counter file)
  CELERIAC_BENCH_RESULTS  "1": store results in the broker's file (latency phase); otherwise
                          task_ignore_result=True and no result backend (throughput phases)

Every execution of `noop` appends one byte to `done.count` in that folder (one O_APPEND write,
atomic across processes), so the size of that file is how many tasks have run: the driver's
completion signal counts executions, not acks.
"""

from __future__ import annotations

import os

from celeriac import Celery

BENCH_DIR = os.environ.get("CELERIAC_BENCH_DIR", os.getcwd())
WITH_RESULTS = os.environ.get("CELERIAC_BENCH_RESULTS") == "1"
BROKER_URL = "sqlite:///" + os.path.join(os.path.abspath(BENCH_DIR), "broker.db")
COUNTER = os.path.join(os.path.abspath(BENCH_DIR), "done.count")

app = Celery("bench_app", broker=BROKER_URL, backend=BROKER_URL if WITH_RESULTS else None)
app.conf.update(task_ignore_result=not WITH_RESULTS)

_counter: dict[int, int] = {}  # pid -> file descriptor, so a forked child opens its own


def count_done() -> None:
    """Record one more executed task."""
    pid = os.getpid()
    fd = _counter.get(pid)
    if fd is None:
        fd = _counter[pid] = os.open(COUNTER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b".")


@app.task(name="noop")
def noop(x: int) -> int:
    """Do nothing but be counted; return the argument."""
    count_done()
    return x
