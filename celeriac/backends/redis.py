"""A result backend on Redis that reads and writes exactly what Celery's does.

Layout, shared with Celery::

    celery-task-meta-<task id>      STRING  the task meta document; it gets a TTL of
                                            `result_expires` once the task is ready
    celery-taskset-meta-<group id>  STRING  ``{"result": <group result tuple>}``

Every write also PUBLISHes the same document on a channel named like the key: that
is how `wait` learns of a result without polling, and how Celery's clients learn of
ours. A stored SUCCESS is never overwritten; a small Lua script makes that check and
the write one atomic step, so a late RETRY or STARTED cannot clobber a SUCCESS.

Waiting threads of one process share a single pub/sub connection, owned by a
background thread (`_Listener`) that subscribes to a task's channel only while
someone waits for that task.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import Script
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from celeriac import states
from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend, TaskMeta
from celeriac.exceptions import BackendError, ImproperlyConfigured, ProtocolError, TimeoutError
from celeriac.protocol import serializers
from celeriac.protocol.failures import encode_exception
from celeriac.protocol.serializers import JSON_TYPE

logger = logging.getLogger(__name__)

TASK_KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"
LISTENER_CLIENT_NAME = "celeriac-result-listener"

# Transport options handed to redis-py as they are. Others are ignored, as Celery
# ignores the broker-only ones people often share between the two settings.
_CLIENT_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "max_connections",
    }
)
# A bounded socket timeout, as Celery's `redis_socket_timeout` (120 s): a server that
# vanishes without closing the connection must not hang a store for ever.
_DEFAULT_CLIENT_OPTIONS: dict[str, Any] = {"socket_timeout": 120.0, "socket_connect_timeout": 10.0}

# Commands ride out a blip (a failover, a restarted server) with a few quick retries,
# then fail with BackendError rather than stall the caller for long.
_COMMAND_RETRIES = 3
_RETRY_BACKOFF_BASE = 0.05
_RETRY_BACKOFF_CAP = 0.5

# How long the listener blocks for a message before it looks at its subscriptions
# again; a safety net only, since waiters wake it when they need a new subscription.
_LISTENER_IDLE = 1.0
_RECONNECT_DELAY_MAX = 1.0
_LISTENER_JOIN_TIMEOUT = 5.0

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


def _expiring_write(expires: float | None) -> tuple[str, int] | None:
    """Pick Celery's SETEX for whole seconds, PSETEX for a fraction; None means a plain SET."""
    if expires is None:
        return None
    if float(expires).is_integer():
        return ("SETEX", int(expires))
    return ("PSETEX", max(1, round(expires * 1000)))


# where the server is ---------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
    """How to reach the server: parsed (and checked) once, connected lazily and again after a fork."""

    url: str
    redacted: str
    client_options: Mapping[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_options: Mapping[str, Any] | None = None

    def connect(self, **overrides: Any) -> redis.Redis:
        """Build a client; it opens connections on first use."""
        options = {**self.client_options, **overrides}
        if self.master_name is None:
            return redis.Redis.from_url(self.url, **options)
        # redis-py leaves its Sentinel API unannotated.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels), sentinel_kwargs=self.sentinel_options, **options
        )
        client: redis.Redis = sentinel.master_for(self.master_name)  # type: ignore[no-untyped-call]
        return client


def _close_client(client: redis.Redis) -> None:
    client.close()
    pool = client.connection_pool
    # A Sentinel-made client also holds clients of the sentinels themselves.
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()


