"""Run a task in this process, as `Task.apply()` and `task_always_eager` do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from celeriac import states
from celeriac.protocol.message import new_id
from celeriac.request import Request
from celeriac.result import EagerResult
from celeriac.tracing import Tracer

if TYPE_CHECKING:
    from celeriac.task import Task

R = TypeVar("R")


def apply_eagerly(
    task: Task[..., R],
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    task_id: str | None = None,
    retries: int = 0,
    throw: bool | None = None,
    headers: Mapping[str, Any] | None = None,
) -> EagerResult[R]:
    """Run `task` now, in this thread, and return an `EagerResult` holding its outcome."""
    app = task.app
    task_id = task_id or new_id()
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    request = Request(
        id=task_id,
        task=task.name,
        args=args,
        kwargs=kwargs,
        retries=retries,
        root_id=task_id,
        is_eager=True,
        called_directly=False,
        headers=dict(headers or {}),
        delivery_info={"is_eager": True, "routing_key": task.queue or app.conf.task_default_queue},
    )
    backend = app.backend if app.conf.task_store_eager_result else None
    outcome = Tracer(task, backend, store=backend is not None).run(request, args, kwargs)
    propagate = app.conf.task_eager_propagates if throw is None else throw
    if propagate and outcome.state == states.FAILURE:
        raise outcome.value
    return EagerResult(task_id, outcome.value, outcome.state, outcome.traceback, app=app)
