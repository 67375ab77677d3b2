"""Reaching a Redis server from a Celery-style URL: shared by the Redis broker and result backend.

The URL forms, as Celery and kombu write them::

    redis://[[user]:password@]host[:port][/db]    TCP; redis-py's query options apply
    rediss://...                                  TLS; redis-py's ``ssl_*`` query options apply
    redis+socket:///path/to.sock[?virtual_host=db]  a unix socket (``unix://`` is redis-py's form)
    sentinel://[[user]:password@]host[:port][/db][;sentinel://host2[:port]...]
                                                  Sentinels that know the master by the
                                                  ``master_name`` transport option

`endpoint` checks a URL and its transport options once, when the broker or backend is made;
the `Endpoint` it returns builds clients lazily (and again in a forked child). A `Role` says
which of the two is asking: what messages call the server, which error to raise, and which
transport options go to redis-py. No message ever shows a password (`redact`).

Redis Cluster's URLs (``redis+cluster://``, celeriac's own) are read by `redis_cluster_connection`,
which shares `Role`, `Translated` and `redact` with this module; `Translated` and `close_client`
also know the cluster client's errors and connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from celeriac.exceptions import CeleriacError, ImproperlyConfigured

DEFAULT_SENTINEL_PORT = 26379
_PLAIN_SCHEMES = ("redis", "rediss", "unix", "redis+socket")
# Errors that say the server (or a cluster's node for a slot) cannot serve now but may soon.
_UNREACHABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)


@dataclass(frozen=True, slots=True)
class Role:
    """Who connects: the broker or the result backend, as its messages, errors and options differ.

    Attributes:
        noun: What messages call the server, such as ``"Redis broker"``.
        setting: The setting holding the transport options, named in messages that say what to set.
        client_options: Transport options handed to redis-py as they are; the others are ignored.
        default_client_options: Client options that apply unless the transport options set them.
        unreachable: Raised when the server cannot be reached or does not answer in time.
        failed: Raised for any other error of Redis or redis-py.
    """

    noun: str
    setting: str
    client_options: frozenset[str]
    default_client_options: Mapping[str, Any]
    unreachable: type[CeleriacError]
    failed: type[CeleriacError]

    def pick_client_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return the redis-py options among `options`, over this role's defaults."""
        chosen = {name: value for name, value in options.items() if name in self.client_options}
        return {**self.default_client_options, **chosen}


