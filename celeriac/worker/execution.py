"""One job, start to finish, in whatever process or thread the pool runs it."""

from __future__ import annotations

import logging
import os
import time
import traceback as tb
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.brokers.base import Broker
from celeriac.exceptions import TaskRevokedError
from celeriac.protocol.message import TaskMessage, short_repr
from celeriac.request import Request
from celeriac.tracing import Tracer
from celeriac.worker.jobs import Completion, Job, Policy

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.task import Task

logger = logging.getLogger("celeriac.worker")


def build_request(job: Job, task: Task[Any, Any]) -> Request:
    """Turn a job's message into the `self.request` its task sees.

    The fields a task run needs are set now; the rest are read from the message the first
    time the task (or a handler) asks for one.
    """
    message = job.message
    embed = message.embed
    return Request.of(
        {
            "id": message.id,
            "task": task.name,
            "args": tuple(message.args),
            "kwargs": dict(message.kwargs),
            "hostname": job.hostname,
            "callbacks": embed.get("callbacks"),
            "errbacks": embed.get("errbacks"),
            "chain": embed.get("chain"),
            "chord": embed.get("chord"),
            "ignore_result": bool(message.headers.get("ignore_result")),
            "is_eager": False,
            "called_directly": False,
        },
        lambda: _seldom_read(job),
    )


def _seldom_read(job: Job) -> dict[str, Any]:
    message = job.message
    headers = message.headers
    get = headers.get
    return {
        "retries": int(get("retries") or 0),
        "eta": get("eta"),
        "expires": get("expires"),
        "root_id": get("root_id"),
        "parent_id": get("parent_id"),
        "group": get("group"),
        "group_index": get("group_index"),
        "origin": get("origin"),
        "shadow": get("shadow"),
        "reply_to": message.properties.get("reply_to"),
        "correlation_id": message.properties.get("correlation_id") or message.id,
        "timelimit": (job.hard_limit, job.soft_limit),
        "headers": dict(headers),
        "delivery_info": {
            "exchange": "",
            "routing_key": job.delivery.queue,
            "priority": message.priority,
            "redelivered": job.delivery.redelivered,
        },
    }


def is_expired(message: TaskMessage) -> bool:
    """True when the message's `expires` time has passed."""
    if message.headers.get("expires") is None:  # most messages: no parse, no clock
        return False
    expires = message.expires
    if expires is None:
        return False
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return expires <= datetime.now(UTC)


def revoke_expired(app: Celery, message: TaskMessage) -> None:
    """Record an expired task as REVOKED, so its caller's `get()` ends."""
    backend = app.backend
    if backend is not None:
        backend.store_result(message.id, TaskRevokedError("expired"), states.REVOKED)


def settle(broker: Broker, job: Job, completion: Completion) -> None:
    """Ack, requeue or dead-letter a finished job's message, as its ack policy says."""
    if completion.requeue:
        broker.release([job.delivery])
    elif completion.state == states.FAILURE and job.policy.acks_late and not job.policy.ack_failures:
        reason = f"task failed: {completion.summary}"
        logger.error("Message from queue %r moved to the dead-letter queue: %s", job.delivery.queue, reason)
        broker.dead_letter(job.delivery, reason)
    else:
        broker.ack([job.delivery])


def execute(app: Celery, job: Job) -> Completion:
    """Run `job`, store its outcome and settle its message; never raises for a task's own failure."""
    message, policy, broker = job.message, job.policy, app.broker
    if is_expired(message):
        revoke_expired(app, message)
        broker.ack([job.delivery])
        return Completion(job.key, states.REVOKED, 0.0, "expired")
    if not policy.acks_late:
        broker.ack([job.delivery])  # early ack: the message is gone before the task starts
    completion = _run(job, policy)
    if policy.acks_late:
        settle(broker, job, completion)
    return completion


def _run(job: Job, policy: Policy) -> Completion:
    tracer = policy.tracer
    request = build_request(job, policy.task)
    if policy.track_started:
        _store_started(tracer, job, request)
    outcome = tracer.run(request, request.args, request.kwargs)
    quiet = outcome.state == states.SUCCESS and not logger.isEnabledFor(logging.INFO)
    return Completion(
        job.key,
        outcome.state,
        outcome.runtime,
        "" if quiet else outcome.summary,  # a repr costs; a success is logged only at info
        outcome.traceback,
        requeue=outcome.reject_requeue,
    )


def _store_started(tracer: Tracer, job: Job, request: Request) -> None:
    """Store STARTED for `job`, unless its result is ignored (as the tracer decides; else STARTED sticks)."""
    backend = tracer.backend
    if backend is None or request.ignore_result or tracer.task.ignore_result:
        return
    backend.store_result(job.message.id, {"pid": os.getpid(), "hostname": job.hostname}, states.STARTED)


def execute_safely(app: Celery, job: Job) -> Completion:
    """Run `execute`, turning an error outside the task body (a backend outage, a late alarm) into FAILURE."""
    started = time.perf_counter()
    try:
        return execute(app, job)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        logger.error("Task %s[%s] could not be run: %r", job.message.name, job.message.id, exc)
        _store_failure(app, job.message, exc)
        return Completion(
            job.key,
            states.FAILURE,
            time.perf_counter() - started,
            short_repr(exc),
            tb.format_exc(),
            settled=False,
        )


def _store_failure(app: Celery, message: TaskMessage, exc: BaseException) -> None:
    backend = app.backend
    if backend is None:
        return
    try:
        backend.store_result(message.id, exc, states.FAILURE, traceback=tb.format_exc())
    except Exception:
        logger.exception("could not store the failure of task %s", message.id)
