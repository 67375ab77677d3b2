"""Reaching a Redis Cluster from celeriac's own URLs: shared by the cluster broker and result backend.

Neither Celery nor kombu runs on Redis Cluster, so these URL forms are celeriac's::

    redis+cluster://[[user]:password@]host[:port][,host2[:port]...][/0][?option=value...]
    rediss+cluster://...      the same over TLS (redis-py's ``ssl_*`` query options apply)

The nodes named are only where the client starts: it asks them for the slot map and then
talks to every master it learns of, so naming two or three nodes lets it start while one
is down. A cluster has a single database, so the path may be empty or ``/0`` only. A URL
without hosts means localhost:6379, as ``redis://`` does. Query options (redis-py's names)
apply to every node connection; the transport options win over them.

`cluster_endpoint` checks the URL once; the `ClusterEndpoint` builds `RedisCluster` clients
for keyed commands, and plain clients that take turns over the nodes for pub/sub, which
any node serves.
"""

from __future__ import annotations

import itertools
import random
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException

from celeriac.exceptions import ImproperlyConfigured
from celeriac.redis_connection import Role, redact

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
Address = tuple[str, int]
# What redis-py reads from the URL that is not a per-connection option.
_NOT_OPTIONS = frozenset({"host", "port", "db", "path", "username", "password", "connection_class"})


@dataclass(frozen=True, repr=False)  # the generated repr would show the password
class ClusterEndpoint:
    """How to reach a Redis Cluster: checked once, connected lazily and again after a fork.

    Attributes:
        nodes: (host, port) of each node the URL names.
        redacted: The URL as given, without its password, for messages and logs.
        client_options: Keyword arguments for every node connection.
        tls: Whether the connections use TLS (``rediss+cluster://``).
    """

    nodes: tuple[Address, ...]
    redacted: str
    client_options: Mapping[str, Any] = field(default_factory=dict)
    tls: bool = False

    def __repr__(self) -> str:
        return f"ClusterEndpoint({self.redacted!r})"

    def connect(self, **overrides: Any) -> RedisCluster:
        """Build a cluster client; it loads the slot map from the nodes at once.

        Args:
            overrides: Options that replace this endpoint's; ``retry`` is the cluster
                client's own policy (redis-py follows MOVED and ASK redirections regardless).

        Raises:
            redis.ConnectionError: No node answered, or the nodes that did leave slots unserved.
            ImproperlyConfigured: A node answered but is not in cluster mode.
        """
        options = {**self.client_options, **overrides}
        if self.tls:
            options["ssl"] = True
        seeds = [ClusterNode(host, port) for host, port in self.nodes]  # type: ignore[no-untyped-call]
        try:
            return RedisCluster(startup_nodes=seeds, **options)
        except RedisClusterException as exc:
            if "not enabled" in str(exc):
                raise ImproperlyConfigured(
                    f"{self.redacted} names a Redis server that is not in cluster mode: "
                    "use a redis:// URL for a single server"
                ) from exc
            raise redis.ConnectionError(f"cannot load the cluster's slot map: {exc}") from exc

    def any_node(
        self, addresses: Callable[[], Sequence[Address]] | None = None, **overrides: Any
    ) -> redis.Redis:
        """Build a plain client whose every (re)connection goes to the next node of the cluster.

        For what any node serves: Redis Cluster forwards a PUBLISH to every node, so a
        subscriber may listen on any of them, and move to another when its node is lost.

        Args:
            addresses: Returns the nodes to take turns on (those a cluster client knows);
                the URL's nodes are used when it is None, fails or returns none.
            overrides: Connection options that replace this endpoint's, such as ``retry``.
        """
        options = {**self.client_options, **overrides}
        turns = _Turns(addresses, self.nodes)
        kind = _AnyNodeSSLConnection if self.tls else _AnyNodeConnection
        pool = redis.ConnectionPool(connection_class=kind, turns=turns, **options)
        return redis.Redis(connection_pool=pool)


def node_addresses(client: RedisCluster) -> list[Address]:
    """Return the (host, port) of every node `client` knows, masters and replicas, sorted."""
    nodes: list[ClusterNode] = client.get_nodes()  # type: ignore[no-untyped-call]  # unannotated upstream
    return sorted((str(node.host), int(node.port)) for node in nodes)


