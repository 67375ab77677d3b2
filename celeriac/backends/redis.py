"""A result backend on Redis that reads and writes exactly what Celery's does.

Layout, shared with Celery::

    celery-task-meta-<task id>      STRING  the task meta document; it gets a TTL of
                                            `result_expires` once the task is ready
    celery-taskset-meta-<group id>  STRING  ``{"result": <group result tuple>}``

Every write also PUBLISHes the same document on a channel named like the key: that
is how `wait` learns of a result without polling, and how Celery's clients learn of
ours. A stored SUCCESS is never overwritten; a small Lua script makes that check and
the write one atomic step, so a late RETRY or STARTED cannot clobber a SUCCESS.

Waiting threads of one process share a single pub/sub connection (`redis_listener.Listener`),
read by whichever of them finds it unattended, subscribed to a task's channel only while
someone waits for that task.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from celeriac import states
from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend, TaskMeta
from celeriac.backends.redis_listener import Inbox, Listener, Signal
from celeriac.exceptions import BackendError, ImproperlyConfigured, ProtocolError, TimeoutError
from celeriac.protocol import serializers
from celeriac.protocol.failures import encode_exception
from celeriac.protocol.serializers import JSON_TYPE
from celeriac.redis_connection import Role, Translated, close_client, endpoint, no_retry
from celeriac.redis_spare import SpareConnections

TASK_KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"
LISTENER_CLIENT_NAME = "celeriac-result-listener"

# Transport options handed to redis-py as they are. Others are ignored, as Celery
# ignores the broker-only ones people often share between the two settings. The
# default socket timeout is bounded, as Celery's `redis_socket_timeout` (120 s): a server
# that vanishes without closing the connection must not hang a store for ever.
_ROLE = Role(
    noun="Redis result backend",
    setting="result_backend_transport_options",
    client_options=frozenset(
        {
            "socket_timeout",
            "socket_connect_timeout",
            "socket_keepalive",
            "health_check_interval",
            "max_connections",
        }
    ),
    default_client_options={"socket_timeout": 120.0, "socket_connect_timeout": 10.0},
    unreachable=BackendError,
    failed=BackendError,
)

# Commands ride out a blip (a failover, a restarted server) with a few quick retries,
# then fail with BackendError rather than stall the caller for long.
_COMMAND_RETRIES = 3
_RETRY_BACKOFF_BASE = 0.05
_RETRY_BACKOFF_CAP = 0.5

# KEYS[1]: the meta key (also the channel). ARGV[1]: the document; ARGV[2], ARGV[3]:
# the expiring write (SETEX seconds or PSETEX milliseconds), absent for a plain SET.
# The status is read from the start of the stored JSON (celeriac and Celery both put
# it first, with or without a space after the colon); cjson is the slow fallback for
# a document laid out some other way.
# Adds one chord header outcome; returns every entry to the one caller that completes the set.
# KEYS: .j .d .s .t .c   ARGV: entry, index, dedup member, ttl seconds, claim token
_CHORD_ADD = """
if redis.call('SADD', KEYS[2], ARGV[3]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
for i = 1, 4 do
    redis.call('EXPIRE', KEYS[i], ARGV[4])
end
local size = tonumber(redis.call('GET', KEYS[3]) or '0')
if size == 0 then
    return nil
end
local total = size + tonumber(redis.call('GET', KEYS[4]) or '0')
if redis.call('ZCARD', KEYS[1]) < total then
    return nil
end
if not redis.call('SET', KEYS[5], ARGV[5], 'NX', 'EX', 300) then
    return nil
end
local entries = redis.call('ZRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('SET', KEYS[5], 'done', 'EX', 300)
return entries
"""

_STORE_UNLESS_SUCCESS = """
local stored = redis.call('GET', KEYS[1])
if stored then
    local status = string.match(stored, '^{%s*"status"%s*:%s*"(%a+)"')
    if status == nil then
        local ok, meta = pcall(cjson.decode, stored)
        if ok and type(meta) == 'table' then status = meta['status'] end
    end
    if status == 'SUCCESS' then return 0 end
end
if #ARGV == 1 then
    redis.call('SET', KEYS[1], ARGV[1])
else
    redis.call(ARGV[2], KEYS[1], ARGV[3], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


def task_key(task_id: str) -> str:
    """Return the key (and pub/sub channel) holding `task_id`'s meta, as Celery names it."""
    return TASK_KEY_PREFIX + task_id


def group_key(group_id: str) -> str:
    """Return the key holding group `group_id`'s saved result tuple, as Celery names it."""
    return GROUP_KEY_PREFIX + group_id


# What sends a spare connection's command back to the client's ordinary path (which loads a
# missing script, and retries a lost connection).
_FALL_BACK = (redis.ConnectionError, redis.TimeoutError, NoScriptError)


def _expiring_write(expires: float | None) -> tuple[str, int] | None:
    """Pick Celery's SETEX for whole seconds, PSETEX for a fraction; None means a plain SET."""
    if expires is None:
        return None
    if float(expires).is_integer():
        return ("SETEX", int(expires))
    return ("PSETEX", max(1, round(expires * 1000)))


# the backend -----------------------------------------------------------------------


class _Connection(NamedTuple):
    client: redis.Redis
    store_script: Script


class RedisBackend(ResultBackend):
    """Keeps results in Redis, in Celery's keys and format, and tells waiters at once.

    Args:
        url: ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS),
            ``redis+socket:///path/to/redis.sock[?virtual_host=db]``, or
            ``sentinel://host:26379[;sentinel://host2:26379...][/db]`` with
            ``master_name`` in `options`.
        serializer: Name of the serializer for stored documents (`result_serializer`).
        expires: Seconds a ready result is kept (`result_expires`); None keeps it forever.
        accept: Content types accepted when reading results back (`result_accept_content`).
        options: `result_backend_transport_options`: ``master_name`` and ``sentinel_kwargs``
            for Sentinel; ``socket_timeout``, ``socket_connect_timeout``, ``socket_keepalive``,
            ``health_check_interval`` and ``max_connections`` for the connections.
            Other keys are ignored.

    Raises:
        ImproperlyConfigured: The URL or an option is unusable.
    """

    schemes: tuple[str, ...] = ("redis", "rediss", "redis+socket", "sentinel")

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        expires: float | None = DEFAULT_EXPIRES,
        accept: frozenset[str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(url, serializer=serializer, expires=expires, accept=accept)
        options = options or {}
        if "global_keyprefix" in options:
            # Celery would prefix every key and channel; ignoring it would silently
            # split us from Celery clients, so say so instead.
            raise ImproperlyConfigured("the Redis result backend does not support global_keyprefix yet")
        self._translated = Translated(_ROLE, self._reach(url, options))
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._spare = SpareConnections()
        self._listener: Listener | None = None
        self._chord_add_script: Script | None = None

    # connections -----------------------------------------------------------------------
    # `_reach`, `_new_client`, `_listener_client` and `_chord_key` are where the Redis Cluster
    # backend (redis_cluster.py) differs.

    def _reach(self, url: str, options: Mapping[str, Any]) -> str:
        """Check `url` and the options, keep how to reach the server, and return the URL without passwords."""
        self._endpoint = endpoint(url, options, _ROLE)
        return self._endpoint.redacted

    def _new_client(self, **overrides: Any) -> redis.Redis:
        """Build a client of the server with `overrides` over the URL's options."""
        return self._endpoint.connect(**overrides)

    def _listener_client(self) -> redis.Redis:
        """Build the listener's own client, without redis-py's silent reconnects.

        The listener must see every lost connection, to tell its waiters to read the key again.
        """
        return self._endpoint.connect(retry=no_retry(), client_name=LISTENER_CLIENT_NAME)

    def _connect(self) -> _Connection:
        connection = self._connection
        if connection is not None:
            return connection
        with self._lock:
            if self._connection is None:
                backoff = ExponentialBackoff(cap=_RETRY_BACKOFF_CAP, base=_RETRY_BACKOFF_BASE)
                client = self._new_client(retry=Retry(backoff, _COMMAND_RETRIES))
                self._connection = _Connection(client, client.register_script(_STORE_UNLESS_SUCCESS))
            return self._connection

    def _client(self) -> redis.Redis:
        return self._connect().client

    def _shared_listener(self) -> Listener:
        with self._lock:
            if self._listener is None:
                self._listener = Listener(self._listener_client)
            return self._listener

    def close(self) -> None:
        """Close every connection and release the waiters; the next use opens new ones."""
        with self._lock:
            connection, listener = self._connection, self._listener
            self._connection = self._listener = None
            self._chord_add_script = None
        if listener is not None:
            listener.close()
        if connection is not None:
            close_client(connection.client)

    def reset_after_fork(self) -> None:
        """Drop the parent's connections and listener, unclosed: a child makes its own."""
        # The parent's sockets are still the parent's, its listener thread does not
        # exist here, and another parent thread may have held the lock at the fork.
        self._lock = threading.Lock()
        self._connection = None
        self._spare = SpareConnections()
        self._listener = None
        self._chord_add_script = None

    # storage ---------------------------------------------------------------------------

    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        key = task_key(task_id)
        with self._translated:
            if self.serializer.content_type == JSON_TYPE:
                args: list[Any] = [document, *(_expiring_write(expires) or ())]
                connection = self._connect()
                script = connection.store_script
                try:
                    self._spare.run(connection.client, "EVALSHA", script.sha, 1, key, *args)
                except _FALL_BACK:
                    script(keys=[key], args=args)
            else:
                self._store_watched(key, document, expires)

    def _store_watched(self, key: str, document: bytes, expires: float | None) -> None:
        # Lua cannot read a pickled status, so check it here, under WATCH: the
        # MULTI/EXEC fails (and is retried) if another writer got in between.
        def attempt(pipe: redis.client.Pipeline) -> None:
            stored = pipe.get(key)
            if isinstance(stored, bytes) and self._holds_success(stored):
                return
            pipe.multi()
            _queue_write(pipe, key, document, expires)

        self._client().transaction(attempt, key)

    def _holds_success(self, stored: bytes) -> bool:
        try:
            return self.decode(stored).get("status") == states.SUCCESS
        except ProtocolError:
            return False  # unreadable to us, so not a SUCCESS we could honour

    def _load(self, task_id: str) -> bytes | None:
        key = task_key(task_id)
        with self._translated:
            client = self._client()
            try:
                document = self._spare.run(client, "GET", key)
            except _FALL_BACK:
                document = client.get(key)
        return document if isinstance(document, bytes) else None

    def _delete(self, task_id: str) -> None:
        with self._translated:
            self._client().delete(task_key(task_id))

    def cleanup(self) -> int:
        """Do nothing: Redis expires result keys by itself.

        Returns:
            0, always.
        """
        return 0

    # waiting ---------------------------------------------------------------------------

    def wait(self, task_id: str, timeout: float | None, interval: float) -> TaskMeta:
        """Return the meta of `task_id` once it is ready, told by Redis pub/sub rather than polling.

        Args:
            task_id: The task to wait for.
            timeout: Seconds to wait at most; None waits forever.
            interval: Unused: the store's PUBLISH wakes the waiter, so nothing is polled.

        Returns:
            The task's meta, whose status is one of `states.READY_STATES`.

        Raises:
            TimeoutError: `timeout` seconds passed first.
            BackendError: Redis cannot be reached, or the backend was closed meanwhile.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # The subscription is asked for first and the key read while the server answers, so
        # a ready result costs one GET, and one that is not yet ready one GET more once the
        # subscription is live (a GET before that could miss a store in between).
        with self._shared_listener().subscription(task_key(task_id)) as inbox:
            meta = self.get_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if timeout is not None and timeout <= 0:
                raise TimeoutError("The operation timed out.")
            return self._await_ready(task_id, inbox, deadline)

    def _await_ready(self, task_id: str, inbox: Inbox, deadline: float | None) -> TaskMeta:
        while True:
            item = inbox.get(deadline)
            if item is Signal.CLOSED:
                raise BackendError(f"the result backend was closed while waiting for task {task_id}")
            # LOOK comes once the subscription is live (so a GET now misses nothing),
            # and again after a reconnect, for what was published while it was down.
            meta = self.decode(item) if isinstance(item, bytes) else self.get_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta

    # groups ----------------------------------------------------------------------------

    def save_group(self, group_id: str, result: Sequence[Any]) -> None:
        """Save a group's result tuple as Celery does: ``{"result": [[gid, null], [children...]]}``.

        Args:
            group_id: The group's id.
            result: The group's result tuple, ``[[group_id, parent_id], [child tuples...]]``.

        Raises:
            ProtocolError: The tuple cannot be serialised.
            BackendError: Redis cannot be reached.
        """
        key = group_key(group_id)
        document = self.encode({"result": result})
        with self._translated, self._client().pipeline(transaction=True) as pipe:
            _queue_write(pipe, key, document, self.expires)
            pipe.execute()

    def restore_group(self, group_id: str) -> Any:
        """Return the result tuple saved for `group_id`, or None if there is none (or it expired).

        Raises:
            BackendError: Redis cannot be reached.
        """
        with self._translated:
            document = self._client().get(group_key(group_id))
        if not isinstance(document, bytes):
            return None
        return self.decode(document).get("result")

    def delete_group(self, group_id: str) -> None:
        """Remove the result tuple saved for `group_id`.

        Raises:
            BackendError: Redis cannot be reached.
        """
        with self._translated:
            self._client().delete(group_key(group_id))

    # chords ----------------------------------------------------------------------------
    # Celery's native Redis chord keys, so Celery and celeriac workers may finish one chord:
    # <group key>.s (size), .t (size adjustments), .j (ZSET of [1, task_id, state, result]
    # scored by group index), .d (SET of "task_id:index" seen), .c (claim: who sends the body).

    def _chord_key(self, group_id: str) -> str:
        """Return the stem of group `group_id`'s chord keys (``.s``, ``.j`` and the others follow it)."""
        return group_key(group_id)

    def _chord_set_size(self, group_id: str, size: int) -> None:
        key = self._chord_key(group_id)
        with self._translated, self._client().pipeline(transaction=True) as pipe:
            pipe.delete(f"{key}.c")
            pipe.set(f"{key}.s", size, ex=_chord_ttl(self.expires))
            pipe.execute()

    def chord_part_done(
        self, group_id: str, index: int, task_id: str, state: str, result: Any
    ) -> list[TaskMeta] | None:
        """Record one header task's outcome; return all parts (by index) to the completing caller."""
        if isinstance(result, BaseException):
            result = encode_exception(result)
        entry = serializers.json_dumps([1, task_id, state, result])
        key = self._chord_key(group_id)
        keys = [f"{key}.j", f"{key}.d", f"{key}.s", f"{key}.t", f"{key}.c"]
        with self._translated:
            script = self._chord_script()
            entries = script(
                keys=keys,
                args=[entry, index, f"{task_id}:{index}", _chord_ttl(self.expires), uuid.uuid4().hex],
            )
        if entries is None:
            return None
        parts = [serializers.json_loads(raw) for raw in entries]
        return [{"status": part[2], "result": part[3], "task_id": part[1]} for part in parts]

    def _chord_script(self) -> Script:
        client = self._client()  # takes self._lock itself
        with self._lock:
            if self._chord_add_script is None:
                self._chord_add_script = client.register_script(_CHORD_ADD)
            script: Script = self._chord_add_script
            return script


def _queue_write(pipe: redis.client.Pipeline, key: str, document: bytes, expires: float | None) -> None:
    """Queue Celery's write: SET, SETEX or PSETEX, then PUBLISH the same bytes on the key's channel."""
    write = _expiring_write(expires)
    if write is None:
        pipe.set(key, document)
    else:
        # By name: redis-py deprecates its setex()/psetex() helpers, not the commands.
        pipe.execute_command(write[0], key, write[1], document)  # type: ignore[no-untyped-call]
    pipe.publish(key, document)


def _chord_ttl(expires: float | None) -> int:
    return max(1, int(expires)) if expires else 86400
