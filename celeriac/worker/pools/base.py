"""The pool interface the consumer drives, and the time-limit bookkeeping pools share."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celeriac import states
from celeriac.exceptions import TimeLimitExceeded, WorkerLostError
from celeriac.worker.jobs import Completion, Job

if TYPE_CHECKING:
    from celeriac.app import Celery

logger = logging.getLogger("celeriac.worker")


class Pool(ABC):
    """Runs jobs, at most `size` at a time.

    The consumer calls `submit` while `free_slots()` is positive and `collect` to learn
    what finished; `collect` returns at once when nothing is running.
    """

    name: str = ""

    def __init__(self, app: Celery, size: int) -> None:
        self.app = app
        self.size = max(1, size)

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start processes or threads."""

    @abstractmethod
    def free_slots(self) -> int:
        """How many more jobs can be submitted now."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start running `job`."""

    @abstractmethod
    def collect(self, timeout: float) -> list[Completion]:
        """Return finished jobs, waiting up to `timeout` seconds for one if any are running."""

    @abstractmethod
    def stop(self, *, cold: bool) -> None:
        """Stop: a warm stop lets running jobs finish first; a cold one abandons them."""

    def withdraw(self) -> list[Job]:
        """Take back submitted jobs that have not started, oldest first (their messages are not acked)."""
        return []

    def inline_runner(self) -> Callable[[Job], Completion] | None:
        """What runs a job to its end in the calling thread, for pools that run jobs there."""
        return None


@dataclass(slots=True)
class Deadlines:
    """When a running job passes its soft and hard limits (monotonic seconds)."""

    soft: float | None
    hard: float | None
    soft_done: bool = False

    @classmethod
    def for_job(cls, job: Job) -> Deadlines:
        now = time.monotonic()
        return cls(
            now + job.soft_limit if job.soft_limit else None,
            now + job.hard_limit if job.hard_limit else None,
        )

    def next_due(self) -> float | None:
        pending = [t for t in ((None if self.soft_done else self.soft), self.hard) if t is not None]
        return min(pending) if pending else None


def wait_bound(timeout: float, deadlines: list[Deadlines]) -> float:
    """Shorten `timeout` so a wait ends when the earliest deadline comes."""
    dues = [d for d in (item.next_due() for item in deadlines) if d is not None]
    if not dues:
        return timeout
    return max(0.0, min(timeout, min(dues) - time.monotonic()))


def record_failure(app: Celery, job: Job, exc: BaseException) -> None:
    """Store FAILURE for a job the pool had to stop, so its caller learns why."""
    backend = app.backend
    if backend is None or job.message.headers.get("ignore_result"):
        return
    try:
        backend.store_result(job.message.id, exc, states.FAILURE)
    except Exception:
        logger.exception("could not store the failure of task %s", job.message.id)


def hard_limit_completion(app: Celery, job: Job, runtime: float) -> Completion:
    """Report a job stopped at its hard time limit."""
    error = TimeLimitExceeded(job.hard_limit)
    record_failure(app, job, error)
    logger.error(
        "Hard time limit (%ss) exceeded for %s[%s]", job.hard_limit, job.message.name, job.message.id
    )
    return Completion(job.key, states.FAILURE, runtime, repr(error), settled=False)


def lost_completion(app: Celery, job: Job, runtime: float, detail: str, requeue: bool) -> Completion:
    """Report a job whose process died under it."""
    error = WorkerLostError(f"Worker exited prematurely: {detail}.")
    if not requeue:
        record_failure(app, job, error)
    return Completion(job.key, states.FAILURE, runtime, repr(error), requeue=requeue, settled=False)
