"""The CPU a prefork child spends per task, measured inside one process, beside the bare loop.

  .venv/bin/python benchmarks/child_path.py [--redis redis://127.0.0.1:6379/13] [--n 40000]
      [--repeat 3] [--incr]

A prefork child's own objects (its `Consumer` and `_ChildPool`, with a real slot record, acks
and leases) drain `--n` queued `noop` tasks here, in this process, so the figure is the
framework's path per task without process start-up or a parent. The bare loop of the peers'
`bare` system (RPOP of 100, json.loads, run) drains the same number of its own messages. Both
report user and system CPU per task (`os.times`). Without `--incr` the task does nothing, which
shows the framework's cost in a warm loop; with it, each task makes the peers' INCR, and the
framework's cost grows with the cache it loses to that round trip. Pin the process with
`taskset -c 0` to keep the scheduler out of the figures. The database is flushed between runs:
use one of your own.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Callable

import redis
from redis_client import BARE_QUEUE, bare_bulk, load_app
from redis_drain import Cpu

from celeriac import group
from celeriac.worker.consumer import Consumer, Settings
from celeriac.worker.pools.prefork import _ChildPool
from celeriac.worker.pools.slots import RunningSlot

PREFETCH = 64  # --prefetch-multiplier 64 at one process, as the peers benchmark runs celeriac


def per_task(drain: Callable[[], None], tasks: int) -> str:
    """Run `drain` and return its user and system CPU per task."""
    before = os.times()
    drain()
    after = os.times()
    return (Cpu(after.user, after.system) - Cpu(before.user, before.system)).per_task(tasks)


def celeriac_drain(url: str, tasks: int, incr: bool) -> str:
    """Queue `tasks` noops and drain them through a prefork child's consumer, in this process."""
    bench = load_app(url, results=False)
    app, task = bench.app, bench.noop if incr else bench.idle
    redis.Redis.from_url(url).flushdb()
    group(task.s(index) for index in range(tasks)).apply_async()
    consumer = Consumer(
        app, app.broker, _ChildPool(app, RunningSlot()), Settings("bench@child", ("celery",), PREFETCH, 10)
    )
    stop = threading.Event()

    def drain() -> None:
        while consumer.processed < tasks:
            consumer.step(stop=stop)

    figure = per_task(drain, tasks)
    app.close()
    return figure


def bare_drain(url: str, tasks: int, incr: bool) -> str:
    """Queue `tasks` bare messages and drain them as the peers' bare worker does."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    bare_bulk(client, tasks)  # queues the messages; its timing is not needed here
    counter = redis.Redis.from_url(url)

    def noop(x: int) -> int:
        if incr:
            counter.incr("bench:done")
        return x

    def drain() -> None:
        done = 0
        while done < tasks:
            for raw in client.rpop(BARE_QUEUE, 100) or []:
                noop(*json.loads(raw)["args"])
                done += 1

    return per_task(drain, tasks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--n", type=int, default=40000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--incr", action="store_true", help="each task makes the peers' INCR")
    args = parser.parse_args()
    for _ in range(args.repeat):
        print(f"    bare: {bare_drain(args.redis, args.n, args.incr)}")
        print(f"celeriac: {celeriac_drain(args.redis, args.n, args.incr)}")


if __name__ == "__main__":
    main()
