"""The prefork pool: N forked child processes, one job at a time each.

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
from dataclasses import dataclass
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
    job: Job | None = None
    started: float = 0.0
    deadlines: Deadlines | None = None


class PreforkPool(Pool):
    """`size` child processes fed one job at a time through a pipe each."""

    name = "prefork"

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

    def child_pids(self) -> list[int]:
        return [child.process.pid for child in self._children if child.process.pid is not None]

    def free_slots(self) -> int:
        return sum(1 for child in self._children if child.job is None)

    def submit(self, job: Job) -> None:
        child = next(child for child in self._children if child.job is None)
        child.job = job
        child.started = time.monotonic()
        # The child enforces the soft limit itself; the parent watches only the hard one.
        child.deadlines = Deadlines(None, child.started + job.hard_limit if job.hard_limit else None)
        child.conn.send(job)

    def _busy(self) -> list[_Child]:
        return [child for child in self._children if child.job is not None]

    def collect(self, timeout: float) -> list[Completion]:
        busy = self._busy()
        if not busy:
            return []
        deadlines = [child.deadlines for child in busy if child.deadlines is not None]
        waitables: list[object] = [child.conn for child in busy]
        waitables += [child.process.sentinel for child in busy]
        wait(waitables, wait_bound(timeout, deadlines))  # type: ignore[arg-type]
        finished: list[Completion] = []
        for child in busy:
            completion = self._check(child)
            if completion is not None:
                finished.append(completion)
        return finished

    def _check(self, child: _Child) -> Completion | None:
        job = child.job
        assert job is not None
        if child.conn.poll():
            try:
                completion: Completion = child.conn.recv()
            except (EOFError, OSError):
                return self._replace(child, self._lost(child, job))
            self._free(child)
            return completion
        now = time.monotonic()
        if child.deadlines and child.deadlines.hard is not None and now >= child.deadlines.hard:
            child.process.kill()
            child.process.join()
            return self._replace(child, hard_limit_completion(self.app, job, now - child.started))
        if not child.process.is_alive():
            return self._replace(child, self._lost(child, job))
        return None

    def _lost(self, child: _Child, job: Job) -> Completion:
        child.process.join()
        code = child.process.exitcode
        detail = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        logger.error("Process running %s[%s] died (%s)", job.message.name, job.message.id, detail)
        task = self.app.tasks.get(job.message.name)
        requeue = bool(task is not None and _reject_on_lost(self.app, task))
        return lost_completion(self.app, job, time.monotonic() - child.started, detail, requeue)

    def _free(self, child: _Child) -> None:
        child.job = None
        child.deadlines = None

    def _replace(self, child: _Child, completion: Completion) -> Completion:
        child.conn.close()
        index = self._children.index(child)
        self._children[index] = self._spawn()
        return completion

    def running(self) -> list[Job]:
        return [child.job for child in self._children if child.job is not None]

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
    acks_late = getattr(task, "acks_late", None)
    if acks_late is None:
        acks_late = app.conf.task_acks_late
    reject = getattr(task, "reject_on_worker_lost", None)
    if reject is None:
        reject = app.conf.task_reject_on_worker_lost
    return bool(acks_late and reject)