@dataclass(frozen=True, repr=False)  # the generated repr would show the passwords
class Endpoint:
    """How to reach the server: parsed and checked once, connected lazily and again after a fork.

    Attributes:
        url: What redis-py connects to (a ``redis+socket`` URL is rewritten as ``unix``).
        redacted: The URL as given, without its passwords, for messages and logs.
        client_options: Keyword arguments for every client.
        sentinels: (host, port) of each Sentinel; empty unless the URL is ``sentinel://``.
        master_name: The master the Sentinels are asked for; None without Sentinels.
        sentinel_options: Options for the connections to the Sentinels themselves (redis-py
            uses the ``socket_*`` client options if None).
    """

    url: str
    redacted: str
    client_options: Mapping[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_options: Mapping[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Endpoint({self.redacted!r})"

    def connect(self, **overrides: Any) -> redis.Redis:
        """Build a client; it opens its connections on first use.

        Args:
            overrides: Client options that replace this endpoint's, such as ``retry``.

        Returns:
            A client of the server, or of the current master behind the Sentinels.
        """
        options = {**self.client_options, **overrides}
        if self.master_name is None:
            return redis.Redis.from_url(self.url, **options)
        # redis-py leaves its Sentinel API unannotated.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels), sentinel_kwargs=self.sentinel_options, **options
        )
        client: redis.Redis = sentinel.master_for(self.master_name)  # type: ignore[no-untyped-call]
        return client


class Translated:
    """A context manager that raises redis-py's errors as the role's, naming the server without its password.

    It holds no state, so one instance may serve every call of a broker or backend, in any thread.

    Args:
        role: Which errors to raise and what to call the server.
        where: The server's redacted URL.
    """

    __slots__ = ("role", "where")

    def __init__(self, role: Role, where: str) -> None:
        self.role = role
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and _unreachable(exc):
            raise self.role.unreachable(f"cannot reach the {self.role.noun} at {self.where}: {exc}") from exc
        if isinstance(exc, redis.RedisError | RedisClusterException):
            raise self.role.failed(f"the {self.role.noun} at {self.where} failed: {exc}") from exc


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the server (or a cluster's nodes) cannot serve now, though it may soon."""
    if isinstance(exc, _UNREACHABLE):
        return True
    # Redis Cluster's client raises its own exception, not a RedisError, when it cannot
    # rebuild its slot map: no node answered, or those that did leave slots unserved.
    return isinstance(exc, RedisClusterException) and (
        isinstance(exc.__cause__, _UNREACHABLE) or "not covered" in str(exc)
    )


def endpoint(url: str, options: Mapping[str, Any], role: Role) -> Endpoint:
    """Check a Redis URL and its transport options, and return how to reach the server.

    Args:
        url: A ``redis://``, ``rediss://``, ``redis+socket://``, ``unix://`` or ``sentinel://`` URL.
        options: The transport options: ``master_name`` and ``sentinel_kwargs`` for Sentinel,
            and the role's client options.
        role: Who connects.

    Returns:
        The endpoint, not yet connected.

    Raises:
        ImproperlyConfigured: The URL is not one of those forms, or Sentinel lacks ``master_name``.
    """
    client_options = role.pick_client_options(options)
    if urlsplit(url).scheme.lower() == "sentinel":
        return _sentinel_endpoint(url, options, role, client_options)
    return _plain_endpoint(url, role, client_options)


def redact(url: str) -> str:
    """Return `url` with each password replaced by ``***`` (sentinel:// may join several URLs by ";")."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def sentinel_hosts(url: str) -> list[tuple[str, int]]:
    """Return the (host, port) of every Sentinel in ``sentinel://h1:p1;sentinel://h2:p2``.

    Raises:
        ImproperlyConfigured: A part is not a ``sentinel://host[:port]`` URL.
    """
    hosts = []
    for part in _parts(url):
        parts = urlsplit(part)
        if parts.scheme.lower() != "sentinel" or not parts.hostname:
            raise ImproperlyConfigured(
                f"bad sentinel URL {redact(part)!r}: write sentinel://host:port, several joined by ';'"
            )
        hosts.append((parts.hostname, parts.port or DEFAULT_SENTINEL_PORT))
    return hosts


def no_retry() -> Retry:
    """Return a redis-py retry policy that never retries, so every lost connection is seen."""
    return Retry(NoBackoff(), 0)


def close_client(client: redis.Redis | RedisCluster) -> None:
    """Close a client's connections, and those to its Sentinels if a Sentinel made it."""
    if isinstance(client, RedisCluster):
        client.close()  # every node's client, and its pool with it
        return
    client.close()
    pool = client.connection_pool
    pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


# parsing ------------------------------------------------------------------------------------


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _parts(url: str) -> list[str]:
    return [part for part in (piece.strip() for piece in url.split(";")) if part]


def _plain_endpoint(url: str, role: Role, client_options: dict[str, Any]) -> Endpoint:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _PLAIN_SCHEMES:
        raise ImproperlyConfigured(f"{redact(url)!r} is not a Redis URL")
    target = _socket_url(url) if scheme == "redis+socket" else url
    try:
        parsed: dict[str, Any] = parse_url(target)  # type: ignore[no-untyped-call]  # unannotated upstream
    except ValueError as exc:
        raise ImproperlyConfigured(f"Unusable {role.noun} URL {redact(url)!r}: {exc}") from exc
    if scheme == "redis+socket" and not parsed.get("path"):
        raise ImproperlyConfigured(
            f"the {role.noun} URL {redact(url)!r} names no socket; write redis+socket:///path/to/redis.sock"
        )
    return Endpoint(target, redact(url), client_options)


def _socket_url(url: str) -> str:
    # Celery's redis+socket:///path?virtual_host=N is redis-py's unix:///path?db=N.
    parts = urlsplit(url)
    query = urlencode(
        [("db" if name == "virtual_host" else name, value) for name, value in parse_qsl(parts.query)]
    )
    # Built by hand: urlunsplit drops the "//" of a URL without a host.
    return f"unix://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")


def _sentinel_endpoint(
    url: str, options: Mapping[str, Any], role: Role, client_options: dict[str, Any]
) -> Endpoint:
    master_name = options.get("master_name")
    if not master_name:
        raise ImproperlyConfigured(
            f"a sentinel:// {role.noun} needs the master's name: set {role.setting} = "
            "{'master_name': 'mymaster'}"
        )
    hosts = tuple(sentinel_hosts(url))
    # The transport options win over what the URLs say.
    master_options = {**_master_options(url), **client_options}
    return Endpoint(url, redact(url), master_options, hosts, str(master_name), options.get("sentinel_kwargs"))


def _master_options(url: str) -> dict[str, Any]:
    """User, password and database for the master: each from the first Sentinel URL naming it, as kombu."""
    found: dict[str, Any] = {}
    for part in _parts(url):
        parts = urlsplit(part)
        if parts.username:
            found.setdefault("username", unquote(parts.username))
        if parts.password:
            found.setdefault("password", unquote(parts.password))
        if parts.path.strip("/"):
            found.setdefault("db", _database(parts.path))
    return found


def _database(path: str) -> int:
    try:
        return int(path.strip("/"))
    except ValueError as exc:
        raise ImproperlyConfigured(f"the sentinel URL's database must be a number, not {path!r}") from exc
