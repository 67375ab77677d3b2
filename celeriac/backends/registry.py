"""Result backends by URL scheme: the one place the app turns a `result_backend` URL into a backend.

Implementations are imported only when their scheme is asked for, so a backend's
client library (redis, psycopg) is needed only by those who use it. To add a backend,
add an entry to `_BACKENDS`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol import serializers

DISABLED = frozenset({"", "disabled"})


# Every scheme a backend answers to, with Celery's aliases (cache+memory, db+sqlite):
# (module, class name, what `pip install` adds its client library, if anything).
_BACKENDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("memory", "cache+memory"): ("celeriac.backends.memory", "MemoryBackend", ""),
    ("sqlite", "db+sqlite"): ("celeriac.backends.sqlite", "SQLiteBackend", ""),
    ("redis", "rediss", "redis+socket", "sentinel"): ("celeriac.backends.redis", "RedisBackend", "redis"),
    ("redis+cluster", "rediss+cluster"): ("celeriac.backends.redis_cluster", "RedisClusterBackend", "redis"),
}


def supported_schemes() -> list[str]:
    """Return every URL scheme `create_backend` understands, sorted."""
    return sorted(scheme for schemes in _BACKENDS for scheme in schemes)


def url_scheme(url: str) -> str:
    """Return the lower-cased scheme of `url`; a bare name (``"memory"``) is its own scheme."""
    scheme, separator, _ = url.partition("://")
    return (scheme if separator else url).strip().lower()


def _backend_class(scheme: str) -> type[ResultBackend]:
    """Import and return the backend class serving `scheme`."""
    entry = next((found for schemes, found in _BACKENDS.items() if scheme in schemes), None)
    if entry is None:
        raise ImproperlyConfigured(
            f"unknown result backend scheme {scheme!r}; supported schemes: {', '.join(supported_schemes())}"
        )
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or "a client library"
        hint = f" (pip install 'celeriac[{extra}]')" if extra else ""
        raise ImproperlyConfigured(
            f"The {scheme}:// result backend needs {missing}, which is not installed{hint}"
        ) from exc
    backend_class: type[ResultBackend] = getattr(module, class_name)
    return backend_class


def create_backend(
    url: str | None,
    *,
    serializer: str = "json",
    expires: float | None = DEFAULT_EXPIRES,
    accept: Iterable[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> ResultBackend | None:
    """Build the result backend a `result_backend` URL names.

    Args:
        url: For example ``memory://``, ``cache+memory://``, ``sqlite:///results.db``,
            ``db+sqlite:////abs/path.db``, ``redis://localhost:6379/0``, ``rediss://...``,
            ``redis+socket:///path/redis.sock``, ``sentinel://host:26379;sentinel://host2:26379``
            or ``redis+cluster://host:7000,host2:7001`` (Redis Cluster; ``rediss+cluster://`` for TLS).
            None, ``""`` and ``"disabled"`` mean no backend.
        serializer: `result_serializer`: name of the serializer for stored documents.
        expires: `result_expires`: seconds a ready result is kept; None keeps it forever.
        accept: `result_accept_content`: serializer names or content types accepted when
            reading results back; None accepts only `serializer`'s.
        options: `result_backend_transport_options`, for the backends that take any
            (Redis: ``master_name`` for Sentinel, socket settings); others ignore them.

    Returns:
        The backend, or None when results are disabled.

    Raises:
        ImproperlyConfigured: The scheme is unknown, or the URL is malformed for its backend.
        ProtocolError: `serializer` or an `accept` entry names no known serializer.
    """
    if url is None or url.strip().lower() in DISABLED:
        return None
    backend_class = _backend_class(url_scheme(url))
    accepted = None if accept is None else serializers.content_types(accept)
    extra: dict[str, Any] = {"options": options} if options and _takes_options(backend_class) else {}
    return backend_class(url, serializer=serializer, expires=expires, accept=accepted, **extra)


def _takes_options(backend_class: type[ResultBackend]) -> bool:
    # Transport options mean nothing to most backends (as in Celery), so only those
    # whose constructor asks for them get them.
    return "options" in inspect.signature(backend_class).parameters