def _redact(url: str) -> str:
    """Hide the password of each URL (a sentinel:// setting may hold several, joined by ";")."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _client_options(options: Mapping[str, Any]) -> dict[str, Any]:
    if "global_keyprefix" in options:
        # Celery would prefix every key and channel; ignoring it would silently
        # split us from Celery clients, so say so instead.
        raise ImproperlyConfigured("the Redis result backend does not support global_keyprefix yet")
    chosen = {key: value for key, value in options.items() if key in _CLIENT_OPTIONS}
    return {**_DEFAULT_CLIENT_OPTIONS, **chosen}


def _socket_url(url: str) -> str:
    # Celery's redis+socket:///path?virtual_host=N is redis-py's unix:///path?db=N.
    parts = urlsplit(url)
    query = urlencode(
        [("db" if name == "virtual_host" else name, value) for name, value in parse_qsl(parts.query)]
    )
    # Built by hand: urlunsplit drops the "//" of a URL without a host.
    return f"unix://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")


def _plain_endpoint(url: str, options: Mapping[str, Any]) -> _Endpoint:
    scheme = urlsplit(url).scheme.lower()
    target = _socket_url(url) if scheme == "redis+socket" else url
    try:
        parsed: dict[str, Any] = parse_url(target)  # type: ignore[no-untyped-call]  # unannotated upstream
    except ValueError as exc:
        raise ImproperlyConfigured(f"bad Redis result backend URL {_redact(url)!r}: {exc}") from exc
    if scheme == "redis+socket" and not parsed.get("path"):
        raise ImproperlyConfigured(
            f"the result backend URL {_redact(url)!r} names no socket; write redis+socket:///path/to/redis.sock"
        )
    return _Endpoint(target, _redact(url), _client_options(options))


def _sentinel_endpoint(url: str, options: Mapping[str, Any]) -> _Endpoint:
    master_name = options.get("master_name")
    if not master_name:
        raise ImproperlyConfigured(
            "a sentinel:// result backend needs the master's name: "
            "result_backend_transport_options={'master_name': 'mymaster'}"
        )
    sentinels: list[tuple[str, int]] = []
    client_options = _client_options(options)
    for part in filter(None, (piece.strip() for piece in url.split(";"))):
        parsed = urlsplit(part)
        if parsed.scheme.lower() != "sentinel" or not parsed.hostname:
            raise ImproperlyConfigured(
                f"bad sentinel URL {_redact(part)!r}; write sentinel://host:26379;sentinel://host2:26379/0"
            )
        sentinels.append((parsed.hostname, parsed.port or 26379))
        # Credentials and db number, given on any of the URLs, are the master's (as in Celery).
        client_options.update(_master_options(parsed.username, parsed.password, parsed.path))
    sentinel_options = options.get("sentinel_kwargs")
    return _Endpoint(url, _redact(url), client_options, tuple(sentinels), str(master_name), sentinel_options)


def _master_options(username: str | None, password: str | None, path: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if username:
        found["username"] = username
    if password:
        found["password"] = password
    if path.strip("/"):
        try:
            found["db"] = int(path.strip("/"))
        except ValueError as exc:
            raise ImproperlyConfigured(f"the sentinel URL's database must be a number, not {path!r}") from exc
    return found


def _endpoint(url: str, options: Mapping[str, Any] | None) -> _Endpoint:
    options = options or {}
    if urlsplit(url).scheme.lower() == "sentinel":
        return _sentinel_endpoint(url, options)
    return _plain_endpoint(url, options)


# the shared subscription -----------------------------------------------------------


class _Signal(enum.Enum):
    LOOK = "look"  # the channel is (again) subscribed: read the key, something may be there
    CLOSED = "closed"  # the backend was closed while the thread waited


class _Inbox:
    """What the listener hands one waiting thread: published documents and signals, in order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[bytes | _Signal] = queue.SimpleQueue()

    def put(self, item: bytes | _Signal) -> None:
        self._queue.put(item)

    def get(self, deadline: float | None) -> bytes | _Signal:
        """Return the next item, or raise TimeoutError once the monotonic `deadline` has passed."""
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self._queue.get(timeout=remaining)
            except queue.Empty:
                # A lock timeout may end a hair early: give up only once no time is left.
                if remaining == 0.0:
                    raise TimeoutError("The operation timed out.") from None


