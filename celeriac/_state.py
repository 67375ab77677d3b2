"""The little process-wide state Celery's API needs: the current app and `@shared_task`s.

`shared_task` must reach apps made after it ran, and tasks defined with it must find
"the app" when called; both need one place that remembers. Nothing else is global.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.app import Celery

_current: Celery | None = None
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_shared: list[Callable[[Celery], Any]] = []


def set_current_app(app: Celery) -> None:
    """Make `app` the one `shared_task`s and `AsyncResult(id)` use by default."""
    global _current
    _current = app


def get_current_app() -> Celery:
    """Return the current app, making a default one if none exists yet."""
    if _current is None:
        from celeriac.app import Celery

        Celery("default")
    assert _current is not None
    return _current


def register_app(app: Celery) -> None:
    """Remember `app` and give it every shared task defined so far."""
    _apps.add(app)
    for finalize in list(_shared):
        finalize(app)


def connect_shared_task(finalize: Callable[[Celery], Any]) -> None:
    """Run `finalize(app)` for every app, now and as new apps are made."""
    _shared.append(finalize)
    for app in list(_apps):
        finalize(app)
