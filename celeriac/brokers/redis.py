"""A broker on Redis that speaks kombu's wire format, with leases instead of visibility timeouts.

Key layout (``Q`` is a queue name; ``\\x06\\x16`` is kombu's separator)::

    Q, Q\\x06\\x163, Q\\x06\\x166, Q\\x06\\x169
        LISTs: kombu's queue Q, one list per priority step (0-2, 3-5, 6-8, 9; on Redis 0 is
        the most urgent). Publishing LPUSHes the packed envelope; consumers take from the
        right, the lists in that order, every queue's first list before any queue's second.
    _kombu.binding.Q
        SET with the member ``Q\\x06\\x16\\x06\\x16Q``: kombu's binding of queue Q to the
        exchange Q, added on first use so Celery clients and ``inspect`` see the queue.
    celeriac.inflight.<consumer id>
        LIST of the exact payloads leased to one consumer (newest left). A fetch moves
        payloads from queue lists into it atomically (Lua, or BLMOVE while waiting).
    celeriac.consumers
        ZSET consumer id -> unix time (Redis server clock) its lease ends. A fetch or a
        heartbeat renews it; any heartbeat returns the in-flight payloads of lapsed consumers.
    celeriac.delayed.Q
        ZSET payload -> eta, one per queue: messages released with an eta. Fetches from Q
        move the due ones to the back of their list. Per queue, so size() and scheduled()
        are one ZCARD / ZCOUNT and a fetch only looks at its own queues.
    celeriac.dead
        LIST of dead-letter records, JSON ``{queue, payload, reason, when}`` (newest left).

Why our own in-flight keys and not kombu's ``unacked`` hash: a Celery worker sharing the
Redis restores every ``unacked`` entry older than its visibility timeout, which would
redeliver our long tasks; our keys are invisible to it, and our leases end when the worker
stops renewing them, not after an hour.

Compatibility with Celery on the same Redis: what celeriac publishes is what Celery
publishes (a Celery worker can consume it), and a celeriac worker consumes what Celery
publishes. Like Celery, `publish` puts a message with an eta straight on its queue (the
eta travels in the envelope's headers; `Outgoing.eta` is not enforced here), and the worker
parks it with ``release(eta=...)``. A message that goes back to its queue (a lapsed
consumer's, or released without an eta) is marked as kombu marks restored messages
(``headers.redelivered`` and ``properties.delivery_info.redelivered``) and carries its
redelivery count in ``headers["x-celeriac-redeliveries"]``; `Delivery.attempts` is that
count plus one. Parking with an eta is not a redelivery and leaves the payload as it is.
Payloads that are not kombu envelopes travel fine but cannot carry a count, and if their
consumer dies they become dead letters (their queue is unknown).

A `Delivery.tag` is ``<consumer id>|<step>|<n>``: the in-flight list and the list the
payload came from, so ack, release and dead_letter work from any process, such as a
forked pool child with a consumer id of its own. Each process has two redis-py clients:
one with redis-py's retries, and one without for fetching, because a fetch replayed after a
lost reply would strand the first attempt's messages in a live consumer's in-flight list.

A fetch whose reply is lost (Redis stalled past `socket_timeout`) may still have moved
messages into the consumer's in-flight list, where the consumer's own live lease would keep
them forever. So each broker object counts the payloads its fetches handed out and that it
has not yet seen settled (a multiset; acks, releases and dead letters through the object
take them off). Before the next fetch, it reads its in-flight list and gives back, unchanged,
every payload it cannot account for: nobody ever received those. It keeps its consumer id,
so its running and prefetched messages stay leased. Payloads settled by another process
(a forked child acking) leave stale counts behind; these are dropped whenever the count
grows large, by the same reading of the list.

Not supported: Redis Cluster (a queue's four lists and our keys cannot share one hash
slot, and the scripts build key names); kombu's ``global_keyprefix``, ``sep`` and
``priority_steps`` options (refused unless they hold kombu's defaults, since they move the
keys) and ``queue_order_strategy`` (ignored: queues rotate round-robin, kombu's default);
named exchanges on publish (messages go to the default exchange, as Celery sends them).
Needs Redis 6.2 or later (LMOVE, BLMOVE with a fractional timeout).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, cast

import orjson
import redis
from redis.client import Pipeline
from redis.commands.core import Script

from celeriac.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    Outgoing,
    clamp_priority,
    make_consumer_id,
)
from celeriac.exceptions import BrokerError, ImproperlyConfigured, OperationalError
from celeriac.redis_connection import Role, Translated, close_client, endpoint, no_retry
from celeriac.redis_connection import sentinel_hosts as sentinel_hosts  # re-exported

logger = logging.getLogger(__name__)

SEP = "\x06\x16"
STEP_SUFFIXES = ("", SEP + "3", SEP + "6", SEP + "9")
_STEP_OF_PRIORITY = (0, 0, 0, 1, 1, 1, 2, 2, 2, 3)
CONSUMERS_KEY = "celeriac.consumers"
INFLIGHT_PREFIX = "celeriac.inflight."
DELAYED_PREFIX = "celeriac.delayed."
DEAD_KEY = "celeriac.dead"
REDELIVERIES_HEADER = "x-celeriac-redeliveries"
_REDELIVERIES_MARK = b'"' + REDELIVERIES_HEADER.encode() + b'"'

WAIT_SLICE = 0.1  # longest BLMOVE; after each one a fetch also looks at the other lists and delayed sets
MOVE_DUE_PER_FETCH = 100  # due delayed messages moved per queue and fetch
LAPSED_PER_HEARTBEAT = 100  # lapsed consumers handled per heartbeat
RECONCILE_FLOOR = 1000  # distinct payloads counted as handed out before the list is read to prune
RECONCILE_CHUNK = 1000  # payloads per reconcile script call
PUSH_CHUNK = 1000  # payloads per LPUSH
DEAD_LETTER_CHUNK = 500
_ROLE = Role(
    noun="Redis broker",
    setting="broker_transport_options",
    client_options=frozenset(
        {
            "socket_timeout",
            "socket_connect_timeout",
            "socket_keepalive",
            "socket_keepalive_options",
            "max_connections",
            "health_check_interval",
            "client_name",
            "username",
            "password",
        }
    ),
    default_client_options={},
    unreachable=OperationalError,
    failed=BrokerError,
)
_Arg = bytes | str | int | float  # a script argument


def queue_lists(queue: str) -> tuple[str, str, str, str]:
    """Return the keys of a queue's four lists, most urgent step first."""
    return (queue, queue + STEP_SUFFIXES[1], queue + STEP_SUFFIXES[2], queue + STEP_SUFFIXES[3])


