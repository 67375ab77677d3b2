"""Executors that run jobs: prefork (child processes), threads, and solo (inline).

The threads and solo pools run jobs the worker's consumer hands them. The prefork pool
(`celeriac.worker.pools.prefork`) is different: each child is a consumer of its own and
the worker's main process only supervises, so `create_pool` does not make it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from celeriac.exceptions import ImproperlyConfigured
from celeriac.worker.pools.base import Pool

if TYPE_CHECKING:
    from celeriac.app import Celery

POOL_NAMES = ("prefork", "threads", "solo")


def create_pool(kind: str, app: Celery, concurrency: int, halt: threading.Event | None = None) -> Pool:
    """Make the in-process pool called `kind` (threads or solo) with `concurrency` slots.

    `halt` is the worker's warm stop: once it is set, the pool starts no job it holds queued.
    """
    if kind == "solo":
        from celeriac.worker.pools.solo import SoloPool

        return SoloPool(app, 1)
    if kind == "threads":
        from celeriac.worker.pools.threads import ThreadPool

        return ThreadPool(app, concurrency, halt)
    raise ImproperlyConfigured(f"unknown pool {kind!r}; choose one of {', '.join(POOL_NAMES)}")


__all__ = ["POOL_NAMES", "Pool", "create_pool"]
