"""What the consumer hands a pool (`Job`) and what the pool hands back (`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.brokers.base import Delivery
from celeriac.protocol.message import TaskMessage

if TYPE_CHECKING:
    from celeriac.task import Task


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds per task to build
class Job:
    """One task run to perform, built by the consumer of the process that runs it.

    `delivery` is the leased message: the process that runs the job acks it (just before
    the task starts, or after it ends with `acks_late`).
    """

    key: int
    message: TaskMessage
    delivery: Delivery
    task: Task[Any, Any]  # the registered task the message names
    hostname: str
    soft_limit: float | None
    hard_limit: float | None
    acks_late: bool = False
    ack_failures: bool = True


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
