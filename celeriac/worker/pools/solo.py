"""The solo pool: runs each job inline in the worker's main thread (for debugging and tight loops)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from celeriac.worker.execution import execute_safely
from celeriac.worker.jobs import Completion, Job
from celeriac.worker.pools.base import Pool
from celeriac.worker.timelimits import alarm_limits

if TYPE_CHECKING:
    from celeriac.app import Celery


class SoloPool(Pool):
    """One job at a time, in this thread; time limits come from SIGALRM."""

    name = "solo"

    def __init__(self, app: Celery, size: int) -> None:
        super().__init__(app, 1)
        self._next: Job | None = None

    def free_slots(self) -> int:
        return 0 if self._next is not None else 1

    def submit(self, job: Job) -> None:
        self._next = job

    def collect(self, timeout: float) -> list[Completion]:
        job = self._next
        if job is None:
            return []
        try:
            return [self.run(job)]
        finally:
            self._next = None

    def inline_runner(self) -> Callable[[Job], Completion]:
        return self.run

    def run(self, job: Job) -> Completion:
        """Run one job here, its hard limit raised in this process (no parent watches it)."""
        if job.soft_limit is None and job.hard_limit is None:
            return execute_safely(self.app, job)
        with alarm_limits(job.soft_limit, job.hard_limit, hard_in_process=True):
            return execute_safely(self.app, job)

    def stop(self, *, cold: bool) -> None:
        self._next = None
