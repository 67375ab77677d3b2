"""Result handles: `AsyncResult[R]` reads a task's state from the backend; `EagerResult[R]` holds one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from celeriac import states
from celeriac.exceptions import TaskRevokedError
from celeriac.protocol.failures import decode_exception

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.backends.base import ResultBackend, TaskMeta

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """The state and result of one task, read from the result backend.

    Args:
        id: The task id.
        app: The app whose backend holds the result (default: the current app).
    """

    def __init__(self, id: str, app: Celery | None = None, backend: ResultBackend | None = None) -> None:
        if app is None:
            from celeriac._state import get_current_app

            app = get_current_app()
        self.id = id
        self.app = app
        self._backend = backend
        self._cache: TaskMeta | None = None

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def backend(self) -> ResultBackend:
        """The backend results are read from; raises a clear error if none is configured."""
        return self._backend or self.app.require_backend()

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        return other == self.id if isinstance(other, str) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    # reading ---------------------------------------------------------------------------

    def _meta(self) -> TaskMeta:
        if self._cache is not None:
            return self._cache
        meta = self.backend.get_meta(self.id)
        if meta["status"] in states.READY_STATES:
            self._cache = meta
        return meta

    @property
    def state(self) -> str:
        """PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        return str(self._meta()["status"])

    @property
    def status(self) -> str:
        """Same as `state`."""
        return self.state

    @property
    def result(self) -> Any:
        """The return value, or the exception for a failed or retrying task."""
        meta = self._meta()
        return _value(meta)

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failure, if any."""
        value = self._meta().get("traceback")
        return str(value) if value is not None else None

    @property
    def date_done(self) -> datetime | None:
        """When the task finished (aware UTC), or None while it has not."""
        value = self._meta().get("date_done")
        return datetime.fromisoformat(value) if isinstance(value, str) else value

    @property
    def children(self) -> list[Any]:
        return list(self._meta().get("children") or [])

    def ready(self) -> bool:
        """True once the task succeeded, failed or was revoked."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
    ) -> R:
        """Wait for the task to finish and return its result.

        Args:
            timeout: Give up after this many seconds (None waits for ever).
            propagate: Re-raise the task's exception if it failed (else return it).
            interval: Longest pause between two looks at a backend that cannot notify.

        Raises:
            TimeoutError: The task was not ready in time.
            BackendError: No result backend is configured.
            Exception: The task's own exception, rebuilt, when it failed and `propagate` holds.
        """
        meta = self._cache or self.backend.wait(self.id, timeout, interval)
        self._cache = meta
        value = _value(meta)
        if propagate and meta["status"] in states.PROPAGATE_STATES and isinstance(value, BaseException):
            raise value
        return value  # type: ignore[no-any-return]

    wait = get

    def forget(self) -> None:
        """Remove the stored result."""
        self._cache = None
        self.backend.forget(self.id)

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Mark the task revoked in the backend, so a worker that has not started it skips it."""
        self.backend.store_result(self.id, TaskRevokedError("revoked"), states.REVOKED)
        self._cache = None


def _value(meta: TaskMeta) -> Any:
    result = meta.get("result")
    if meta.get("status") in states.EXCEPTION_STATES and result is not None:
        return decode_exception(result)
    return result


class EagerResult(AsyncResult[R]):
    """The outcome of a task run in this process by `apply()` or `task_always_eager`."""

    def __init__(
        self,
        id: str,
        retval: Any,
        state: str,
        traceback: str | None = None,
        app: Celery | None = None,
    ) -> None:
        super().__init__(id, app=app)
        self._retval = retval
        self._state = state
        self._traceback = traceback

    def _meta(self) -> TaskMeta:
        return {
            "status": self._state,
            "result": self._retval,
            "traceback": self._traceback,
            "children": [],
            "date_done": None,
            "task_id": self.id,
        }

    @property
    def result(self) -> Any:
        return self._retval

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
    ) -> R:
        if propagate and self._state in states.PROPAGATE_STATES and isinstance(self._retval, BaseException):
            raise self._retval
        return self._retval  # type: ignore[no-any-return]

    def forget(self) -> None:
        """Nothing is stored for an eager result."""

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"


class GroupResult:
    """The results of a group's members, in the order they were given."""

    def __init__(self, id: str, results: list[AsyncResult[Any]], app: Celery | None = None) -> None:
        self.id = id
        self.results = results
        self.app = app

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self) -> Iterator[AsyncResult[Any]]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @property
    def children(self) -> list[AsyncResult[Any]]:
        return self.results

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5) -> list[Any]:
        """Wait for every member and return their results in order.

        Raises:
            TimeoutError: Not all members finished within `timeout` seconds (in total).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=remaining, propagate=propagate, interval=interval))
        return values

    join = get

    def ready(self) -> bool:
        return all(result.ready() for result in self.results)

    def successful(self) -> bool:
        return all(result.successful() for result in self.results)

    def failed(self) -> bool:
        return any(result.failed() for result in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(result.successful() for result in self.results)