def binding(queue: str) -> tuple[str, str]:
    """Return kombu's binding SET key for `queue` and the member that binds it."""
    return f"_kombu.binding.{queue}", f"{queue}{SEP}{SEP}{queue}"


def step_of(priority: int) -> int:
    """Return which of a queue's lists (0-3) holds messages of `priority`, as kombu maps it."""
    return _STEP_OF_PRIORITY[clamp_priority(priority)]


_SCRIPT_HELPERS = {  # each script and the helper files put in front of it, in order
    "fetch": ("envelope",),
    "release": ("envelope",),
    "recover": ("envelope", "inflight"),
    "reclaim": ("envelope", "inflight"),
    "reconcile": ("envelope", "inflight"),
    "dead_letter": (),
    "purge": (),
}


@functools.cache
def _script_sources() -> dict[str, str]:
    """The Lua scripts by name, each preceded by the helpers it uses."""
    folder = resources.files("celeriac.brokers") / "lua"
    sources = {}
    for name, helpers in _SCRIPT_HELPERS.items():
        parts = [(folder / f"{part}.lua").read_text(encoding="utf-8") for part in (*helpers, name)]
        sources[name] = "\n".join(parts)
    return sources


@dataclass(frozen=True, slots=True)
class _Scripts:
    fetch: Script
    release: Script
    recover: Script
    reclaim: Script
    reconcile: Script
    dead_letter: Script
    purge: Script

    @classmethod
    def register(cls, client: redis.Redis) -> _Scripts:
        return cls(**{name: client.register_script(source) for name, source in _script_sources().items()})


