"""Throughput and latency of celeriac on its embedded SQLite broker (`make bench`).

  .venv/bin/python benchmarks/throughput.py [--tasks 20000] [--latency 200]
      [--pool solo|prefork|threads] [--concurrency N] [--prefetch-multiplier N] [--timeout 120]

Phases, each on fresh SQLite files in a temporary folder:
  1. enqueue: this process calls `noop.delay(i)` N times, one at a time (timed);
  2. drain:   one worker (`--pool solo` by default; loglevel WARNING, task_ignore_result=True,
              no result backend) is started on the N queued tasks. Timed from the moment it is
              ready (its start-up banner is complete) until the N-th task has *executed*: every
              execution appends a byte to a counter file (see bench_app.py). The worker is then
              stopped with SIGTERM; it must exit 0 and leave no message and no dead letter behind;
  3. latency: a new worker with the same flags and a SQLite result backend (the broker's file),
              idle; `noop.delay(i).get()` round trips, one at a time, after 10 warm-up ones.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from celeriac.testing import ProcessExited, WatchedProcess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP_MODULE = "bench_app"
WARM_UP = 10
POLL = 0.001  # seconds between two looks at the counter file
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class BenchError(Exception):
    """A phase did not complete as it must for its figures to mean anything."""


# the worker --------------------------------------------------------------------------------


class Worker(WatchedProcess):
    """One worker subprocess; its merged output is collected by a thread, so its pipe never fills."""

    def __init__(self, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self.cpu_before = _children_cpu()
        self.started = time.perf_counter()
        self.cpu_seconds: float | None = None
        super().__init__(argv, cwd, env)

    def wait_ready(self, last_banner_line: str, timeout: float) -> float:
        """Wait for the banner's last line (the last task name) and return when it came.

        At loglevel WARNING the worker logs no "ready." line; its banner is written once the
        pool has started and the consumer is built, right before it starts fetching.
        """
        try:
            self.wait_for_line(lambda line: line == last_banner_line, timeout)
        except ProcessExited:
            raise BenchError(f"the worker exited before it was ready:\n{self.output()}") from None
        except TimeoutError:
            raise BenchError(f"the worker was not ready within {timeout:.0f} s:\n{self.output()}") from None
        return time.perf_counter()

    def output(self) -> str:
        return "\n".join(f"  worker | {line}" for line in self.snapshot())

    def stop(self) -> int:
        """Warm shutdown (SIGTERM); return the exit status and note the worker tree's CPU time."""
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"the worker did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM") from exc
        self.join_output()
        self.cpu_seconds = _children_cpu() - self.cpu_before
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.join_output()


