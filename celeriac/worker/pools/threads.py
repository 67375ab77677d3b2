"""The thread pool: many jobs at once in the worker process.

The pool takes more jobs than it has threads: the rest wait in its queue, not started and
not acked, so a thread that ends a job goes straight on to the next one. The consumer's
thread is woken when that backlog runs low or a time limit comes due, not at every job's
end: handing each job over and back cost two thread switches per task. Once the worker's
warm stop begins (`halt`), no thread starts a queued job, and `withdraw` gives the queue back
as the consumer gives back what it prefetched.

A soft limit raises `SoftTimeLimitExceeded` in the job's thread at its next Python
instruction. At the hard limit the job is reported FAILURE and its thread is abandoned
(asked to raise `TimeLimitExceeded`) and replaced, so the pool keeps its size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celeriac.worker.execution import execute_safely
from celeriac.worker.jobs import Completion, Job
from celeriac.worker.pools.base import Deadlines, Pool, hard_limit_completion, wait_bound
from celeriac.worker.timelimits import raise_in_thread

if TYPE_CHECKING:
    from celeriac.app import Celery

LEAST_BACKLOG = 8  # jobs the pool queues beyond one per thread, at the least


@dataclass(slots=True)
class _Running:
    job: Job
    thread: threading.Thread
    started: float
    deadlines: Deadlines


class ThreadPool(Pool):
    """`size` threads taking jobs from one queue, which also holds up to `backlog` jobs not yet started.

    Args:
        app: The app whose tasks the jobs run.
        size: How many threads.
        halt: Once set (the worker's warm stop), threads start no more queued jobs.
    """

    name = "threads"

    def __init__(self, app: Celery, size: int, halt: threading.Event | None = None) -> None:
        super().__init__(app, size)
        self.backlog = max(self.size, LEAST_BACKLOG)
        self._halt = halt or threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # a job was queued, or the pool stops
        self._queued: deque[Job] = deque()  # submitted, not started: under the lock
        self._running: dict[int, _Running] = {}  # under the lock too
        self._abandoned: set[int] = set()
        self._closing = False
        self._done: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._wake = threading.Event()  # the queue runs low, or the last jobs end
        self._submitted = 0  # submitted and not yet collected or withdrawn
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name=f"celeriac-pool-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while (job := self._next()) is not None:
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
                self._wake_if_low()

    def _next(self) -> Job | None:
        """Wait for a job to start and record it as running; None once the pool stops."""
        with self._lock:
            while not self._closing and (not self._queued or self._halt.is_set()):
                self._ready.wait()
            if self._closing:
                return None
            job = self._queued.popleft()
            self._running[job.key] = _Running(
                job, threading.current_thread(), time.monotonic(), Deadlines.for_job(job)
            )
        self._wake_if_low()
        return job

    def _wake_if_low(self) -> None:
        if len(self._queued) <= self.backlog // 2:
            self._wake.set()

    def free_slots(self) -> int:
        return self.size + self.backlog - self._submitted

    def submit(self, job: Job) -> None:
        self._submitted += 1
        with self._lock:
            self._queued.append(job)
            self._ready.notify()

    def collect(self, timeout: float) -> list[Completion]:
        if self._submitted == 0:
            return []
        finished = self._enforce_limits()
        if not finished and self._done.empty():
            with self._lock:
                deadlines = [entry.deadlines for entry in self._running.values()]
            self._wake.clear()
            if self._done.empty():  # a job that ended meanwhile set the event before the clear
                self._wake.wait(wait_bound(timeout, deadlines))
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

    def withdraw(self) -> list[Job]:
        """Take back the jobs no thread has started, oldest first."""
        with self._lock:
            jobs = list(self._queued)
            self._queued.clear()
        self._submitted -= len(jobs)
        return jobs

    def stop(self, *, cold: bool) -> None:
        """End the threads as their jobs end (a cold stop waits for none); the queue stays for `withdraw`."""
        with self._lock:
            self._closing = True
            self._ready.notify_all()
        if not cold:
            for thread in self._threads:
                thread.join()
