"""Find the app named by `-A`: `module`, `module:attribute`, or a package with a `celery` module."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from celeriac.app import Celery


class AppNotFound(Exception):
    """`-A` named something that holds no celeriac app."""


def find_app(spec: str) -> Celery:
    """Import `spec` and return the app it names."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] and exc.name != module_name:
            raise
        raise AppNotFound(f"cannot import module {module_name!r} (looked in {os.getcwd()})") from exc
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, Celery):
            raise AppNotFound(f"{spec!r} is not a celeriac app")
        return found
    return _app_in(module, spec)


def _app_in(module: ModuleType, spec: str) -> Celery:
    for name in ("app", "celery"):
        candidate = getattr(module, name, None)
        if isinstance(candidate, Celery):
            return candidate
        if isinstance(candidate, ModuleType):
            return _app_in(candidate, spec)
    apps = [value for value in vars(module).values() if isinstance(value, Celery)]
    if len(apps) == 1:
        return apps[0]
    try:
        submodule = importlib.import_module(f"{module.__name__}.celery")
    except ModuleNotFoundError:
        submodule = None
    if submodule is not None:
        return _app_in(submodule, spec)
    raise AppNotFound(f"module {spec!r} has no celeriac app: name it with -A {spec}:app")