class _Listener:
    """One pub/sub connection serving every `wait` of one backend in this process.

    redis-py's PubSub is not thread-safe, so only the listener's thread touches it.
    Waiting threads put their inboxes in `_waiting` (under `_lock`) and wake the thread
    by publishing on a private channel it always listens to; the thread then brings
    the server's subscriptions in line with `_waiting`. A channel is *live* once the
    server has confirmed its subscription with no (un)subscribe still in flight: only
    then may a waiter read the key and be sure no later publish escapes it.
    """

    def __init__(self, connect: Callable[[], redis.Redis]) -> None:
        self._client = connect()
        self._wake_channel = f"celeriac-result-listener-wake-{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._waiting: dict[str, list[_Inbox]] = {}
        self._live: set[str] = set()
        self._closed = False
        self._stopping = threading.Event()
        # Touched by the listener's thread only: what it asked the server for, and how
        # many (un)subscribe replies per channel are still to come.
        self._sent: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="celeriac-result-listener", daemon=True)
        self._thread.start()

    # for waiting threads ---------------------------------------------------------------

    @contextlib.contextmanager
    def subscription(self, channel: str) -> Iterator[_Inbox]:
        """Receive what is published on `channel` while the block runs.

        The first item is `_Signal.LOOK` once the subscription is live, and again after
        every reconnect: the caller must then read the key itself.
        """
        inbox = _Inbox()
        with self._lock:
            self._waiting.setdefault(channel, []).append(inbox)
            live, closed = channel in self._live, self._closed
        if closed:
            inbox.put(_Signal.CLOSED)
        elif live:
            inbox.put(_Signal.LOOK)
        else:
            self._wake()
        try:
            yield inbox
        finally:
            self._leave(channel, inbox)

    def _leave(self, channel: str, inbox: _Inbox) -> None:
        # The thread unsubscribes lazily, on its next turn: no need to wake it for that.
        with self._lock:
            inboxes = self._waiting.get(channel, [])
            if inbox in inboxes:
                inboxes.remove(inbox)
            if not inboxes:
                self._waiting.pop(channel, None)

    def _wake(self) -> None:
        # If this fails the thread's connection is down too, and it re-subscribes
        # everything once it reconnects.
        with contextlib.suppress(redis.RedisError):
            self._client.publish(self._wake_channel, b"")

    def close(self) -> None:
        """Stop the thread, close the connections, and release every waiter with CLOSED."""
        with self._lock:
            self._closed = True
        self._stopping.set()
        self._wake()
        self._thread.join(_LISTENER_JOIN_TIMEOUT)
        with self._lock:
            inboxes = [inbox for waiting in self._waiting.values() for inbox in waiting]
        for inbox in inboxes:
            inbox.put(_Signal.CLOSED)
        _close_client(self._client)

    # the listener's thread -----------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as exc:
                failures += 1
                # Once per outage: while the server stays down this repeats every second.
                log = logger.warning if failures == 1 else logger.debug
                log("result listener lost its Redis connection (%s); reconnecting", exc)
                # The first retry is at once (a killed connection is the usual cause),
                # then back off so a dead server is not hammered.
                delay = 0.0 if failures == 1 else min(0.05 * 2 ** (failures - 2), _RECONNECT_DELAY_MAX)
                self._stopping.wait(delay)
            else:
                failures = 0

    def _listen(self) -> None:
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]  # unannotated upstream
        try:
            pubsub.subscribe(self._wake_channel)
            while not self._stopping.is_set():
                self._reconcile(pubsub)
                message = pubsub.get_message(timeout=_LISTENER_IDLE)
                if message is not None:
                    self._handle(message)
        finally:
            self._forget_subscriptions()
            pubsub.close()

    def _forget_subscriptions(self) -> None:
        # The connection is gone and its subscriptions with it: waiters will be told
        # to LOOK again once the next connection has re-subscribed their channels.
        with self._lock:
            self._live.clear()
        self._sent.clear()
        self._in_flight.clear()

    def _reconcile(self, pubsub: redis.client.PubSub) -> None:
        with self._lock:
            add = [channel for channel in self._waiting if channel not in self._sent]
            drop = [channel for channel in self._sent if channel not in self._waiting]
            # Not live from now on, so a waiter arriving before the UNSUBSCRIBE is
            # answered waits for the fresh SUBSCRIBE's answer instead.
            self._live.difference_update(drop)
        if add:
            pubsub.subscribe(*add)
            self._sent.update(add)
            self._in_flight.update(add)
        if drop:
            pubsub.unsubscribe(*drop)  # type: ignore[no-untyped-call]  # unannotated upstream
            self._sent.difference_update(drop)
            self._in_flight.update(drop)

    def _handle(self, message: Mapping[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        if channel == self._wake_channel:
            return
        if kind == "message":
            for inbox in self._inboxes(channel):
                inbox.put(message["data"])
        elif kind in ("subscribe", "unsubscribe"):
            self._answered(channel, subscribed=kind == "subscribe")

    def _answered(self, channel: str, *, subscribed: bool) -> None:
        self._in_flight[channel] -= 1
        if self._in_flight[channel] > 0:
            return
        del self._in_flight[channel]
        if not subscribed:
            return
        with self._lock:
            self._live.add(channel)
        for inbox in self._inboxes(channel):
            inbox.put(_Signal.LOOK)

    def _inboxes(self, channel: str) -> list[_Inbox]:
        with self._lock:
            return list(self._waiting.get(channel, ()))


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

    schemes = ("redis", "rediss", "redis+socket", "sentinel")

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
        self._endpoint = _endpoint(url, options)
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._listener: _Listener | None = None
        self._chord_add_script: Script | None = None

    # connections -----------------------------------------------------------------------

    def _connect(self) -> _Connection:
        with self._lock:
            if self._connection is None:
                backoff = ExponentialBackoff(cap=_RETRY_BACKOFF_CAP, base=_RETRY_BACKOFF_BASE)
                client = self._endpoint.connect(retry=Retry(backoff, _COMMAND_RETRIES))
                self._connection = _Connection(client, client.register_script(_STORE_UNLESS_SUCCESS))
            return self._connection

    def _client(self) -> redis.Redis:
        return self._connect().client

    def _shared_listener(self) -> _Listener:
        with self._lock:
            if self._listener is None:
                # Its own client, without redis-py's silent reconnects: the listener must
                # see every lost connection, to tell its waiters to read the key again.
                endpoint = self._endpoint
                self._listener = _Listener(
                    lambda: endpoint.connect(retry=Retry(NoBackoff(), 0), client_name=LISTENER_CLIENT_NAME)
                )
            return self._listener

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            where = self._endpoint.redacted
            raise BackendError(f"cannot reach the Redis result backend at {where}: {exc}") from exc
        except redis.RedisError as exc:
            raise BackendError(
                f"the Redis result backend at {self._endpoint.redacted} failed: {exc}"
            ) from exc

    def close(self) -> None:
        """Stop the listener thread and close every connection; the next use opens new ones."""
        with self._lock:
            connection, listener = self._connection, self._listener
            self._connection = self._listener = None
            self._chord_add_script = None
        if listener is not None:
            listener.close()
        if connection is not None:
            _close_client(connection.client)

    def reset_after_fork(self) -> None:
        """Drop the parent's connections and listener, unclosed: a child makes its own."""
        # The parent's sockets are still the parent's, its listener thread does not
        # exist here, and another parent thread may have held the lock at the fork.
        self._lock = threading.Lock()
        self._connection = None
        self._listener = None
        self._chord_add_script = None

    # storage ---------------------------------------------------------------------------

    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        key = task_key(task_id)
        with self._translated():
            if self.serializer.content_type == JSON_TYPE:
                args: list[Any] = [document, *(_expiring_write(expires) or ())]
                self._connect().store_script(keys=[key], args=args)
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
        with self._translated():
            document = self._client().get(task_key(task_id))
        return document if isinstance(document, bytes) else None

    def _delete(self, task_id: str) -> None:
        with self._translated():
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
        # Most results asked for are already there: one GET, and no subscription.
        meta = self.get_meta(task_id)
        if meta["status"] in states.READY_STATES:
            return meta
        if timeout is not None and timeout <= 0:
            raise TimeoutError("The operation timed out.")
        with self._shared_listener().subscription(task_key(task_id)) as inbox:
            return self._await_ready(task_id, inbox, deadline)

    def _await_ready(self, task_id: str, inbox: _Inbox, deadline: float | None) -> TaskMeta:
        while True:
            item = inbox.get(deadline)
            if item is _Signal.CLOSED:
                raise BackendError(f"the result backend was closed while waiting for task {task_id}")
            # LOOK comes once the subscription is live (so a GET now misses nothing),
            # and again after a reconnect, for what was published while it was down.
            meta = self.get_meta(task_id) if item is _Signal.LOOK else self.decode(item)
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
        with self._translated(), self._client().pipeline(transaction=True) as pipe:
            _queue_write(pipe, key, document, self.expires)
            pipe.execute()

    def restore_group(self, group_id: str) -> Any:
        """Return the result tuple saved for `group_id`, or None if there is none (or it expired).

        Raises:
            BackendError: Redis cannot be reached.
        """
        with self._translated():
            document = self._client().get(group_key(group_id))
        if not isinstance(document, bytes):
            return None
        return self.decode(document).get("result")

    def delete_group(self, group_id: str) -> None:
        """Remove the result tuple saved for `group_id`.

        Raises:
            BackendError: Redis cannot be reached.
        """
        with self._translated():
            self._client().delete(group_key(group_id))

    # chords ----------------------------------------------------------------------------
    # Celery's native Redis chord keys, so Celery and celeriac workers may finish one chord:
    # <group key>.s (size), .t (size adjustments), .j (ZSET of [1, task_id, state, result]
    # scored by group index), .d (SET of "task_id:index" seen), .c (claim: who sends the body).

    def _chord_set_size(self, group_id: str, size: int) -> None:
        key = group_key(group_id)
        with self._translated(), self._client().pipeline(transaction=True) as pipe:
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
        key = group_key(group_id)
        keys = [f"{key}.j", f"{key}.d", f"{key}.s", f"{key}.t", f"{key}.c"]
        with self._translated():
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