def _children_cpu() -> float:
    """CPU seconds of every waited-for descendant (a worker counts its pool children in)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_worker(args: argparse.Namespace, folder: Path, app: ModuleType, results: bool) -> Worker:
    argv = [sys.executable, "-m", "celeriac", "-A", APP_MODULE, "worker", "--loglevel", "WARNING"]
    argv += ["--pool", args.pool]
    if args.concurrency is not None:
        argv += ["--concurrency", str(args.concurrency)]
    if args.prefetch_multiplier is not None:
        argv += ["--prefetch-multiplier", str(args.prefetch_multiplier)]
    return Worker(argv, folder, phase_env(folder, results))


def last_banner_line(app: ModuleType) -> str:
    names = sorted(name for name in app.app.tasks if not name.startswith("celery."))
    return f"  . {names[-1]}"


# the app -----------------------------------------------------------------------------------


def phase_env(folder: Path, results: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["CELERIAC_BENCH_DIR"] = str(folder)
    env["CELERIAC_BENCH_RESULTS"] = "1" if results else "0"
    # The checkout and bench_app importable, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), env.get("PYTHONPATH", "")) if p)
    return env


def load_app(folder: Path, results: bool) -> ModuleType:
    """Import bench_app configured for `folder` (again, if an earlier phase imported it)."""
    for path in (str(HERE), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["CELERIAC_BENCH_DIR"] = str(folder)
    os.environ["CELERIAC_BENCH_RESULTS"] = "1" if results else "0"
    module = sys.modules.get(APP_MODULE)
    if module is None:
        return importlib.import_module(APP_MODULE)
    module.app.close()
    return importlib.reload(module)


def executed(folder: Path) -> int:
    try:
        return (folder / "done.count").stat().st_size
    except FileNotFoundError:
        return 0


def leftovers(folder: Path) -> tuple[int, int]:
    """Messages (waiting or leased) and dead letters left in the broker file."""
    with sqlite3.connect(folder / "broker.db") as connection:
        messages = connection.execute("SELECT count(*) FROM celeriac_messages").fetchone()[0]
        dead = connection.execute("SELECT count(*) FROM celeriac_dead_letters").fetchone()[0]
    connection.close()
    return int(messages), int(dead)


# the phases --------------------------------------------------------------------------------


@dataclass
class Drain:
    startup: float  # worker spawn to ready
    seconds: float  # ready to the N-th execution
    first_to_last: float  # first observed execution to the N-th
    cpu_seconds: float  # the worker tree's CPU time, start-up and shutdown included


def enqueue(app: ModuleType, n: int) -> float:
    noop = app.noop
    started = time.perf_counter()
    for i in range(n):
        noop.delay(i)
    elapsed = time.perf_counter() - started
    queued = app.app.broker.size(app.app.conf.task_default_queue)
    if queued != n:
        raise BenchError(f"{n} tasks sent but {queued} queued")
    return elapsed


def drain(args: argparse.Namespace, folder: Path, app: ModuleType, n: int) -> Drain:
    worker = start_worker(args, folder, app, results=False)
    try:
        ready = worker.wait_ready(last_banner_line(app), READY_TIMEOUT)
        deadline = ready + args.timeout
        first: float | None = None
        done = 0
        while done < n:
            now = time.perf_counter()
            done = executed(folder)
            if first is None and done:
                first = now
            if now > deadline or worker.process.poll() is not None:
                raise BenchError(
                    f"drain incomplete: {done:,}/{n:,} tasks executed after {now - ready:.1f} s"
                    f" (worker status {worker.process.poll()}):\n{worker.output()}"
                )
            time.sleep(POLL)
        finished = time.perf_counter()
        status = worker.stop()
    finally:
        worker.kill()
    if status != 0:
        raise BenchError(f"the worker exited with status {status} after SIGTERM:\n{worker.output()}")
    total, (messages, dead) = executed(folder), leftovers(folder)
    if total != n or messages or dead:
        raise BenchError(
            f"after the drain: {total:,} executions of {n:,}, {messages} messages left, {dead} dead"
        )
    assert first is not None and worker.cpu_seconds is not None
    return Drain(ready - worker.started, finished - ready, finished - first, worker.cpu_seconds)


def latency(args: argparse.Namespace, folder: Path, app: ModuleType, n: int) -> list[float]:
    worker = start_worker(args, folder, app, results=True)
    try:
        ready = worker.wait_ready(last_banner_line(app), READY_TIMEOUT)
        deadline = ready + args.timeout
        samples: list[float] = []
        for i in range(WARM_UP + n):
            if time.perf_counter() > deadline:
                raise BenchError(f"latency phase incomplete: {len(samples)}/{n} round trips in time")
            started = time.perf_counter()
            value = app.noop.delay(i).get(timeout=10)
            elapsed = time.perf_counter() - started
            if value != i:
                raise BenchError(f"round trip {i} returned {value!r}")
            if i >= WARM_UP:
                samples.append(elapsed)
        status = worker.stop()
    finally:
        worker.kill()
    if status != 0:
        raise BenchError(f"the worker exited with status {status} after SIGTERM:\n{worker.output()}")
    return samples


# the report --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), as the peers benchmark computes it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def table(rows: Sequence[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  {name:<{widths[0]}}  {value:>{widths[1]}}  {note}".rstrip() for name, value, note in rows]
    lines.insert(1, "  " + "-" * (max(len(line) for line in lines) - 2))
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    concurrency = "1" if args.pool == "solo" else str(args.concurrency or "default (CPUs)")
    prefetch = args.prefetch_multiplier if args.prefetch_multiplier is not None else "default"
    return f"--pool {args.pool}, concurrency {concurrency}, prefetch multiplier {prefetch}"


def report(args: argparse.Namespace, enqueue_s: float, result: Drain, samples: list[float]) -> str:
    n = args.tasks
    rows: list[tuple[str, str, str]] = [("measure", "value", "detail")]
    rows.append(
        ("enqueue, .delay() one by one", f"{n / enqueue_s:,.0f} tasks/s", _enqueue_note(n, enqueue_s))
    )
    rows.append(("worker start-up", f"{result.startup:.2f} s", "spawn to banner complete"))
    rows.append(
        (
            "drain",
            f"{n / result.seconds:,.0f} tasks/s",
            f"{result.seconds:.2f} s from ready to the last execution",
        )
    )
    rows.append(
        (
            "drain, first to last task",
            f"{n / result.first_to_last:,.0f} tasks/s",
            "the peers benchmark's definition",
        )
    )
    rows.append(
        (
            "worker CPU per task",
            f"{result.cpu_seconds / n * 1e6:,.0f} µs",
            f"{result.cpu_seconds:.2f} CPU s incl. start-up and shutdown",
        )
    )
    if samples:
        ms = [s * 1000 for s in samples]
        for q in (50, 90, 99):
            rows.append((f"round trip p{q}", f"{percentile(ms, q):.2f} ms", _latency_note(q, len(ms))))
        rows.append(("round trip max", f"{max(ms):.2f} ms", ""))
    return table(rows)


def _enqueue_note(n: int, seconds: float) -> str:
    return f"{seconds / n * 1e6:.0f} µs per task, {seconds:.2f} s for {n:,}"


def _latency_note(q: int, count: int) -> str:
    return f"delay().get(), {count} calls after {WARM_UP} warm-up, idle worker" if q == 50 else ""


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version},"
        f" {platform.system()} {platform.release()}"
    )


# main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks to enqueue and drain (20000)")
    parser.add_argument("--latency", type=int, default=200, help="timed round trips; 0 skips them (200)")
    parser.add_argument("--pool", choices=("solo", "prefork", "threads"), default="solo")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--prefetch-multiplier", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each phase, seconds (120)")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.latency < 0:
        parser.error("--tasks must be at least 1 and --latency at least 0")
    return args


def run(args: argparse.Namespace, scratch: Path) -> tuple[float, Drain, list[float]]:
    throughput_dir, latency_dir = scratch / "throughput", scratch / "latency"
    throughput_dir.mkdir()
    latency_dir.mkdir()
    app = load_app(throughput_dir, results=False)
    print(f"enqueueing {args.tasks:,} tasks ...", flush=True)
    enqueue_s = enqueue(app, args.tasks)
    app.app.close()
    print("draining them with one worker ...", flush=True)
    result = drain(args, throughput_dir, app, args.tasks)
    samples: list[float] = []
    if args.latency:
        print(f"timing {args.latency} round trips ...", flush=True)
        app = load_app(latency_dir, results=True)
        try:
            samples = latency(args, latency_dir, app, args.latency)
        finally:
            app.app.close()
    return enqueue_s, result, samples


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"celeriac on SQLite: {args.tasks:,} no-op tasks; worker {describe(args)}")
    print(f"machine: {machine()}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="celeriac-bench-") as scratch:
        try:
            enqueue_s, result, samples = run(args, Path(scratch))
        except BenchError as exc:
            print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
            return 1
    print()
    print(report(args, enqueue_s, result, samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
