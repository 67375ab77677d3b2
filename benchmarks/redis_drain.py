"""The peers benchmark's drain, on the local Redis, with the CPU each task costs worker and Redis.

  .venv/bin/python benchmarks/redis_drain.py [--redis redis://127.0.0.1:6379/13] [--n 60000]
      [--pool prefork|solo|threads] [--concurrency 2] [--repeat 3] [--pin] [--timeout 120]

Each run queues `--n` tasks, starts a worker on them and times the drain between the
`--skip`-th task (start-up excluded) and the last, as ../shared/bench/peers does. Runs
alternate between celeriac (`-A redis_app worker --pool ... --prefetch-multiplier 64`;
`noop` makes one INCR) and the bare loop of the peers' `bare` system (RPOP of 100, json.loads,
the same INCR) in as many processes as the celeriac pool runs tasks in. Per run it prints the
rate, the CPU per task of the worker's processes and of redis-server, in all and split into
user and system time (read from /proc, so Redis must run on this machine), and how many cores
both kept busy.

On a small virtual machine the scheduler's placement of the worker processes moves a
2-process drain by a third from run to run, for both systems. `--pin` gives each task-running
process a CPU of its own, which takes that noise out when comparing two versions of the code;
the peers benchmark does not pin. The database is flushed between runs: use one of your own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from redis_app import COUNTER_KEY
from redis_client import BARE_QUEUE, bare_bulk, celeriac_bulk, load_app, start, stop, worker_env

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """User and system CPU seconds."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def per_task(self, tasks: int) -> str:
        micros = [cpu / tasks * 1e6 for cpu in (self.total, self.user, self.system)]
        return "{:5.1f} us/task ({:4.1f} user, {:4.1f} sys)".format(*micros)


@dataclass(frozen=True)
class Drain:
    """One drain: tasks timed, seconds, and CPU of the worker and of Redis meanwhile."""

    system: str
    tasks: int
    seconds: float
    worker_cpu: Cpu
    redis_cpu: Cpu

    def line(self) -> str:
        busy = (self.worker_cpu.total + self.redis_cpu.total) / self.seconds
        return (
            f"{self.system:>8}: {self.tasks / self.seconds:9,.0f}/s"
            f"  worker {self.worker_cpu.per_task(self.tasks)}"
            f"  redis {self.redis_cpu.per_task(self.tasks)}  cores busy {busy:.2f}"
        )


# processes ---------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after the command name, from `state`


def _session(sid: int) -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and int(fields[3]) == sid:
            yield int(entry.name), fields


def cpu_seconds(sessions: Sequence[int]) -> Cpu:
    """User and system CPU time of every process in `sessions`."""
    stats = [fields for sid in sessions for _, fields in _session(sid)]
    user, system = (sum(int(fields[at]) for fields in stats) / _TICKS for at in (11, 12))
    return Cpu(user, system)


def pin(runners: Sequence[int]) -> None:
    """Give each process in `runners` a CPU of its own (round robin when there are more)."""
    cpus = sorted(os.sched_getaffinity(0))
    for index, pid in enumerate(runners):
        os.sched_setaffinity(pid, {cpus[index % len(cpus)]})


def celeriac_runners(sid: int, pool: str, concurrency: int, deadline: float) -> list[int]:
    """The worker processes that run tasks: a prefork parent's children, else the worker itself."""
    if pool != "prefork":
        return [sid]
    while time.monotonic() < deadline:
        children = [pid for pid, fields in _session(sid) if int(fields[1]) == sid]
        if len(children) >= concurrency:
            return children
        time.sleep(0.01)
    raise TimeoutError(f"the worker did not start {concurrency} children")


# one drain ---------------------------------------------------------------------------------


def bare_drainer(url: str) -> None:
    """The peers' bare worker: RPOP up to 100, json.loads, run (one INCR)."""
    client, counter = redis.Redis.from_url(url), redis.Redis.from_url(url)
    while True:
        batch = client.rpop(BARE_QUEUE, 100)
        if not batch:
            item = client.brpop([BARE_QUEUE], timeout=1)
            batch = [item[1]] if item else []
        for raw in batch:  # type: ignore[union-attr]
            json.loads(raw)
            counter.incr(COUNTER_KEY)


def timed(
    system: str, client: redis.Redis, sessions: Sequence[int], redis_pid: int, args: argparse.Namespace
) -> Drain:
    """Wait for the `--skip`-th task, then time the drain up to the last one."""
    deadline = time.monotonic() + args.timeout

    def done() -> int:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system}: the drain took longer than {args.timeout} s")
        return int(client.get(COUNTER_KEY) or 0)

    while (first := done()) < args.skip:
        time.sleep(0.0005)
    started, worker_cpu, redis_cpu = time.perf_counter(), cpu_seconds(sessions), cpu_seconds([redis_pid])
    while (last := done()) < args.n:
        time.sleep(0.001)
    return Drain(
        system,
        last - first,
        time.perf_counter() - started,
        cpu_seconds(sessions) - worker_cpu,
        cpu_seconds([redis_pid]) - redis_cpu,
    )


def drain_bare(client: redis.Redis, redis_pid: int, args: argparse.Namespace) -> Drain:
    client.flushdb()
    bare_bulk(client, args.n)  # queues the messages; its timing is not needed here
    argv = [sys.executable, __file__, "--bare-worker", "--redis", args.redis]
    workers = [start(argv, worker_env(args.redis, False)) for _ in range(runners_of(args))]
    try:
        if args.pin:
            pin([worker.pid for worker in workers])
        return timed("bare", client, [worker.pid for worker in workers], redis_pid, args)
    finally:
        for worker in workers:
            stop(worker)


def drain_celeriac(client: redis.Redis, redis_pid: int, args: argparse.Namespace) -> Drain:
    client.flushdb()
    app = load_app(args.redis, results=False)
    celeriac_bulk(app, args.n)  # queues the tasks; its timing is not needed here
    app.app.close()
    argv = [sys.executable, "-m", "celeriac", "-A", "redis_app", "worker", "--loglevel", "WARNING"]
    argv += ["--prefetch-multiplier", "64", "--pool", args.pool, "--concurrency", str(args.concurrency)]
    worker = start(argv, worker_env(args.redis, False))
    try:
        if args.pin:
            pin(celeriac_runners(worker.pid, args.pool, args.concurrency, time.monotonic() + 30))
        return timed("celeriac", client, [worker.pid], redis_pid, args)
    finally:
        stop(worker)


def runners_of(args: argparse.Namespace) -> int:
    return args.concurrency if args.pool == "prefork" else 1


# report ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--skip", type=int, default=1_000, help="tasks left out of the timing (start-up)")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="one CPU per task-running process")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_worker:
        bare_drainer(args.redis)
        return 0
    client = redis.Redis.from_url(args.redis)
    redis_pid = int(client.info("server")["process_id"])
    ratios = []
    for _ in range(args.repeat):
        bare = drain_bare(client, redis_pid, args)
        ours = drain_celeriac(client, redis_pid, args)
        ratio = (ours.tasks / ours.seconds) / (bare.tasks / bare.seconds)
        ratios.append(ratio)
        print(f"{bare.line()}\n{ours.line()}\n    celeriac / bare {ratio:.2f}", flush=True)
    print(f"median celeriac / bare over {args.repeat} run(s): {statistics.median(ratios):.2f}")
    client.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
