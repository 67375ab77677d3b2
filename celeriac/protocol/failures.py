"""Exceptions as stored results: Celery's `{"exc_type", "exc_message", "exc_module"}` form."""

from __future__ import annotations

import importlib
from typing import Any

from celeriac import exceptions as ours
from celeriac.exceptions import SecurityError

CELERY_MODULE = "celery.exceptions"
_OURS_BY_NAME = {cls.__name__: cls for cls in ours.CELERY_NAMED}


def _jsonable_args(exc: BaseException) -> list[Any]:
    args = []
    for arg in exc.args:
        args.append(arg if isinstance(arg, str | int | float | bool | type(None)) else repr(arg))
    return args


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """Describe `exc` so any Celery or celeriac client can rebuild it."""
    cls = type(exc)
    module = CELERY_MODULE if cls in ours.CELERY_NAMED else cls.__module__
    return {"exc_type": cls.__qualname__, "exc_message": _jsonable_args(exc), "exc_module": module}


def _resolve(module_name: str, qualname: str) -> Any:
    if module_name == CELERY_MODULE and qualname in _OURS_BY_NAME:
        return _OURS_BY_NAME[qualname]
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return target


def _synthetic(module_name: str, qualname: str) -> type[BaseException]:
    name = qualname.rsplit(".", 1)[-1] or "UnknownError"
    return type(name, (Exception,), {"__module__": module_name, "__qualname__": qualname})


def exception_class(module_name: str, qualname: str) -> type[BaseException]:
    """Find the class a stored failure names, or make a stand-in with that name."""
    target = _resolve(module_name, qualname)
    if target is None:
        return _synthetic(module_name, qualname)
    if not (isinstance(target, type) and issubclass(target, BaseException)):
        raise SecurityError(f"stored failure names {module_name}.{qualname}, which is not an exception")
    return target


def decode_exception(data: Any) -> BaseException:
    """Rebuild an exception from its stored form (dict, or a bare message from old senders)."""
    if isinstance(data, BaseException):
        return data
    if not isinstance(data, dict) or "exc_type" not in data:
        return Exception(str(data))
    cls = exception_class(str(data.get("exc_module") or "builtins"), str(data["exc_type"]))
    message = data.get("exc_message")
    args = message if isinstance(message, list | tuple) else [] if message is None else [message]
    try:
        return cls(*args)
    except Exception:  # an __init__ that wants other arguments: keep the type and the message
        exc = cls.__new__(cls)
        exc.args = tuple(args)
        return exc