class RedisBroker(Broker):
    """A broker on Redis, wire-compatible with Celery's kombu transport.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS; redis-py's ``ssl_*``
            query parameters apply), ``redis+socket:///path/to.sock[?virtual_host=db]`` (or ``unix://``), or
            ``sentinel://host:port;sentinel://host2:port`` with the `master_name` option.
        options: `broker_transport_options`: `lease_timeout`; `master_name` and
            `sentinel_kwargs` for Sentinel; `lease_grace` (seconds a lapsed consumer stays
            listed, default 10 leases or at least 60 s); and redis-py connection options
            (`socket_timeout`, `socket_connect_timeout`, `socket_keepalive`,
            `socket_keepalive_options`, `max_connections`, `health_check_interval`,
            `client_name`, `username`, `password`).

    Raises:
        ImproperlyConfigured: The URL or an option is unusable.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+socket", "unix", "sentinel")

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        _refuse_other_layouts(self.options)
        self._endpoint = endpoint(url, self.options, _ROLE)
        self._translated = Translated(_ROLE, self._endpoint.redacted)
        self.lease_grace = float(self.options.get("lease_grace", max(60.0, 10 * self.lease_timeout)))
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._main: tuple[redis.Redis, _Scripts] | None = None
        self._fetcher: redis.Redis | None = None  # no retries: a replayed fetch would strand messages
        self._opened: list[redis.Redis] = []  # every client made
        self._declared: set[str] = set()
        self._held = threading.local()  # this thread's connection for `_send`
        self._fetch_keys: dict[tuple[str, ...], list[str]] = {}
        self._tags = itertools.count(1)
        self._turn = itertools.count()  # rotates which queue a fetch takes from first
        self._wait_turn = itertools.count()  # and which queue's first list BLMOVE waits on
        self._reset_books()

    def _reset_books(self) -> None:
        # Guards what follows. A reconcile needs every fetch of this object out of the way:
        # a fetch's payloads are in the in-flight list before they are counted.
        self._books = threading.Condition(threading.Lock())
        self._fetching = 0
        self._reconciling = False
        self._consumer_changed()

    def _consumer_changed(self) -> None:
        # What this object was handed out under the old id is that id's affair.
        self._handed: collections.Counter[bytes] = collections.Counter()
        self._own_tags = self.consumer_id + "|"
        self._unsure = False  # a fetch failed and no reconcile has succeeded since
        self._recheck_until = 0.0  # and until this time.monotonic(), reconcile now and then
        self._next_recheck = 0.0
        self._prune_at = RECONCILE_FLOOR

    # connections -----------------------------------------------------------------------

    def _link(self) -> tuple[redis.Redis, _Scripts]:
        if self._pid != os.getpid():
            self._forget_parent()
        link = self._main
        if link is None:
            with self._lock:
                link = self._main
                if link is None:
                    client = self._connect(retry=True)
                    link = self._main = (client, _Scripts.register(client))
        return link

    def _client(self) -> redis.Redis:
        return self._link()[0]

    def _script(self) -> _Scripts:
        return self._link()[1]

    def _fetch_client(self) -> redis.Redis:
        self._client()
        client = self._fetcher
        if client is None:
            with self._lock:
                client = self._fetcher
                if client is None:
                    client = self._fetcher = self._connect(retry=False)
        return client

    def _connect(self, *, retry: bool) -> redis.Redis:
        client = self._endpoint.connect() if retry else self._endpoint.connect(retry=no_retry())
        self._opened.append(client)
        return client

    def _forget_parent(self) -> None:
        # In a forked child the parent's sockets belong to the parent: drop them unclosed,
        # and take a consumer id of our own (the parent's leases are the parent's) unless
        # this process was given one already.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._main = self._fetcher = None
        self._opened = []
        self._held = threading.local()
        self._take_own_consumer_id()
        self._reset_books()

    def close(self) -> None:
        """Close this process's connections; the next call opens new ones. Leases stay."""
        if self._pid != os.getpid():
            self._forget_parent()
            return
        with self._lock:
            opened, self._opened = self._opened, []
            self._main = self._fetcher = None
        for client in opened:
            close_client(client)

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process and take a fresh consumer id.

        An id assigned to `consumer_id` after this call is the one this process leases under.
        """
        self._forget_parent()
        self.consumer_id = make_consumer_id()

    # producing -------------------------------------------------------------------------

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """LPUSH `messages` onto their queues' lists in one round trip, as Celery publishes.

        Args:
            messages: What to store. An `eta` is not enforced by the broker: the message is
                visible at once and the worker parks it by the eta in its headers, as Celery does.
        """
        if len(messages) == 1 and messages[0].queue in self._declared:
            message = messages[0]
            self._send("LPUSH", message.queue + STEP_SUFFIXES[step_of(message.priority)], message.payload)
        elif messages:
            self._publish_many(messages)

    def _publish_many(self, messages: Sequence[Outgoing]) -> None:
        lists: dict[str, list[bytes]] = {}
        for message in messages:
            key = message.queue + STEP_SUFFIXES[step_of(message.priority)]
            lists.setdefault(key, []).append(message.payload)
        fresh = {message.queue for message in messages} - self._declared
        pipe = self._client().pipeline(transaction=False)
        _declare_in(pipe, fresh)
        for key, payloads in lists.items():
            for start in range(0, len(payloads), PUSH_CHUNK):
                pipe.lpush(key, *payloads[start : start + PUSH_CHUNK])
        with self._translated:
            pipe.execute()
        self._declared |= fresh

    def _send(self, *args: _Arg) -> Any:
        """Run one command on a pooled connection, without redis-py's per-command machinery.

        redis-py's retries, events and metrics cost about as much as the round trip itself,
        and the calls on the per-task path (one publish, one ack) need none of them: a
        failure is raised as OperationalError for the caller's own retry policy.
        """
        client = self._client()
        held = self._held
        # Each thread keeps one connection out of the pool for these calls: taking it from
        # and returning it to the pool costs as much as the command on the per-task path.
        connection: Any = held.connection if getattr(held, "owner", None) is client else None
        if connection is not None and _stale(connection):
            # The server closed it (a restart) or left a reply unread: the check the pool's
            # get_connection makes, which a held connection skips. Take a fresh one.
            connection.disconnect()
            held.connection = held.owner = None
            client.connection_pool.release(connection)
            connection = None
        with self._translated:
            if connection is None:
                connection = client.connection_pool.get_connection()  # redis-py leaves it untyped
                held.connection, held.owner = connection, client
            try:
                connection.send_command(*args)
                return connection.read_response()
            except BaseException:
                connection.disconnect()  # its state is unknown: never use it again as is
                held.connection = held.owner = None
                client.connection_pool.release(connection)
                raise

    # consuming -------------------------------------------------------------------------

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to `limit` messages: every queue's first list, then every second one, and so on.

        Args:
            queues: Queue names to take from; the first queue rotates between calls for fairness.
            limit: The most messages to return.
            timeout: Seconds to wait for a first message. A publish to a queue's first list
                wakes the wait at once; other lists and due delayed messages are looked at
                every `WAIT_SLICE` (Redis rounds blocking timeouts up to its 100 ms tick).

        Returns:
            The leased messages, possibly none.

        Raises:
            OperationalError: Redis could not be reached. Messages the lost reply may have
                leased go back to their queues, unchanged, before the next fetch.
        """
        if limit <= 0 or not queues:
            return []
        if self._pid != os.getpid():
            self._forget_parent()
        names = tuple(dict.fromkeys(queues))
        self._declare(names)
        self._enter_fetch()
        try:
            deadline = time.monotonic() + max(timeout, 0.0)
            with self._translated:
                found = self._take(names, limit)
                while not found and (remaining := deadline - time.monotonic()) > 0:
                    found = self._wait(names, limit, remaining)
            if found:
                with self._books:  # counted before the fetch ends, so no reconcile misses them
                    self._handed.update(delivery.payload for delivery in found)
            return found
        except BaseException:
            # The server may have leased messages whose reply never arrived.
            self._doubt()
            raise
        finally:
            with self._books:
                self._fetching -= 1

    def _take(self, names: tuple[str, ...], limit: int) -> list[Delivery]:
        start = next(self._turn) % len(names)
        order = names[start:] + names[:start]
        consumer_id = self.consumer_id
        keys = [CONSUMERS_KEY, INFLIGHT_PREFIX + consumer_id, *self._queue_keys(order)]
        args: list[_Arg] = [consumer_id, self.lease_timeout, limit, MOVE_DUE_PER_FETCH]
        reply = self._script().fetch(keys, args, client=self._fetch_client())
        return self._deliveries(consumer_id, order, reply)

    def _wait(self, names: tuple[str, ...], limit: int, remaining: float) -> list[Delivery]:
        # The _take before this registered our lease, so what BLMOVE lands is already leased.
        consumer_id = self.consumer_id
        queue = names[next(self._wait_turn) % len(names)]
        pause = min(max(remaining, 0.01), WAIT_SLICE)
        landed = _command(
            self._fetch_client(), "BLMOVE", queue, INFLIGHT_PREFIX + consumer_id, "RIGHT", "LEFT", pause
        )
        found = [] if landed is None else [self._delivery(f"{consumer_id}|0|", queue, bytes(landed))]
        if len(found) < limit:
            found += self._take(names, limit - len(found))
        return found

    def _queue_keys(self, order: tuple[str, ...]) -> list[str]:
        keys = self._fetch_keys.get(order)
        if keys is None:
            keys = [key for queue in order for key in (DELAYED_PREFIX + queue, *queue_lists(queue))]
            self._fetch_keys[order] = keys
        return keys

    def _deliveries(self, consumer_id: str, order: tuple[str, ...], reply: list[Any]) -> list[Delivery]:
        found: list[Delivery] = []
        at = 0
        while at < len(reply):
            queue, step, count = order[reply[at]], reply[at + 1], reply[at + 2]
            prefix = f"{consumer_id}|{step}|"
            found.extend(self._delivery(prefix, queue, payload) for payload in reply[at + 3 : at + 3 + count])
            at += 3 + count
        return found

    def _delivery(self, prefix: str, queue: str, payload: bytes) -> Delivery:
        # The tag names the in-flight list and the step the payload came from, so any
        # process (a forked child with another consumer id) can ack or release it.
        attempts = _attempts(payload) if _REDELIVERIES_MARK in payload else 1
        return Delivery(f"{prefix}{next(self._tags)}", queue, payload, attempts)

    def _declare(self, names: Sequence[str]) -> None:
        fresh = set(names) - self._declared
        if fresh:
            pipe = self._client().pipeline(transaction=False)
            _declare_in(pipe, fresh)
            with self._translated:
                pipe.execute()
            self._declared |= fresh

    # reconciling the in-flight list ----------------------------------------------------

    def _doubt(self) -> None:
        """Have the next fetch check the in-flight list for messages nobody received.

        Until a check succeeds, every fetch starts with one; then fetches check again a few
        times over one lease, for a lost fetch that a stalled server ran late.
        """
        with self._books:
            self._unsure = True
            self._recheck_until = time.monotonic() + self.lease_timeout

    def _enter_fetch(self) -> None:
        """Count a fetch as running, first reconciling if one is due and no other fetch runs."""
        books = self._books
        while True:
            with books:
                while self._reconciling:
                    books.wait()
                if self._fetching > 0 or not self._reconcile_due():
                    self._fetching += 1
                    return
                self._reconciling = True
            try:
                self._reconcile()
            finally:
                with books:
                    self._reconciling = False
                    books.notify_all()

    def _reconcile_due(self) -> bool:
        if self._unsure or len(self._handed) >= self._prune_at:
            return True
        now = time.monotonic()
        return self._next_recheck <= now < self._recheck_until

    def _reconcile(self) -> None:
        """Give back what the in-flight list holds beyond what this object handed out; prune the count.

        Runs while no fetch of this object does. Acks and releases may run meanwhile: a
        payload they settle is simply not found by the script.
        """
        consumer_id = self.consumer_id
        inflight = INFLIGHT_PREFIX + consumer_id
        client = self._fetch_client()  # no retries: a replayed script could take a held copy
        with self._translated:
            listed = [bytes(payload) for payload in _command(client, "LRANGE", inflight, 0, -1)]
        present = collections.Counter(listed)
        with self._books:
            unseen = present - self._handed
            self._handed &= present  # settled elsewhere (a forked child's ack): forget them
            self._prune_at = max(RECONCILE_FLOOR, 2 * len(self._handed))
        if unseen:
            self._give_back_unseen(inflight, consumer_id, _copies_in_order(listed, unseen))
        with self._books:
            self._unsure = False
            self._next_recheck = time.monotonic() + self.lease_timeout / 4

    def _give_back_unseen(self, inflight: str, consumer_id: str, payloads: list[bytes]) -> None:
        script, client = self._script().reconcile, self._fetch_client()
        returned = dead = 0
        with self._translated:
            for start in range(0, len(payloads), RECONCILE_CHUNK):
                chunk = payloads[start : start + RECONCILE_CHUNK]
                back, aside = script([inflight, DEAD_KEY], [consumer_id, *chunk], client=client)
                returned, dead = returned + int(back), dead + int(aside)
        if returned:
            logger.warning(
                "Returned %d messages to their queues that a fetch with a lost reply had leased", returned
            )
        if dead:
            logger.warning(
                "Dead-lettered %d messages a fetch with a lost reply had leased (not envelopes)", dead
            )

    def _settled(self, deliveries: Sequence[Delivery]) -> None:
        """Take deliveries this object handed out off its count, once acked, released or dead-lettered."""
        own = self._own_tags
        with self._books:
            handed = self._handed
            for delivery in deliveries:
                if delivery.tag.startswith(own):
                    left = handed[delivery.payload] - 1
                    if left > 0:
                        handed[delivery.payload] = left
                    else:
                        handed.pop(delivery.payload, None)

    # settling --------------------------------------------------------------------------

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Forget processed messages, in one round trip.

        Args:
            deliveries: Messages fetched through any broker object on this Redis; ones no
                longer in flight are ignored.
        """
        if not deliveries:
            return
        if len(deliveries) == 1:
            self._send("LREM", _inflight_of(deliveries[0].tag), -1, deliveries[0].payload)
        else:
            pipe = self._client().pipeline(transaction=False)
            for delivery in deliveries:
                # LREM by hand: redis-py types the value as str, and ours are bytes.
                _command(pipe, "LREM", _inflight_of(delivery.tag), -1, delivery.payload)
            with self._translated:
                pipe.execute()
        self._settled(deliveries)

    def release(
        self, deliveries: Sequence[Delivery], *, eta: float | None = None, redelivered: bool = True
    ) -> None:
        """Return leased messages to the list they came from, or park them until `eta`.

        Without an eta they are consumed next (in their original order), marked redelivered
        unless `redelivered` is False; with one they wait unchanged in their queue's delayed set.

        Args:
            deliveries: Messages to give back; ones no longer in flight are left alone.
            eta: Unix time they become visible again; now if None.
            redelivered: False to give them back byte for byte as they were fetched, not
                marked and not counted: for messages that never started.
        """
        if not deliveries:
            return
        script = self._script().release
        client = self._client()
        with self._translated:
            if len(deliveries) == 1:
                script(*_release_call(deliveries[0], eta, redelivered), client=client)
            else:
                pipe = client.pipeline(transaction=False)
                for delivery in reversed(deliveries):  # the last pushed is consumed first
                    script(*_release_call(delivery, eta, redelivered), client=pipe)
                pipe.execute()
        self._settled(deliveries)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a leased message to the dead letters atomically.

        Args:
            delivery: The message to set aside.
            reason: Why, for whoever reads `dead_letters()`.
        """
        record = _dead_record(delivery.queue, delivery.payload, reason, time.time())
        keys = [_inflight_of(delivery.tag), DEAD_KEY]
        with self._translated:
            moved = self._script().dead_letter(keys, [delivery.payload, record], client=self._client())
        self._settled([delivery])
        if not moved:
            logger.warning(
                "Not dead-lettering message %s of %r: it is no longer leased", delivery.tag, delivery.queue
            )

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Return dead letters, oldest first.

        Args:
            queue: Only this queue's; all queues' if None.
            limit: The most to return.

        Returns:
            The dead letters.
        """
        found: list[DeadLetter] = []
        if limit <= 0:
            return found
        with self._translated:
            for raw in self._oldest_dead_first():
                letter = _read_dead_record(raw)
                if letter is not None and (queue is None or letter.queue == queue):
                    found.append(letter)
                    if len(found) >= limit:
                        break
        return found

    def _oldest_dead_first(self) -> Iterator[bytes]:
        # LPUSHed, so the oldest records are at the right end: read backwards in chunks.
        client = self._client()
        end = -1
        while True:
            chunk = cast(list[bytes], client.lrange(DEAD_KEY, end - DEAD_LETTER_CHUNK + 1, end))
            yield from reversed(chunk)
            if len(chunk) < DEAD_LETTER_CHUNK:
                return
            end -= DEAD_LETTER_CHUNK

    def heartbeat(self, also: Sequence[str] = ()) -> int:
        """Renew this consumer's lease and return lapsed consumers' messages to their queues.

        Args:
            also: Other consumer ids whose leases to renew in the same script.

        Returns:
            How many messages went back (marked redelivered, consumed next).
        """
        keys = [CONSUMERS_KEY, DEAD_KEY]
        args: list[_Arg] = [
            self.consumer_id,
            self.lease_timeout,
            self.lease_grace,
            INFLIGHT_PREFIX,
            LAPSED_PER_HEARTBEAT,
            *also,
        ]
        with self._translated:
            returned, dead = self._script().recover(keys, args, client=self._client())
        if returned:
            logger.info("Returned %d messages of lapsed consumers to their queues", returned)
        if dead:
            logger.warning("Dead-lettered %d in-flight messages of lapsed consumers (not envelopes)", dead)
        return int(returned)

    def reclaim(self, consumer_id: str) -> int:
        """Return every message in flight with `consumer_id` to its queue now, and drop its lease.

        Exactly what a heartbeat does once a lease lapses: marked redelivered, consumed next;
        payloads that are not envelopes become dead letters.

        Args:
            consumer_id: The consumer known to be gone; an unknown one holds nothing.

        Returns:
            How many messages went back to their queues.
        """
        keys = [CONSUMERS_KEY, DEAD_KEY, INFLIGHT_PREFIX + consumer_id]
        with self._translated:
            returned, dead = self._script().reclaim(keys, [consumer_id], client=self._client())
        if dead:
            logger.warning("Dead-lettered %d in-flight messages of %s (not envelopes)", dead, consumer_id)
        return int(returned)

    # administration --------------------------------------------------------------------

    def purge(self, queue: str) -> int:
        """Delete every waiting message of `queue`, delayed ones included; leased ones stay.

        Args:
            queue: The queue to empty.

        Returns:
            How many messages were deleted.
        """
        with self._translated:
            keys = [*queue_lists(queue), DELAYED_PREFIX + queue]
            return int(self._script().purge(keys, [], client=self._client()))

    def size(self, queue: str) -> int:
        """Return how many messages wait in `queue`, delayed ones included.

        Args:
            queue: The queue to count.
        """
        with self._translated:
            pipe = self._client().pipeline(transaction=True)
            for key in queue_lists(queue):
                pipe.llen(key)
            pipe.zcard(DELAYED_PREFIX + queue)
            return sum(int(count) for count in pipe.execute())

    def scheduled(self, queue: str) -> int:
        """Return how many messages of `queue` wait for an eta still to come.

        Args:
            queue: The queue to count.
        """
        with self._translated:
            return int(self._client().zcount(DELAYED_PREFIX + queue, f"({time.time()!r}", "+inf"))


# helpers ----------------------------------------------------------------------------------


def _stale(connection: Any) -> bool:
    """Whether a connection kept out of the pool has pending data or a closed socket."""
    try:
        return bool(connection.can_read())
    except (redis.ConnectionError, OSError):
        return True


def _command(client: redis.Redis | Pipeline, *args: _Arg) -> Any:
    """Send a raw command (redis-py's signatures for BLMOVE and LREM are narrower than Redis's)."""
    execute: Any = client.execute_command
    return execute(*args)


def _declare_in(pipe: Pipeline, queues: set[str]) -> None:
    for queue in queues:
        pipe.sadd(*binding(queue))


def _parse_tag(tag: str) -> tuple[str, int] | None:
    consumer_id, _, rest = tag.partition("|")
    step, _, _ = rest.partition("|")
    return (consumer_id, int(step)) if step in ("0", "1", "2", "3") else None


def _inflight_of(tag: str) -> str:
    return INFLIGHT_PREFIX + tag.partition("|")[0]


def _release_call(delivery: Delivery, eta: float | None, redelivered: bool) -> tuple[list[str], list[_Arg]]:
    parsed = _parse_tag(delivery.tag)
    consumer_id, step = parsed if parsed is not None else (delivery.tag, 0)
    inflight = INFLIGHT_PREFIX + consumer_id
    if eta is None:
        mode = "now" if redelivered else "same"
        return [inflight, delivery.queue + STEP_SUFFIXES[step]], [delivery.payload, mode, 0]
    return [inflight, DELAYED_PREFIX + delivery.queue], [delivery.payload, "at", repr(float(eta))]


def _copies_in_order(listed: Sequence[bytes], wanted: collections.Counter[bytes]) -> list[bytes]:
    """The payloads of `wanted`, one entry per copy, in the order they appear in `listed`."""
    left = collections.Counter(wanted)
    found = []
    for payload in listed:
        if left[payload] > 0:
            left[payload] -= 1
            found.append(payload)
    return found


def _attempts(payload: bytes) -> int:
    try:
        headers = orjson.loads(payload).get("headers") or {}
        return 1 + int(headers.get(REDELIVERIES_HEADER) or 0)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1


def _dead_record(queue: str, payload: bytes, reason: str, when: float) -> bytes:
    record: dict[str, Any] = {"queue": queue, "reason": reason, "when": when}
    try:
        record["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload"], record["payload_encoding"] = payload.hex(), "hex"
    return orjson.dumps(record)


def _read_dead_record(raw: bytes) -> DeadLetter | None:
    try:
        record = orjson.loads(raw)
        text = str(record["payload"])
        payload = bytes.fromhex(text) if record.get("payload_encoding") == "hex" else text.encode("utf-8")
        return DeadLetter(str(record["queue"]), payload, str(record["reason"]), float(record["when"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.warning("Skipping an unreadable record in %s: %r", DEAD_KEY, raw[:200])
        return None


def _refuse_other_layouts(options: Mapping[str, Any]) -> None:
    # These kombu options move the keys; ignoring them would leave celeriac and Celery
    # silently blind to each other's messages, so a non-default value is refused.
    layout = {"global_keyprefix": "", "sep": SEP, "priority_steps": [0, 3, 6, 9]}
    for name, default in layout.items():
        if name in options and options[name] != default:
            raise ImproperlyConfigured(
                f"The Redis broker supports only kombu's default {name} ({default!r}), "
                f"not {options[name]!r}: remove it from broker_transport_options"
            )