def cluster_endpoint(url: str, options: Mapping[str, Any], role: Role) -> ClusterEndpoint:
    """Check a ``redis+cluster://`` URL and the transport options, and return how to reach the cluster.

    Args:
        url: ``redis+cluster://[[user]:password@]host[:port][,host2[:port]...][/0][?options]``
            or the same with ``rediss+cluster``.
        options: The transport options; the role's client options among them go to every
            node connection.
        role: Who connects.

    Raises:
        ImproperlyConfigured: The URL is not of that form, names a database other than 0,
            or holds an unusable address or option.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES:
        raise ImproperlyConfigured(
            f"{redact(url)!r} is not a Redis Cluster URL ({' or '.join(CLUSTER_SCHEMES)})"
        )
    if parts.path.strip("/") not in ("", "0"):
        raise ImproperlyConfigured(
            f"the {role.noun} URL {redact(url)!r} names database {parts.path.strip('/')!r}, "
            "but Redis Cluster has only database 0"
        )
    hosts = parts.netloc.rpartition("@")[2]
    nodes = tuple(_address(piece, url, role) for piece in hosts.split(",") if piece.strip())
    from_url = _query_options(parts.query, url, role)
    if parts.username:
        from_url["username"] = unquote(parts.username)
    if parts.password:
        from_url["password"] = unquote(parts.password)
    return ClusterEndpoint(
        nodes or (("localhost", DEFAULT_PORT),),
        redact(url),
        {**from_url, **role.pick_client_options(options)},
        tls=scheme == "rediss+cluster",
    )


# parsing ------------------------------------------------------------------------------------


def _address(text: str, url: str, role: Role) -> Address:
    probe = urlsplit("//" + text.strip())
    try:
        port = probe.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"Unusable {role.noun} URL {redact(url)!r}: {exc}") from exc
    if not probe.hostname:
        raise ImproperlyConfigured(
            f"Unusable {role.noun} URL {redact(url)!r}: {text.strip()!r} is not host[:port]"
        )
    return probe.hostname, port or DEFAULT_PORT


def _query_options(query: str, url: str, role: Role) -> dict[str, Any]:
    """The connection options in a URL's query, converted as redis-py converts them."""
    if not query:
        return {}
    try:
        parsed: dict[str, Any] = parse_url(f"redis://localhost/?{query}")  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ImproperlyConfigured(f"Unusable {role.noun} URL {redact(url)!r}: {exc}") from exc
    if parsed.get("db", 0) != 0:
        raise ImproperlyConfigured(f"the {role.noun} URL {redact(url)!r} asks for a database other than 0")
    return {name: value for name, value in parsed.items() if name not in _NOT_OPTIONS}


# connections that take turns over the nodes ----------------------------------------------------


class _Turns:
    """Hands out node addresses in turn, from a random start so that processes spread out."""

    def __init__(
        self, addresses: Callable[[], Sequence[Address]] | None, fallback: tuple[Address, ...]
    ) -> None:
        self._addresses = addresses
        self._fallback = fallback
        self._counter = itertools.count(random.randrange(1 << 16))

    def next(self) -> Address:
        """Return the address to connect to next."""
        known: Sequence[Address] = ()
        if self._addresses is not None:
            try:
                known = self._addresses()
            except Exception:  # no slot map to be had now: the URL's nodes will do
                known = ()
        nodes = known or self._fallback
        return nodes[next(self._counter) % len(nodes)]


class _AnyNodeConnection(redis.Connection):
    """A connection that goes to the next node of the cluster each time it (re)connects."""

    def __init__(self, *, turns: _Turns, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._turns = turns

    def _connect(self) -> socket.socket:
        self.host, self.port = self._turns.next()
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]  # unannotated upstream
        return sock


class _AnyNodeSSLConnection(redis.SSLConnection):
    """The TLS form of `_AnyNodeConnection`."""

    def __init__(self, *, turns: _Turns, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._turns = turns

    def _connect(self) -> socket.socket:
        self.host, self.port = self._turns.next()
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]  # unannotated upstream
        return sock
