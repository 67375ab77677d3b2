"""`Celery`: the app object. It holds the settings and the task registry, and sends tasks."""

from __future__ import annotations

import importlib
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from celeriac import _state, sending
from celeriac.backends.base import ResultBackend
from celeriac.backends.registry import create_backend
from celeriac.brokers.base import Broker, Outgoing
from celeriac.brokers.registry import DEFAULT_BROKER_URL, create_broker
from celeriac.config import Settings
from celeriac.exceptions import BackendNotConfigured, NotRegistered
from celeriac.protocol import serializers
from celeriac.protocol.message import new_id
from celeriac.request import Request, current_request
from celeriac.result import AsyncResult
from celeriac.task import Task, build_task_class

P = ParamSpec("P")
R = TypeVar("R")


class TaskRegistry(dict[str, Task[Any, Any]]):
    """Task name to task; a missing name raises `NotRegistered`."""

    def __missing__(self, name: str) -> Task[Any, Any]:
        raise NotRegistered(name)


class Celery:
    """A celeriac application: settings, tasks, and the connection to the broker and backend.

    Args:
        main: The app's name; the prefix of task names defined in `__main__`.
        broker: Broker URL (`sqlite:///tasks.db`, `memory://`, ...). Defaults to `broker_url`,
            else the embedded SQLite file `celeriac.db` in the working directory.
        backend: Result backend URL (`sqlite:///tasks.db`, `db+sqlite:///results.db`, ...).
        include: Modules the worker imports at start, so their tasks are registered.
        set_as_current: Make this the app that `shared_task`s and bare `AsyncResult`s use.
        **settings: Further settings, by Celery's names.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        include: Sequence[str] | None = None,
        set_as_current: bool = True,
        task_cls: type[Task[Any, Any]] | None = None,
        config_source: object | str | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.conf.from_object(config_source)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not None:
            self.conf.result_backend = backend
        if include:
            self.conf.include = list(include)
        self.conf.update(settings)
        self.Task: type[Task[Any, Any]] = task_cls or Task
        self.tasks = TaskRegistry()
        self.oid = str(uuid.uuid4())
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._backend_made = False
        self._router: sending.Router | None = None
        self._composer = sending.Composer()
        self._lock = threading.Lock()
        if set_as_current:
            _state.set_current_app(self)
        _state.register_app(self)

    def __repr__(self) -> str:
        return f"<Celery {self.main or '__main__'} at {id(self):#x}>"

    # settings --------------------------------------------------------------------------

    def config_from_object(
        self, obj: object | str, *, force: bool = False, namespace: str | None = None
    ) -> None:
        """Load settings from a module, class or object, or from the import path of one."""
        self.conf.from_object(obj)
        self._forget_connections()

    def config_from_envvar(self, variable: str) -> None:
        """Load settings from the module named in the environment variable `variable`."""
        self.conf.from_envvar(variable)
        self._forget_connections()

    @property
    def broker_url(self) -> str:
        """The broker URL in use (the embedded SQLite default when none is set)."""
        return str(self.conf.broker_url or DEFAULT_BROKER_URL)

    def import_includes(self) -> None:
        """Import the modules named in `include` and `imports`, registering their tasks."""
        for module in [*self.conf.include, *self.conf.imports]:
            importlib.import_module(module)

    # tasks -----------------------------------------------------------------------------

    @overload
    def task(self, fun: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        bind: Literal[True],
        name: str | None = ...,
        base: type[Task[Any, Any]] | None = ...,
        **options: Any,
    ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    @overload
    def task(
        self,
        *,
        bind: Literal[False] = ...,
        name: str | None = ...,
        base: type[Task[Any, Any]] | None = ...,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy cannot match **options across the overloads
        self,
        fun: Callable[..., Any] | None = None,
        /,
        *,
        bind: bool = False,
        name: str | None = None,
        base: type[Task[Any, Any]] | None = None,
        **options: Any,
    ) -> Any:
        """Register a function as a task (usable bare, `@app.task`, or with options).

        Args:
            bind: Pass the task itself as the first argument (for `self.retry`, `self.request`).
            name: The task's name (default: `module.function`).
            base: A `Task` subclass to build on.
            **options: Task options: `max_retries`, `default_retry_delay`, `acks_late`,
                `time_limit`, `soft_time_limit`, `ignore_result`, `autoretry_for`,
                `retry_backoff`, `retry_backoff_max`, `retry_jitter`, `queue`, `priority`,
                `serializer`, ...
        """

        def decorate(function: Callable[..., Any]) -> Task[Any, Any]:
            return self._register(function, bind=bind, name=name, base=base, options=options)

        return decorate(fun) if fun is not None else decorate

    def _register(
        self,
        function: Callable[..., Any],
        *,
        bind: bool,
        name: str | None,
        base: type[Task[Any, Any]] | None,
        options: Mapping[str, Any],
    ) -> Task[Any, Any]:
        task_name = name or self.gen_task_name(function.__name__, function.__module__)
        task = build_task_class(
            function, name=task_name, base=base or self.Task, bind=bind, app=self, options=options
        )
        self.tasks[task_name] = task
        return task

    def gen_task_name(self, name: str, module: str) -> str:
        """Name a task as Celery does: `module.function`, with the app's main name for `__main__`."""
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    # sending ---------------------------------------------------------------------------

    def send_task(
        self,
        name: str,
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
        task: Task[Any, Any] | None = None,
    ) -> AsyncResult[Any]:
        """Send a task by name (it need not be registered here) and return its result handle.

        Takes the same options as `Task.apply_async`.
        """
        call = sending.Call(
            name=name,
            args=tuple(args or ()),
            kwargs=dict(kwargs or {}),
            countdown=countdown,
            eta=eta,
            expires=expires,
            queue=queue,
            priority=priority,
            task_id=task_id or new_id(),
            headers=headers,
            ignore_result=ignore_result,
            serializer=serializer,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            link=link,
            link_error=link_error,
            shadow=shadow,
            retries=retries,
            root_id=root_id,
            parent_id=parent_id,
            group_id=group_id,
            group_index=group_index,
            chain=chain,
            chord=chord,
        )
        self.publish([self.prepare(call, task)])
        return AsyncResult(call.task_id, app=self)

    def prepare(self, call: sending.Call, task: Task[Any, Any] | None = None) -> Outgoing:
        """Turn a task call into the bytes, queue, priority and eta a broker stores.

        Raises:
            TypeError: An argument cannot be serialised; the message names it.
        """
        router = None if call.queue else self.router
        return self._prepare(call, task, current_request(), self.conf, router)

    def prepare_many(self, calls: Sequence[tuple[sending.Call, Task[Any, Any] | None]]) -> list[Outgoing]:
        """`prepare` each `(call, task)` pair, reading the settings once for them all.

        Raises:
            TypeError: An argument cannot be serialised; the message names it.
        """
        parent, conf, router = current_request(), sending.send_settings(self.conf), self.router
        return [self._prepare(call, task, parent, conf, router) for call, task in calls]

    def _prepare(
        self,
        call: sending.Call,
        task: Task[Any, Any] | None,
        parent: Request | None,
        conf: Mapping[str, Any],
        router: sending.Router | None,
    ) -> Outgoing:
        if parent is not None and parent.id is not None and not parent.is_eager:
            call = call.child_of(parent.root_id or parent.id, parent.id)
        serializer = serializers.by_name(
            call.serializer or (task.serializer if task is not None else None) or conf["task_serializer"]
        )
        queue = call.queue or (router or self.router).queue_for(call.name, call.args, call.kwargs)
        try:
            return self._composer.compose(
                call, conf=conf, reply_to=self.oid, serializer=serializer, queue=queue
            )
        except TypeError as exc:
            target = task if task is not None else self.tasks.get(call.name)
            raise sending.explain_unserialisable(
                target, call.name, call.args, call.kwargs, serializer
            ) from exc

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Store prepared messages in the broker, retrying per `task_publish_retry_policy`.

        Raises:
            OperationalError: The broker stayed unreachable through every retry.
        """
        sending.publish_with_retry(self.broker, messages, self.conf)

    @property
    def router(self) -> sending.Router:
        """Chooses queues from `task_routes` and `task_default_queue`."""
        routes, default = self.conf["task_routes"], self.conf["task_default_queue"]
        cached = self._router
        if cached is None or cached.source is not routes or cached.default_queue != default:
            cached = self._router = sending.Router(routes, default)
        return cached

    # results ---------------------------------------------------------------------------

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """Return the result handle for `task_id`."""
        return AsyncResult(task_id, app=self)

    # connections -----------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker connection, made on first use."""
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = create_broker(self.broker_url, self.conf.broker_transport_options or {})
        return self._broker

    @property
    def backend(self) -> ResultBackend | None:
        """The result backend, made on first use; None when no `result_backend` is set."""
        if not self._backend_made:
            with self._lock:
                if not self._backend_made:
                    self._backend = self._make_backend()
                    self._backend_made = True
        return self._backend

    def _make_backend(self) -> ResultBackend | None:
        accept = self.conf.result_accept_content or self.conf.accept_content
        return create_backend(
            self.conf.result_backend,
            serializer=self.conf.result_serializer,
            expires=self.conf.result_expires_seconds,
            accept=serializers.content_types(accept),
            options=self.conf.get("result_backend_transport_options"),
        )

    def require_backend(self) -> ResultBackend:
        """Return the result backend, or say how to configure one."""
        backend = self.backend
        if backend is None:
            raise BackendNotConfigured(
                "No result backend is configured. Set one to store and read results, e.g. "
                "Celery('tasks', backend='sqlite:///results.db') or "
                "app.conf.result_backend = 'redis://localhost:6379/0'."
            )
        return backend

    def _forget_connections(self) -> None:
        self.close()
        self._broker = None
        self._backend = None
        self._backend_made = False

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process; new ones are made on use."""
        if self._broker is not None:
            self._broker.reset_after_fork()
        if self._backend is not None:
            self._backend.reset_after_fork()

    def close(self) -> None:
        """Close the broker and backend connections."""
        if self._broker is not None:
            self._broker.close()
        if self._backend is not None:
            self._backend.close()

    @property
    def accept_content(self) -> frozenset[str]:
        """Content types workers accept, from `accept_content`."""
        return serializers.content_types(self.conf.accept_content)


def shared_task(*args: Any, **options: Any) -> Any:
    """Define a task that belongs to every app (the current one when it is called)."""

    def decorate(function: Callable[..., Any]) -> Task[Any, Any]:
        name = options.get("name") or f"{function.__module__}.{function.__name__}"
        bind = bool(options.get("bind", False))
        rest = {k: v for k, v in options.items() if k not in ("name", "bind", "base")}

        def attach(app: Celery) -> Task[Any, Any]:
            if name not in app.tasks:
                app._register(function, bind=bind, name=name, base=options.get("base"), options=rest)
            return app.tasks[name]

        _state.connect_shared_task(attach)
        return build_task_class(
            function, name=name, base=options.get("base") or Task, bind=bind, app=None, options=rest
        )

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0])
    return decorate


__all__ = ["Celery", "TaskRegistry", "shared_task"]
