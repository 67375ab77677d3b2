"""What the consumer hands a pool (`Job`) and what the pool hands back (`Completion`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celeriac.protocol.message import TaskMessage


@dataclass(frozen=True, slots=True)
class Job:
    """One task run to perform; picklable, so it crosses into a prefork child."""

    key: int
    message: TaskMessage
    delivery_info: dict[str, Any]
    hostname: str
    soft_limit: float | None
    hard_limit: float | None


@dataclass(frozen=True, slots=True)
class Completion:
    """How a job ended, reduced to what the consumer needs to log and ack."""

    key: int
    state: str
    runtime: float
    summary: str
    traceback: str | None = None
    requeue: bool = False
    worker_lost: bool = False
