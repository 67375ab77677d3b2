"""Every error celeriac raises: one root, a branch per layer, and Celery's names for the leaves."""

from __future__ import annotations

from datetime import datetime
from typing import Any


class CeleriacError(Exception):
    """Root of every error celeriac raises on its own account."""


class ImproperlyConfigured(CeleriacError):
    """A setting is missing or holds a value celeriac cannot use."""


class ProtocolError(CeleriacError):
    """A message or result could not be encoded or decoded."""


class ContentDisallowed(ProtocolError):
    """A message arrived in a content type that `accept_content` does not allow."""


class SecurityError(CeleriacError):
    """Decoding a stored failure would have built something that is not an exception."""


class BrokerError(CeleriacError):
    """The broker failed or refused an operation."""


class OperationalError(BrokerError):
    """The broker or backend could not be reached."""


class BackendError(CeleriacError):
    """The result backend failed, or none is configured where one is needed."""


class BackendNotConfigured(BackendError, NotImplementedError):
    """A result was asked for but no result backend is set (Celery raises NotImplementedError here)."""


class TimeoutError(CeleriacError):
    """The operation timed out."""


class NotRegistered(CeleriacError, KeyError):
    """A message named a task this process does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "NotRegistered"


class TaskPredicate(CeleriacError):
    """Raised inside a task to tell the worker how to treat the message."""


class Retry(TaskPredicate):
    """The task asked to run again later; raised by `Task.retry()`."""

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | str | None = None,
        when: float | datetime | None = None,
        is_eager: bool = False,
        sig: Any = None,
    ) -> None:
        self.message = message
        self.exc = exc
        self.excs = exc if isinstance(exc, str) else repr(exc) if exc is not None else None
        self.when = when
        self.is_eager = is_eager
        self.sig = sig
        super().__init__(message, exc, when)

    def humanize(self) -> str:
        if isinstance(self.when, int | float):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.excs:
            return f"Retry {self.humanize()}: {self.excs}"
        return f"Retry {self.humanize()}"


class Ignore(TaskPredicate):
    """The task asked the worker to record nothing for it."""


class Reject(TaskPredicate):
    """The task asked the worker to reject its message, optionally requeueing it."""

    def __init__(self, reason: str | None = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)


class MaxRetriesExceededError(CeleriacError):
    """The task asked to retry past its `max_retries`."""


class SoftTimeLimitExceeded(CeleriacError):
    """Raised inside a task when its soft time limit has passed."""


class TimeLimitExceeded(CeleriacError):
    """The task ran past its hard time limit and was stopped."""


class TaskRevokedError(CeleriacError):
    """The task was revoked or had expired, and did not run."""


class WorkerLostError(CeleriacError):
    """The process running the task exited before the task finished."""


class ChordError(CeleriacError):
    """A task in a chord's header failed."""


# Exceptions that Celery also defines, by the name it gives them, so a stored
# failure names `celery.exceptions` and either side can rebuild it.
CELERY_NAMED: tuple[type[BaseException], ...] = (
    NotRegistered,
    Retry,
    Ignore,
    Reject,
    MaxRetriesExceededError,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    TaskRevokedError,
    WorkerLostError,
    ChordError,
    TimeoutError,
)
