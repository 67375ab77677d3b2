"""The app that `redis_client.py` measures; its round-trip worker loads it with `-A redis_app`.

Configured from the environment, as the peers benchmark configures its celeriac module:
  CELERIAC_BENCH_REDIS    Redis URL (default redis://127.0.0.1:6379/13)
  CELERIAC_BENCH_RESULTS  "1": the Redis result backend on the same URL; otherwise
                          task_ignore_result=True and no result backend

`noop` makes one INCR, as the peers benchmark's task does, so round trips compare like for like;
`idle` does nothing (for `child_path.py`).
"""

from __future__ import annotations

import os

import redis

from celeriac import Celery

REDIS_URL = os.environ.get("CELERIAC_BENCH_REDIS", "redis://127.0.0.1:6379/13")
WITH_RESULTS = os.environ.get("CELERIAC_BENCH_RESULTS") == "1"

app = Celery("redis_app", broker=REDIS_URL, backend=REDIS_URL if WITH_RESULTS else None)
app.conf.update(task_ignore_result=not WITH_RESULTS, result_expires=600)


COUNTER_KEY = "bench:done"
_clients: dict[int, redis.Redis] = {}  # pid -> client, so a forked child makes its own


def count_done() -> None:
    """INCR the counter, on one client per process."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        client = _clients[pid] = redis.Redis.from_url(REDIS_URL)
    client.incr(COUNTER_KEY)


@app.task(name="noop")
def noop(x: int) -> int:
    """Count one execution; return the argument."""
    count_done()
    return x


@app.task(name="idle")
def idle(x: int) -> int:
    """Return the argument and do nothing else: `child_path.py`'s task for the framework alone."""
    return x
