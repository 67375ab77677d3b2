"""`Request`: what a running task knows about its own call (`self.request`)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any

_FIELDS: dict[str, Any] = {
    "id": None,
    "task": None,
    "args": (),
    "kwargs": {},
    "retries": 0,
    "eta": None,
    "expires": None,
    "hostname": None,
    "delivery_info": {},
    "root_id": None,
    "parent_id": None,
    "group": None,
    "group_index": None,
    "origin": None,
    "reply_to": None,
    "correlation_id": None,
    "timelimit": None,
    "callbacks": None,
    "errbacks": None,
    "chain": None,
    "chord": None,
    "headers": None,
    "ignore_result": False,
    "is_eager": False,
    "called_directly": True,
    "shadow": None,
}


_REST = "_celeriac_rest"  # where a request built by `Request.of` keeps its not yet computed fields


class Request:
    """The context of one task run; attributes as in Celery's `Task.request`."""

    id: Any
    task: Any
    args: Any
    kwargs: Any
    retries: int
    eta: Any
    expires: Any
    hostname: Any
    delivery_info: Any
    root_id: Any
    parent_id: Any
    group: Any
    group_index: Any
    origin: Any
    reply_to: Any
    correlation_id: Any
    timelimit: Any
    callbacks: Any
    errbacks: Any
    chain: Any
    chord: Any
    headers: Any
    ignore_result: bool
    is_eager: bool
    called_directly: bool
    shadow: Any

    @classmethod
    def of(cls, fields: dict[str, Any], rest: Callable[[], dict[str, Any]] | None = None) -> Request:
        """A request whose attributes are `fields`, taken as they are.

        Between them, `fields` and what `rest()` returns must name every field. `rest` runs
        once, the first time a field it gives is read: the worker passes the fields a task
        seldom reads that way, so a task that never reads them never pays for them.
        """
        request = cls.__new__(cls)
        request.__dict__ = fields
        if rest is not None:
            fields[_REST] = rest
        return request

    def __init__(self, values: Mapping[str, Any] | None = None, **fields: Any) -> None:
        self.__dict__.update(_FIELDS)
        if values:
            self.__dict__.update(values)
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> Any:  # only for names not yet in __dict__
        fields = self.__dict__
        if _REST not in fields:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._complete()
        return getattr(self, name)

    def _complete(self) -> None:
        rest = self.__dict__.pop(_REST, None)
        if rest is not None:
            self.__dict__.update(rest())

    def __getstate__(self) -> dict[str, Any]:
        self._complete()  # a copy or a pickle takes the fields, not what computes some of them
        return self.__dict__

    def get(self, name: str, default: Any = None) -> Any:
        """Return a field by name, or `default`."""
        self._complete()
        return self.__dict__.get(name, default)

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        self._complete()
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"<Request {self.task}[{self.id}]>"


_running: contextvars.ContextVar[Request | None] = contextvars.ContextVar("celeriac_request", default=None)


def current_request() -> Request | None:
    """Return the request of the task running in this thread (or task context), if any."""
    return _running.get()


def enter(request: Request) -> contextvars.Token[Request | None]:
    """Make `request` the current one; hand the token to `leave` when the run ends."""
    return _running.set(request)


def leave(token: contextvars.Token[Request | None]) -> None:
    """Restore the request that was current before `enter`."""
    _running.reset(token)
