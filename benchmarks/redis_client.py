"""The client-side figures of the peers benchmark, on the local Redis, beside a bare redis-py loop.

  .venv/bin/python benchmarks/redis_client.py [--redis redis://127.0.0.1:6379/13] [--n 20000]
      [--rt-n 300] [--repeat 3] [--phases enqueue,bulk,roundtrip]

The workload is that of ../shared/bench/peers (systems/celeriac_peer.py and bare_peer.py):
  enqueue    `noop.delay(i)` one at a time (task_ignore_result=True, no backend)
             against LPUSH of a small JSON message per call;
  bulk       `group(noop.s(i) for i in range(n)).apply_async()` against one pipeline of LPUSHes;
  roundtrip  `noop.delay(i).get()` on an idle solo worker with the Redis result backend, against
             LPUSH + a bare worker's BRPOP, INCR and LPUSH of the reply that the client BRPOPs.
Each phase alternates bare and celeriac `--repeat` times (the machine is noisy) and reports the
best time of each and their ratio. The database is flushed between runs: use one of your own.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BARE_QUEUE = "bare:q"
WARM_UP = 10


def worker_env(url: str, results: bool) -> dict[str, str]:
    """The environment of a worker or a bare loop: redis_app settings and this checkout on the path."""
    env = dict(os.environ)
    env["CELERIAC_BENCH_REDIS"] = url
    env["CELERIAC_BENCH_RESULTS"] = "1" if results else "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), env.get("PYTHONPATH", "")) if p)
    return env


def load_app(url: str, results: bool) -> ModuleType:
    """Import redis_app configured for `url` (afresh, so settings follow the phase)."""
    import importlib

    for path in (str(HERE), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.update({k: v for k, v in worker_env(url, results).items() if k.startswith("CELERIAC_")})
    module = sys.modules.get("redis_app")
    if module is None:
        return importlib.import_module("redis_app")
    module.app.close()
    return importlib.reload(module)


# bare --------------------------------------------------------------------------------------


def bare_enqueue(client: redis.Redis, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        client.lpush(BARE_QUEUE, json.dumps({"id": str(uuid.uuid4()), "task": "noop", "args": [i]}))
    return time.perf_counter() - started


def bare_bulk(client: redis.Redis, n: int) -> float:
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush(BARE_QUEUE, json.dumps({"id": str(uuid.uuid4()), "task": "noop", "args": [i]}))
    pipe.execute()
    return time.perf_counter() - started


def bare_roundtrip(client: redis.Redis, n: int) -> list[float]:
    samples = []
    for i in range(WARM_UP + n):
        started = time.perf_counter()
        tid = str(uuid.uuid4())
        client.lpush(BARE_QUEUE, json.dumps({"id": tid, "task": "noop", "args": [i]}))
        reply = client.brpop([f"bare:reply:{tid}"], timeout=10)
        assert reply is not None and json.loads(reply[1]) == i
        if i >= WARM_UP:
            samples.append(time.perf_counter() - started)
    return samples


def bare_worker(url: str) -> None:
    """The bare worker of the round trip: BRPOP, run (one INCR), LPUSH the reply."""
    client = redis.Redis.from_url(url)
    while True:
        _, raw = client.brpop([BARE_QUEUE])  # type: ignore[misc]
        message = json.loads(raw)
        client.incr("bench:done")
        client.lpush(f"bare:reply:{message['id']}", json.dumps(message["args"][0]))


# celeriac ----------------------------------------------------------------------------------


def celeriac_enqueue(app: ModuleType, n: int) -> float:
    noop = app.noop
    started = time.perf_counter()
    for i in range(n):
        noop.delay(i)
    return time.perf_counter() - started


def celeriac_bulk(app: ModuleType, n: int) -> float:
    from celeriac import group

    noop = app.noop
    started = time.perf_counter()
    group(noop.s(i) for i in range(n)).apply_async()
    return time.perf_counter() - started


def celeriac_roundtrip(app: ModuleType, n: int) -> list[float]:
    noop = app.noop
    samples = []
    for i in range(WARM_UP + n):
        started = time.perf_counter()
        assert noop.delay(i).get(timeout=10) == i
        if i >= WARM_UP:
            samples.append(time.perf_counter() - started)
    return samples


def start(argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def wait_worker_up(app: ModuleType) -> None:
    """Round trips until one succeeds: the worker is up and subscribed."""
    deadline = time.monotonic() + 60
    while True:
        try:
            app.noop.delay(-1).get(timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise


# phases ------------------------------------------------------------------------------------


def best_of(
    repeat: int, flush: Callable[[], None], bare: Callable[[], float], ours: Callable[[], float]
) -> tuple[float, float]:
    bare_times, our_times = [], []
    for _ in range(repeat):
        flush()
        bare_times.append(bare())
        flush()
        our_times.append(ours())
    return min(bare_times), min(our_times)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def roundtrips(args: argparse.Namespace, client: redis.Redis) -> None:
    client.flushdb()
    bare = start(
        [sys.executable, __file__, "--bare-worker", "--redis", args.redis], worker_env(args.redis, True)
    )
    try:
        time.sleep(0.3)
        bare_ms = [s * 1000 for s in bare_roundtrip(client, args.rt_n)]
    finally:
        stop(bare)
    client.flushdb()
    app = load_app(args.redis, results=True)
    argv = [sys.executable, "-m", "celeriac", "-A", "redis_app", "worker", "--loglevel", "WARNING"]
    worker = start([*argv, "--pool", "solo", "--prefetch-multiplier", "64"], worker_env(args.redis, True))
    try:
        wait_worker_up(app)
        ours_ms = [s * 1000 for s in celeriac_roundtrip(app, args.rt_n)]
    finally:
        stop(worker)
        app.app.close()
    for name, ms in (("bare", bare_ms), ("celeriac", ours_ms)):
        p50, p90, p99 = (percentile(ms, q) for q in (50, 90, 99))
        print(f"round trip {name:>8}: p50 {p50:.3f} ms  p90 {p90:.3f} ms  p99 {p99:.3f} ms", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rt-n", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--phases", default="enqueue,bulk,roundtrip")
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_worker:
        bare_worker(args.redis)
        return 0
    client = redis.Redis.from_url(args.redis)
    phases = set(args.phases.split(","))
    n = args.n
    if phases & {"enqueue", "bulk"}:
        app = load_app(args.redis, results=False)
        contests = [
            ("enqueue", "enqueue one by one:", bare_enqueue, celeriac_enqueue),
            ("bulk", "enqueue bulk:      ", bare_bulk, celeriac_bulk),
        ]
        for phase, label, bare, ours in contests:
            if phase not in phases:
                continue
            bare_s, ours_s = best_of(
                args.repeat,
                client.flushdb,
                functools.partial(bare, client, n),
                functools.partial(ours, app, n),
            )
            print(
                f"{label} bare {n / bare_s:,.0f}/s ({bare_s / n * 1e6:.1f} us)  celeriac "
                f"{n / ours_s:,.0f}/s ({ours_s / n * 1e6:.1f} us)  ratio {bare_s / ours_s:.2f}",
                flush=True,
            )
        app.app.close()
    if "roundtrip" in phases:
        roundtrips(args, client)
    client.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
