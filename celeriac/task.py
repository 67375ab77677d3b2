"""`Task[P, R]`: a function registered with an app, callable in-process or through the broker."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

from celeriac import states
from celeriac.canvas import Signature
from celeriac.exceptions import MaxRetriesExceededError, Retry
from celeriac.request import Request, current_request
from celeriac.result import AsyncResult

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.result import EagerResult

P = ParamSpec("P")
R = TypeVar("R")

_IDLE_REQUEST = Request()


class Task(Generic[P, R]):
    """A task type. `@app.task` makes a subclass whose `run` is the decorated function.

    Class attributes are the task's options; each defaults to the app's setting when None.
    """

    name: str = ""
    typing: ClassVar[bool] = True
    max_retries: int | None = 3
    default_retry_delay: float = 180
    acks_late: bool | None = None
    acks_on_failure_or_timeout: bool | None = None
    reject_on_worker_lost: bool | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    ignore_result: bool | None = None
    store_errors_even_if_ignored: bool | None = None
    track_started: bool | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: Mapping[str, Any] = {}
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    queue: str | None = None
    priority: int | None = None
    serializer: str | None = None
    rate_limit: str | None = None
    expires: float | datetime | None = None
    shadow_name: str | None = None

    _app: Celery | None = None

    # running ---------------------------------------------------------------------------

    def run(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The task body; `@app.task` replaces it with the decorated function."""
        raise NotImplementedError(f"task {self.name!r} has no body")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.run(*args, **kwargs)

    @property
    def app(self) -> Celery:
        """The app this task belongs to (the current app for a shared task)."""
        if self._app is None:
            from celeriac._state import get_current_app

            return get_current_app()
        return self._app

    @property
    def request(self) -> Request:
        """The context of the run in progress, or an empty one outside a worker."""
        running = current_request()
        if running is not None and running.task == self.name:
            return running
        return _IDLE_REQUEST

    # calling ---------------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task to a worker with these arguments; a shortcut for `apply_async`."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        task_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        ignore_result: bool | None = None,
        serializer: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        retries: int = 0,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_id: str | None = None,
        group_index: int | None = None,
        chain: Sequence[Any] | None = None,
        chord: Any = None,
        routing_key: str | None = None,
        exchange: str | None = None,
    ) -> AsyncResult[R]:
        """Send the task to a worker.

        Args:
            args: Positional arguments for the task.
            kwargs: Keyword arguments for the task.
            countdown: Run no sooner than this many seconds from now.
            eta: Run no sooner than this time (naive times are read as UTC when `enable_utc`).
            expires: Seconds from now, or a time, after which the task is revoked unrun.
            queue: Queue to send to (else the task's, the routes', or `task_default_queue`).
            priority: 0-9; the broker serves higher numbers first.
            task_id: Use this id instead of a fresh uuid.
            headers: Extra message headers, readable as `self.request.headers` in the task.
            ignore_result: Store no result for this call.
            serializer: Serializer name for the arguments (default `task_serializer`).

        Returns:
            An `AsyncResult` for the call (an `EagerResult` with `task_always_eager`).

        Raises:
            TypeError: An argument cannot be serialised; the message names it.
        """
        app = self.app
        if app.conf["task_always_eager"]:  # by item: several times cheaper than by attribute
            return self.apply(args, kwargs, task_id=task_id, retries=retries, headers=headers)
        return app.send_task(
            self.name,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires if expires is not None else self.expires,
            queue=queue or routing_key or self.queue,
            priority=priority if priority is not None else self.priority,
            task_id=task_id,
            headers=headers,
            ignore_result=ignore_result if ignore_result is not None else self.ignore_result,
            serializer=serializer or self.serializer,
            time_limit=time_limit if time_limit is not None else self.time_limit,
            soft_time_limit=soft_time_limit if soft_time_limit is not None else self.soft_time_limit,
            link=link,
            link_error=link_error,
            shadow=shadow or self.shadow_name,
            retries=retries,
            root_id=root_id,
            parent_id=parent_id,
            group_id=group_id,
            group_index=group_index,
            chain=chain,
            chord=chord,
            task=self,
        )

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        retries: int = 0,
        throw: bool | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> EagerResult[R]:
        """Run the task here and now, as a worker would, and return its result."""
        from celeriac.eager import apply_eagerly

        return apply_eagerly(
            self, args, kwargs, task_id=task_id, retries=retries, throw=throw, headers=headers
        )

    def signature(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature:
        """Describe a call of this task without making it (for chains, groups and callbacks)."""
        return Signature(self.name, args, kwargs, options, app=self._app)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """`signature(args, kwargs)`: a call that takes the previous step's result first."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: it ignores the previous step's result."""
        sig = self.signature(args, kwargs)
        sig.immutable = True
        return sig

    def AsyncResult(self, task_id: str) -> AsyncResult[R]:
        """Return the result handle for `task_id` of this task."""
        return AsyncResult(task_id, app=self.app)

    # retrying --------------------------------------------------------------------------

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Send this task again, with the same id, to run later; then raise `Retry`.

        Raises:
            Retry: Always, unless `throw` is False (then it is returned).
            MaxRetriesExceededError: Retries are used up and no `exc` was given
                (with `exc`, that exception is raised instead).
        """
        request = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if request.called_directly:
            raise exc if exc is not None else Retry("Task can be retried", exc)
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        self._send_retry(request, args, kwargs, eta=eta, countdown=countdown, options=options)
        signal = Retry(exc=exc, when=eta or countdown)
        if throw:
            raise signal
        return signal

    def _send_retry(
        self,
        request: Request,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        *,
        eta: datetime | None,
        countdown: float | None,
        options: Mapping[str, Any],
    ) -> None:
        delivery = request.delivery_info or {}
        if request.is_eager:
            self.apply(
                args if args is not None else request.args,
                kwargs if kwargs is not None else request.kwargs,
                task_id=request.id,
                retries=request.retries + 1,
                throw=True,
            ).get()
            return
        self.app.send_task(
            self.name,
            args if args is not None else request.args,
            kwargs if kwargs is not None else request.kwargs,
            task_id=request.id,
            retries=request.retries + 1,
            countdown=countdown,
            eta=eta,
            expires=request.expires,
            queue=options.get("queue") or delivery.get("routing_key"),
            priority=options.get("priority", delivery.get("priority")),
            root_id=request.root_id,
            parent_id=request.id,
            group_id=request.group,
            group_index=request.group_index,
            chain=request.chain,
            chord=request.chord,
            link=request.callbacks,
            link_error=request.errbacks,
            headers=_custom_headers(request.headers),
            ignore_result=request.ignore_result,
            time_limit=options.get("time_limit", (request.timelimit or (None, None))[0]),
            soft_time_limit=options.get("soft_time_limit", (request.timelimit or (None, None))[1]),
            task=self,
        )

    def backoff_countdown(self, retries: int) -> float | None:
        """Seconds to wait before autoretry number `retries + 1`, per `retry_backoff`."""
        if not self.retry_backoff:
            return None
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        countdown = min(float(self.retry_backoff_max), factor * (2**retries))
        return random.uniform(0, countdown) if self.retry_jitter else countdown

    # results and hooks -----------------------------------------------------------------

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None, **kwargs: Any
    ) -> None:
        """Store a custom state (and meta) for this task's result."""
        target = task_id or self.request.id
        if target is None:
            raise ValueError("update_state needs a task_id outside a running task")
        self.app.require_backend().store_result(target, meta, state or states.PENDING)

    def before_start(self, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Called in the worker just before the task runs."""

    def on_success(self, retval: Any, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Called in the worker after the task returned."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any], einfo: Any
    ) -> None:
        """Called in the worker after the task raised."""

    def on_retry(
        self, exc: BaseException, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any], einfo: Any
    ) -> None:
        """Called in the worker when the task asked to be retried."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        einfo: Any,
    ) -> None:
        """Called in the worker after the task's outcome is stored."""

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"


def _custom_headers(headers: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not headers:
        return None
    from celeriac.sending import PROTOCOL_HEADERS

    return {key: value for key, value in headers.items() if key not in PROTOCOL_HEADERS}


def build_task_class(
    fun: Callable[..., Any],
    *,
    name: str,
    base: type[Task[Any, Any]],
    bind: bool,
    app: Celery | None,
    options: Mapping[str, Any],
) -> Task[Any, Any]:
    """Make the `Task` subclass for a decorated function and return its one instance."""
    body = fun if bind else staticmethod(fun)
    if options.get("autoretry_for"):
        body = _with_autoretry(fun, bind)
    namespace: dict[str, Any] = {
        "run": body,
        "name": name,
        "_app": app,
        "__doc__": fun.__doc__,
        "__module__": fun.__module__,
        "__qualname__": getattr(fun, "__qualname__", fun.__name__),
        # As Celery does: read through the instance, an unbound task's __wrapped__ is the plain
        # function (a bare `fun` here would bind it and hide its first parameter).
        "__wrapped__": fun if bind else staticmethod(fun),
        "__annotations__": getattr(fun, "__annotations__", {}),
    }
    for key, value in options.items():
        if not hasattr(base, key):
            raise TypeError(f"unknown task option {key!r} for task {name!r}")
        namespace[key] = tuple(value) if key in {"autoretry_for", "dont_autoretry_for"} else value
    cls: type[Task[Any, Any]] = type(fun.__name__, (base,), namespace)
    return cls()


def _with_autoretry(fun: Callable[..., Any], bind: bool) -> Callable[..., Any]:
    def run(task: Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fun(task, *args, **kwargs) if bind else fun(*args, **kwargs)
        except Retry:
            raise
        except task.dont_autoretry_for:
            raise
        except task.autoretry_for as exc:
            retry_options = dict(task.retry_kwargs)
            countdown = task.backoff_countdown(task.request.retries)
            if countdown is not None:
                retry_options.setdefault("countdown", countdown)
            raise task.retry(exc=exc, **retry_options) from exc

    run.__name__ = fun.__name__
    run.__doc__ = fun.__doc__
    return run
