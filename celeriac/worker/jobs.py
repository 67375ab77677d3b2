"""A job to run (`Job`), the per-task policy it is built from (`Policy`), and how it ended (`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.brokers.base import Delivery
from celeriac.protocol.message import TaskMessage
from celeriac.tracing import Tracer

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.task import Task


@dataclass(frozen=True, slots=True)
class Policy:
    """How this worker runs one task: its limits, ack policy and tracer, resolved once per task.

    The consumer keeps one per task name (settings do not change while it serves), so none of
    this is looked up per message.
    """

    task: Task[Any, Any]
    tracer: Tracer  # runs the task's body and stores its outcome in the app's backend
    soft_limit: float | None
    hard_limit: float | None
    acks_late: bool
    ack_failures: bool
    track_started: bool

    @classmethod
    def of(cls, app: Celery, task: Task[Any, Any]) -> Policy:
        """Resolve `task`'s options against the app's defaults."""
        conf = app.conf
        return cls(
            task=task,
            tracer=Tracer(task, app.backend),
            soft_limit=_first(task.soft_time_limit, conf.task_soft_time_limit),
            hard_limit=_first(task.time_limit, conf.task_time_limit),
            acks_late=_either(task.acks_late, conf.task_acks_late),
            ack_failures=_either(task.acks_on_failure_or_timeout, conf.task_acks_on_failure_or_timeout),
            track_started=_either(task.track_started, conf.task_track_started),
        )


def _first(*values: float | None) -> float | None:
    for value in values:
        if value:
            return float(value)
    return None


def _either(own: bool | None, default: Any) -> bool:
    """A task's own setting, or the app's where the task leaves it unset (None)."""
    return bool(own if own is not None else default)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds per task to build
class Job:
    """One task run to perform, built by the consumer of the process that runs it.

    `delivery` is the leased message: the process that runs the job acks it (just before
    the task starts, or after it ends with `acks_late`). Limits in the message override the
    policy's.
    """

    key: int
    message: TaskMessage
    delivery: Delivery
    policy: Policy
    hostname: str
    soft_limit: float | None
    hard_limit: float | None

    @property
    def task(self) -> Task[Any, Any]:
        """The registered task the message names."""
        return self.policy.task


def make_job(key: int, delivery: Delivery, message: TaskMessage, policy: Policy, hostname: str) -> Job:
    """The job that runs `message`'s task; limits in the message override the task's."""
    hard, soft = message.timelimit
    return Job(  # by position, in `Job`'s order: once per message, and keywords cost more
        key,
        message,
        delivery,
        policy,
        hostname,
        float(soft) if soft else policy.soft_limit,
        float(hard) if hard else policy.hard_limit,
    )


@dataclass(slots=True)  # not frozen: built once per message, and frozen costs more
class Completion:
    """How a job ended, reduced to what the consumer needs to log it.

    `settled` is False when the message still needs acking, releasing or dead-lettering
    (the job's process died, or was stopped at its hard time limit).
    """

    key: int
    state: str
    runtime: float
    summary: str
    traceback: str | None = None
    requeue: bool = False
    settled: bool = True
