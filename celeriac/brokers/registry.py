"""Broker URL scheme → broker class. The app reaches a concrete broker only through here.

Implementations are imported on first use, so a client library (redis, pika) is
imported only by a process that uses that broker. To add a broker, add one entry to
`BROKERS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celeriac.brokers.base import Broker
from celeriac.exceptions import ImproperlyConfigured

DEFAULT_BROKER_URL = "sqlite:///celeriac.db"

# scheme -> (module, class name)
BROKERS: dict[str, tuple[str, str]] = {
    "memory": ("celeriac.brokers.memory", "MemoryBroker"),
    "sqlite": ("celeriac.brokers.sqlite", "SQLiteBroker"),
    "sqla+sqlite": ("celeriac.brokers.sqlite", "SQLiteBroker"),
    "redis": ("celeriac.brokers.redis", "RedisBroker"),
    "rediss": ("celeriac.brokers.redis", "RedisBroker"),
    "redis+socket": ("celeriac.brokers.redis", "RedisBroker"),
    "sentinel": ("celeriac.brokers.redis", "RedisBroker"),
    "redis+cluster": ("celeriac.brokers.redis_cluster", "RedisClusterBroker"),
    "rediss+cluster": ("celeriac.brokers.redis_cluster", "RedisClusterBroker"),
}


def supported_schemes() -> tuple[str, ...]:
    """Return the broker URL schemes this installation knows, sorted."""
    return tuple(sorted(BROKERS))


def broker_class_for(url: str) -> type[Broker]:
    """Return the broker class that serves `url`'s scheme.

    Args:
        url: A broker URL such as ``sqlite:///celeriac.db`` or ``memory://``.

    Returns:
        The class; it is imported now if it was not yet.

    Raises:
        ImproperlyConfigured: No broker serves the scheme, or its client library is missing.
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme not in BROKERS:
        named = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ImproperlyConfigured(
            f"The broker URL has {named}; supported schemes are {', '.join(supported_schemes())} "
            f"(for example {DEFAULT_BROKER_URL})"
        )
    module_name, class_name = BROKERS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or "a client library"
        raise ImproperlyConfigured(f"The {scheme}:// broker needs {missing}, which is not installed") from exc
    broker_class: type[Broker] = getattr(module, class_name)
    return broker_class


def create_broker(url: str, options: Mapping[str, Any] | None = None) -> Broker:
    """Build the broker for `url`.

    Args:
        url: A broker URL; its scheme picks the class (see `broker_class_for`).
        options: `broker_transport_options`, passed to the broker.

    Returns:
        A broker ready to use; it connects on first use.

    Raises:
        ImproperlyConfigured: The scheme is unsupported, or the URL or an option is unusable.
    """
    return broker_class_for(url)(url, options)
