"""The prefork pool: N forked child processes, each running one job at a time.

The parent keeps the broker leases and the acks; a child only runs jobs and stores
their outcomes. A child that passes a job's hard time limit is killed and replaced;
a child that dies on its own is replaced and its job reported lost. Children die with
the parent (PR_SET_PDEATHSIG), so a SIGKILLed worker leaves no task running behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from celeriac.worker.execution import execute_safely
from celeriac.worker.jobs import Completion, Job
from celeriac.worker.pools.base import Deadlines, Pool, hard_limit_completion, lost_completion, wait_bound
from celeriac.worker.timelimits import alarm_limits

if TYPE_CHECKING:
    from celeriac.app import Celery

logger = logging.getLogger("celeriac.worker")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_main(app: Celery, conn: Connection, parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent decides when a child stops
    app.reset_after_fork()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            break
        if job is None:
            break
        with alarm_limits(job.soft_limit, job.hard_limit, hard_in_process=False):
            completion = execute_safely(app, job)
        conn.send(completion)
    app.close()


@dataclass(slots=True)
class _Child:
    process: BaseProcess
    conn: Connection
    jobs: deque[Job] = field(default_factory=deque)
    started: float = 0.0  # when the job at the head of `jobs` began
    deadlines: Deadlines | None = None

    def begin_head(self) -> None:
        """Start the clock of the job at the head of the pipe."""
        self.started = time.monotonic()
        head = self.jobs[0] if self.jobs else None
        # The child enforces the soft limit itself; the parent watches only the hard one.
        hard = self.started + head.hard_limit if head is not None and head.hard_limit else None
        self.deadlines = Deadlines(None, hard)


class PreforkPool(Pool):
    """`size` child processes, each fed through its own pipe, `DEPTH` jobs in flight per child.

    A queued second job saves the child a round trip through the parent; it is not acked
    until the child starts it, so it survives any crash.
    """

    name = "prefork"
    DEPTH = 2

    def __init__(self, app: Celery, size: int) -> None:
        super().__init__(app, size)
        self._context = multiprocessing.get_context("fork")
        self._children: list[_Child] = []

    def start(self) -> None:
        for _ in range(self.size):
            self._children.append(self._spawn())

    def _spawn(self) -> _Child:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main, args=(self.app, child_end, os.getpid()), name="celeriac-child", daemon=False
        )
        process.start()
        child_end.close()
        return _Child(process, parent_end)

    def free_slots(self) -> int:
        return sum(self.DEPTH - len(child.jobs) for child in self._children)

    def submit(self, job: Job) -> None:
        child = min(self._children, key=lambda candidate: len(candidate.jobs))
        self._send(child, job)

    def _send(self, child: _Child, job: Job) -> None:
        child.jobs.append(job)
        if len(child.jobs) == 1:
            child.begin_head()
        child.conn.send(job)

    def collect(self, timeout: float) -> list[Completion]:
        busy = [child for child in self._children if child.jobs]
        if not busy:
            return []
        deadlines = [child.deadlines for child in busy if child.deadlines is not None]
        waitables: list[object] = [child.conn for child in busy]
        waitables += [child.process.sentinel for child in busy]
        wait(waitables, wait_bound(timeout, deadlines))  # type: ignore[arg-type]
        finished: list[Completion] = []
        for child in busy:
            finished.extend(self._check(child))
        return finished

    def _check(self, child: _Child) -> list[Completion]:
        finished: list[Completion] = []
        while child.jobs and child.conn.poll():
            try:
                finished.append(child.conn.recv())
            except (EOFError, OSError):
                break
            child.jobs.popleft()
            child.begin_head()
        if not child.jobs:
            return finished
        now = time.monotonic()
        if child.deadlines and child.deadlines.hard is not None and now >= child.deadlines.hard:
            child.process.kill()
            child.process.join()
            head = child.jobs[0]
            finished.append(self._replace(child, hard_limit_completion(self.app, head, now - child.started)))
        elif not child.process.is_alive():
            finished.append(self._replace(child, self._lost(child, child.jobs[0])))
        return finished

    def _lost(self, child: _Child, job: Job) -> Completion:
        child.process.join()
        code = child.process.exitcode
        detail = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        logger.error("Process running %s[%s] died (%s)", job.message.name, job.message.id, detail)
        task = self.app.tasks.get(job.message.name)
        requeue = bool(job.acks_late and task is not None and _reject_on_lost(self.app, task))
        return lost_completion(self.app, job, time.monotonic() - child.started, detail, requeue)

    def _replace(self, child: _Child, completion: Completion) -> Completion:
        """Swap a dead child for a new one, which takes over the jobs it had not started."""
        child.conn.close()
        fresh = self._spawn()
        self._children[self._children.index(child)] = fresh
        child.jobs.popleft()
        for job in child.jobs:
            self._send(fresh, job)
        return completion

    def stop(self, *, cold: bool) -> None:
        for child in self._children:
            if cold:
                child.process.kill()
            else:
                with contextlib.suppress(OSError):
                    child.conn.send(None)
        for child in self._children:
            child.process.join(timeout=None if not cold else 5)
            child.conn.close()
        self._children = []


def _reject_on_lost(app: Celery, task: object) -> bool:
    reject = getattr(task, "reject_on_worker_lost", None)
    if reject is None:
        reject = app.conf.task_reject_on_worker_lost
    return bool(reject)
