"""Run one task call and record its outcome: shared by the worker and by eager `apply()`."""

from __future__ import annotations

import logging
import time
import traceback as tb
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.canvas import complete_chord_part, send_errbacks, send_followups
from celeriac.exceptions import Ignore, ProtocolError, Reject, Retry
from celeriac.protocol.message import short_repr
from celeriac.request import Request, enter, leave

if TYPE_CHECKING:
    from celeriac.backends.base import ResultBackend
    from celeriac.task import Task

logger = logging.getLogger("celeriac.task")


@dataclass(slots=True)  # not frozen: built once per message, and frozen costs more
class Outcome:
    """How one run ended. `value` is the return value, or the exception raised."""

    state: str
    value: Any
    runtime: float
    traceback: str | None = None
    reject_requeue: bool = False

    @property
    def summary(self) -> str:
        """A bounded repr of the value (Retry's own words for a retry), for log lines."""
        if isinstance(self.value, Retry):
            return str(self.value)
        return short_repr(self.value, 256)


def _extended(task: Task[Any, Any], request: Request) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if request.group is not None:
        extra["group_id"] = request.group
    if request.parent_id is not None:
        extra["parent_id"] = request.parent_id
    if task.app.conf["result_extended"]:  # by item: several times cheaper than by attribute
        delivery = request.delivery_info or {}
        extra.update(
            name=task.name,
            args=list(request.args),
            kwargs=dict(request.kwargs),
            worker=request.hostname,
            retries=request.retries,
            queue=delivery.get("routing_key"),
        )
    return extra


@dataclass(frozen=True, slots=True)
class Hooks:
    """Which of `Task`'s no-op hooks a task class overrides, and how to call its body.

    As in Celery, a hook counts only when the class overrides it: the worker skips the rest.
    """

    before_start: bool
    on_success: bool
    after_return: bool
    custom_call: bool

    def body(self, task: Task[Any, Any]) -> Callable[..., Any]:
        """The task's `__call__` if its class overrides it, else straight its `run`."""
        return task if self.custom_call else task.run


_HOOKS: dict[type, Hooks] = {}  # by task class: classes do not change once tasks run


def _hooks_of(kind: type) -> Hooks:
    hooks = _HOOKS.get(kind)
    if hooks is None:
        from celeriac.task import Task  # at run time: task.py imports this module's users

        def overrides(name: str) -> bool:
            return getattr(kind, name) is not getattr(Task, name)

        hooks = _HOOKS[kind] = Hooks(
            overrides("before_start"),
            overrides("on_success"),
            overrides("after_return"),
            overrides("__call__"),
        )
    return hooks


class Tracer:
    """Runs a task's body with its handlers and stores what happened in the backend."""

    def __init__(self, task: Task[Any, Any], backend: ResultBackend | None, store: bool = True) -> None:
        self.task = task
        self.backend = backend if store else None
        self.hooks = _hooks_of(type(task))
        self._body = self.hooks.body(task)

    def run(self, request: Request, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Outcome:
        """Run the task for `request` and return its outcome."""
        started = time.perf_counter()
        token = enter(request)  # by hand, not `with running(...)`: this runs once per task
        try:
            if self.hooks.before_start:
                self.task.before_start(request.id, args, kwargs)
            value = self._body(*args, **kwargs)
        except Retry as signal:
            return self._retried(request, signal, started)
        except Ignore:
            return Outcome(states.IGNORED, None, time.perf_counter() - started)
        except Reject as reject:
            return Outcome(states.REJECTED, reject, time.perf_counter() - started, None, reject.requeue)
        except Exception as exc:
            return self._failed(request, exc, started)
        else:
            return self._succeeded(request, value, started)
        finally:
            leave(token)

    def _store(self, request: Request, value: Any, state: str, trace: str | None = None) -> None:
        if self.backend is None or request.id is None:
            return
        ignored = request.ignore_result or self.task.ignore_result
        failing = state in states.EXCEPTION_STATES
        keep_errors = self.task.store_errors_even_if_ignored
        if keep_errors is None:
            keep_errors = self.task.app.conf.task_store_errors_even_if_ignored
        if ignored and not (failing and keep_errors):
            return
        self.backend.store_result(
            request.id, value, state, traceback=trace, extra=_extended(self.task, request)
        )

    def _succeeded(self, request: Request, value: Any, started: float) -> Outcome:
        if self.backend is not None:  # checked here too: this runs once per task
            try:
                self._store(request, value, states.SUCCESS)
            except ProtocolError as exc:
                return self._failed(request, exc, started)
        if not request.is_eager and (request.callbacks or request.chain or request.chord):
            send_followups(self.task.app, request, value)
            complete_chord_part(self.task.app, request, states.SUCCESS, value)
        hooks = self.hooks
        if hooks.on_success:
            self.task.on_success(value, request.id, request.args, request.kwargs)
        if hooks.after_return:
            self._after(states.SUCCESS, value, request, None)
        return Outcome(states.SUCCESS, value, time.perf_counter() - started)

    def _failed(self, request: Request, exc: BaseException, started: float) -> Outcome:
        trace = tb.format_exc()
        self._store(request, exc, states.FAILURE, trace)
        if not request.is_eager:
            self._guarded(send_errbacks, request, exc)
            self._guarded(
                lambda app, req, error: complete_chord_part(app, req, states.FAILURE, error), request, exc
            )
        self._handler(self.task.on_failure, exc, request, trace)
        self._after(states.FAILURE, exc, request, trace)
        return Outcome(states.FAILURE, exc, time.perf_counter() - started, trace)

    def _retried(self, request: Request, signal: Retry, started: float) -> Outcome:
        reason = signal.exc if isinstance(signal.exc, BaseException) else signal
        trace = tb.format_exc()
        self._store(request, reason, states.RETRY, trace)
        self._handler(self.task.on_retry, reason, request, trace)
        # No after_return: as in Celery (IGNORE_STATES), a retry is not the task's return.
        return Outcome(states.RETRY, signal, time.perf_counter() - started, trace)

    def _guarded(self, step: Any, request: Request, exc: BaseException) -> None:
        try:
            step(self.task.app, request, exc)
        except Exception:
            logger.exception("could not send the errbacks of task %s[%s]", self.task.name, request.id)

    def _handler(self, hook: Any, exc: BaseException, request: Request, trace: str) -> None:
        try:
            hook(exc, request.id, request.args, request.kwargs, trace)
        except Exception:
            logger.exception("%s handler of task %s raised", hook.__name__, self.task.name)

    def _after(self, state: str, value: Any, request: Request, trace: str | None) -> None:
        if not self.hooks.after_return:
            return
        try:
            self.task.after_return(state, value, request.id, request.args, request.kwargs, trace)
        except Exception:
            logger.exception("after_return handler of task %s raised", self.task.name)
