"""The Redis result backend on Redis Cluster: Celery's documents, every multi-key step in one hash slot.

The slot rule:

- A task's meta is the one key ``celery-task-meta-<id>``, as Celery names it; a store writes
  it and PUBLISHes the document on the channel of that name in one script. PUBLISH names no
  key, and Redis Cluster forwards the message to every node.
- A chord's counting keys share the slot of the hash tag ``{<group id>}``:
  ``celery-taskset-meta-{<group id>}.s``, ``.t``, ``.j``, ``.d`` and ``.c``, so the chord
  script (the same as on one server) runs in one slot.
- A saved group is ``celery-taskset-meta-<group id>``, as Celery names it: it is only ever
  touched alone.

Waiting threads share one subscription, as on one server; it listens on any node of the
cluster, and moves to the next one when its connection is lost (its waiters then read the
key again, as after any reconnect).

What differs from `RedisBackend` on one server: commands go through redis-py's cluster
client, which routes each by its key (no spare connections of our own), and results kept
with a serializer other than JSON are stored by compare-and-set (a cluster pipeline cannot
carry the PUBLISH that a MULTI around the write would need).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

from celeriac.backends.redis import (
    _ROLE,
    GROUP_KEY_PREFIX,
    LISTENER_CLIENT_NAME,
    RedisBackend,
    _expiring_write,
    group_key,
    task_key,
)
from celeriac.exceptions import BackendError
from celeriac.protocol.serializers import JSON_TYPE
from celeriac.redis_cluster_connection import CLUSTER_SCHEMES, Address, cluster_endpoint, node_addresses
from celeriac.redis_connection import no_retry

# KEYS[1]: the key (also the channel). ARGV[1]: 'any', 'absent' or 'is' (write only if the key
# is absent, or holds exactly ARGV[2]); ARGV[3]: the document; ARGV[4], ARGV[5]: the expiring
# write (SETEX seconds or PSETEX milliseconds), absent for a plain SET. Returns 1 if written.
_WRITE_AND_PUBLISH = """
local stored = redis.call('GET', KEYS[1])
if ARGV[1] == 'absent' then
    if stored then return 0 end
elseif ARGV[1] == 'is' then
    if stored ~= ARGV[2] then return 0 end
end
if #ARGV == 3 then
    redis.call('SET', KEYS[1], ARGV[3])
else
    redis.call(ARGV[4], KEYS[1], ARGV[5], ARGV[3])
end
redis.call('PUBLISH', KEYS[1], ARGV[3])
return 1
"""


class RedisClusterBackend(RedisBackend):
    """Keeps results on Redis Cluster, in Celery's keys and format, and tells waiters at once.

    Args:
        url: ``redis+cluster://[[user]:password@]host[:port][,host2[:port]...][/0]`` or
            ``rediss+cluster://...`` (TLS); see `celeriac.redis_cluster_connection`.
        serializer: Name of the serializer for stored documents (`result_serializer`).
        expires: Seconds a ready result is kept (`result_expires`); None keeps it forever.
        accept: Content types accepted when reading results back (`result_accept_content`).
        options: `result_backend_transport_options`: the connection options of `RedisBackend`.

    Raises:
        ImproperlyConfigured: The URL or an option is unusable.
    """

    schemes: tuple[str, ...] = CLUSTER_SCHEMES

    # connections -----------------------------------------------------------------------

    def _reach(self, url: str, options: Mapping[str, Any]) -> str:
        self._cluster = cluster_endpoint(url, options, _ROLE)
        return self._cluster.redacted

    def _new_client(self, **overrides: Any) -> redis.Redis:
        with self._translated:  # the cluster client reads the slot map as it is made
            cluster = self._cluster.connect(**overrides)
        # The base class sends through its client only keyed commands, scripts and same-slot
        # transactions, which the cluster client routes; the paths that need a single
        # server's connections (stores, loads, saving a group) are overridden below.
        return cast(redis.Redis, cluster)

    def _listener_client(self) -> redis.Redis:
        return self._cluster.any_node(self._known_nodes, retry=no_retry(), client_name=LISTENER_CLIENT_NAME)

    def _known_nodes(self) -> list[Address]:
        """The nodes the cluster client knows of (none before it is made: the URL's then serve)."""
        connection = self._connection
        return [] if connection is None else node_addresses(cast(RedisCluster, connection.client))

    def _chord_key(self, group_id: str) -> str:
        """Return ``celery-taskset-meta-{<group id>}``: every chord key of the group in one slot.

        Raises:
            BackendError: The id is empty or starts with ``}``, which would leave the hash tag empty.
        """
        if not group_id or group_id.startswith("}"):
            raise BackendError(f"the group id {group_id!r} cannot name chord keys on Redis Cluster")
        return GROUP_KEY_PREFIX + "{" + group_id + "}"

    # storage ---------------------------------------------------------------------------

    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        key = task_key(task_id)
        write: list[Any] = list(_expiring_write(expires) or ())
        with self._translated:
            if self.serializer.content_type == JSON_TYPE:
                self._connect().store_script(keys=[key], args=[document, *write])
            else:
                self._store_unless_success(key, document, write)

    def _store_unless_success(self, key: str, document: bytes, write: list[Any]) -> None:
        # Lua cannot read a pickled status: read it here, then write only if the key still
        # holds what was read, and read again if another writer got in between.
        client = self._client()
        script = client.register_script(_WRITE_AND_PUBLISH)
        while True:
            stored = client.get(key)
            if isinstance(stored, bytes) and self._holds_success(stored):
                return
            expected: list[Any] = ["is", stored] if isinstance(stored, bytes) else ["absent", b""]
            if script(keys=[key], args=[*expected, document, *write]):
                return

    def _load(self, task_id: str) -> bytes | None:
        with self._translated:
            document = self._client().get(task_key(task_id))
        return document if isinstance(document, bytes) else None

    # groups ----------------------------------------------------------------------------

    def save_group(self, group_id: str, result: Sequence[Any]) -> None:
        """Save a group's result tuple as Celery does, ``{"result": [[gid, null], [children...]]}``.

        Raises:
            ProtocolError: The tuple cannot be serialised.
            BackendError: Redis cannot be reached.
        """
        key = group_key(group_id)
        document = self.encode({"result": result})
        write: list[Any] = list(_expiring_write(self.expires) or ())
        with self._translated:
            script = self._client().register_script(_WRITE_AND_PUBLISH)
            script(keys=[key], args=["any", b"", document, *write])
