"""The thread pool: many jobs at once in the worker process.

A soft limit raises `SoftTimeLimitExceeded` in the job's thread at its next Python
instruction. At the hard limit the job is reported FAILURE and its thread is abandoned
(asked to raise `TimeLimitExceeded`) and replaced, so the pool keeps its size.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celeriac.worker.execution import execute_safely
from celeriac.worker.jobs import Completion, Job
from celeriac.worker.pools.base import Deadlines, Pool, hard_limit_completion, wait_bound
from celeriac.worker.timelimits import raise_in_thread

if TYPE_CHECKING:
    from celeriac.app import Celery


@dataclass(slots=True)
class _Running:
    job: Job
    thread: threading.Thread
    started: float
    deadlines: Deadlines


class ThreadPool(Pool):
    """`size` threads taking jobs from one queue."""

    name = "threads"

    def __init__(self, app: Celery, size: int) -> None:
        super().__init__(app, size)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._running: dict[int, _Running] = {}
        self._abandoned: set[int] = set()
        self._submitted = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name=f"celeriac-pool-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                return
            with self._lock:
                self._running[job.key] = _Running(
                    job, threading.current_thread(), time.monotonic(), Deadlines.for_job(job)
                )
            try:
                completion = execute_safely(self.app, job)
            except TimeLimitExceeded:
                completion = None
            with self._lock:
                self._running.pop(job.key, None)
                if job.key in self._abandoned:
                    self._abandoned.discard(job.key)
                    return  # a replacement thread took this one's place
            if completion is not None:
                self._done.put(completion)

    def free_slots(self) -> int:
        return self.size - self._submitted

    def submit(self, job: Job) -> None:
        self._submitted += 1
        self._inbox.put(job)

    def collect(self, timeout: float) -> list[Completion]:
        if self._submitted == 0:
            return []
        finished = self._enforce_limits()
        if not finished:
            with self._lock:
                deadlines = [entry.deadlines for entry in self._running.values()]
            try:
                finished.append(self._done.get(timeout=wait_bound(timeout, deadlines)))
            except queue.Empty:
                finished.extend(self._enforce_limits())
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._submitted -= len(finished)
        return finished

    def _enforce_limits(self) -> list[Completion]:
        now = time.monotonic()
        stopped: list[Completion] = []
        with self._lock:
            entries = list(self._running.values())
        for entry in entries:
            limits = entry.deadlines
            if limits.hard is not None and now >= limits.hard:
                stopped.append(self._abandon(entry, now))
            elif limits.soft is not None and not limits.soft_done and now >= limits.soft:
                limits.soft_done = True
                raise_in_thread(entry.thread, SoftTimeLimitExceeded)
        return stopped

    def _abandon(self, entry: _Running, now: float) -> Completion:
        with self._lock:
            self._abandoned.add(entry.job.key)
            self._running.pop(entry.job.key, None)
        raise_in_thread(entry.thread, TimeLimitExceeded)
        self._spawn()
        return hard_limit_completion(self.app, entry.job, now - entry.started)

    def stop(self, *, cold: bool) -> None:
        for _ in self._threads:
            self._inbox.put(None)
        if not cold:
            for thread in self._threads:
                thread.join()
