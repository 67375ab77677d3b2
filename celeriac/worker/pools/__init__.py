"""Executors that run jobs: prefork (child processes), threads, and solo (inline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.exceptions import ImproperlyConfigured
from celeriac.worker.pools.base import Pool

if TYPE_CHECKING:
    from celeriac.app import Celery

POOL_NAMES = ("prefork", "threads", "solo")


def create_pool(kind: str, app: Celery, concurrency: int) -> Pool:
    """Make the pool called `kind` with `concurrency` slots."""
    if kind == "solo":
        from celeriac.worker.pools.solo import SoloPool

        return SoloPool(app, 1)
    if kind == "threads":
        from celeriac.worker.pools.threads import ThreadPool

        return ThreadPool(app, concurrency)
    if kind == "prefork":
        from celeriac.worker.pools.prefork import PreforkPool

        return PreforkPool(app, concurrency)
    raise ImproperlyConfigured(f"unknown pool {kind!r}; choose one of {', '.join(POOL_NAMES)}")


__all__ = ["POOL_NAMES", "Pool", "create_pool"]
