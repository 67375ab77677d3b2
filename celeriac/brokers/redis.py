"""A broker on Redis that speaks kombu's wire format, with leases instead of visibility timeouts.

The keys, the tag format and the scripts are described in `redis_layout`.

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

Ack, release and dead_letter work from any process (a forked pool child with a consumer id
of its own): the tag names the in-flight list. Each process has two redis-py clients: one
with redis-py's retries, and one without for fetching, because a fetch replayed after a lost
reply would strand the first attempt's messages in a live consumer's in-flight list. A
fetch whose reply is lost may still have leased messages; the consumer keeps its id, and
its next fetch gives back what it never received (see `redis_ledger`).

Redis Cluster is served by the subclass in `redis_cluster`, with the keys of
`redis_layout.ClusterLayout`; this class reaches its keys through `layout` for that reason.

Not supported: kombu's ``global_keyprefix``, ``sep`` and
``priority_steps`` options (refused unless they hold kombu's defaults, since they move the
keys) and ``queue_order_strategy`` (ignored: queues rotate round-robin, kombu's default);
named exchanges on publish (messages go to the default exchange, as Celery sends them).
Needs Redis 6.2 or later (LMOVE, BLMOVE with a fractional timeout).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, cast

import redis
from redis.client import Pipeline

from celeriac import forks
from celeriac.brokers.base import Broker, DeadLetter, Delivery, Outgoing, make_consumer_id
from celeriac.brokers.redis_layout import (
    CONSUMERS_KEY,
    DEAD_KEY,
    INFLIGHT_PREFIX,
    Arg,
    KeyLayout,
    Scripts,
    attempts,
    binding,
    consumer_of,
    dead_record,
    parse_tag,
    read_dead_record,
    refuse_other_layouts,
    step_of,
    tag_prefix,
)
from celeriac.brokers.redis_ledger import Ledger
from celeriac.exceptions import BrokerError, OperationalError
from celeriac.redis_connection import Role, Translated, close_client, endpoint, no_retry
from celeriac.redis_connection import sentinel_hosts as sentinel_hosts  # re-exported
from celeriac.redis_deferred import DeferredCommands
from celeriac.redis_spare import SpareConnections, lrem_last, packed

logger = logging.getLogger(__name__)

WAIT_SLICE = 0.1  # longest BLMOVE; after each one a fetch also looks at the other lists and delayed sets
MOVE_DUE_PER_FETCH = 100  # due delayed messages moved per queue and fetch
MOST_MOVES = 256  # LMOVEs in one busy fetch
LAPSED_PER_HEARTBEAT = 100  # lapsed consumers handled per heartbeat
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
    layout: ClassVar[KeyLayout] = KeyLayout()
    moves_when_deep: ClassVar[bool] = True  # busy fetches of a lone queue use `_take_moving`

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        refuse_other_layouts(self.options)
        self._translated = Translated(_ROLE, self._reach(url))
        self.lease_grace = float(self.options.get("lease_grace", max(60.0, 10 * self.lease_timeout)))
        self._lock = threading.Lock()
        self._pid = forks.pid()
        self._main: tuple[redis.Redis, Scripts] | None = None
        self._fetcher: redis.Redis | None = None  # no retries: a replayed fetch would strand messages
        self._opened: list[redis.Redis] = []  # every client made
        self._declared: set[str] = set()
        self._spare = SpareConnections()  # out of the pool, for publishes
        self._acks = DeferredCommands()  # single acks, and the busy fetch that confirms them
        self._fetch_keys: dict[tuple[str, ...], list[str]] = {}
        self._tags = itertools.count(1)
        self._turn = itertools.count()  # rotates which queue a fetch takes from first
        self._wait_turn = itertools.count()  # and which queue's first list BLMOVE waits on
        self._deep: str | None = None  # a lone queue whose first list filled the last fetch
        # How often a busy fetch also renews the lease and moves due delayed messages, as a
        # waiting fetch looks at them every WAIT_SLICE; well inside any lease.
        self.renew_every = min(WAIT_SLICE, self.lease_timeout / 4)

    def _consumer_changed(self) -> None:
        # What this object handed out under the old id is that id's affair, and the new id
        # holds no lease until a fetch renews it: the next one does.
        self._ledger = Ledger(self.consumer_id, self.lease_timeout)
        self._renewed_at = -float("inf")  # time.monotonic() of the last fetch that renewed

    # connections -----------------------------------------------------------------------

    def _reach(self, url: str) -> str:
        """Check `url` and the options, keep how to reach the server, and return the URL without passwords."""
        self._endpoint = endpoint(url, self.options, _ROLE)
        return self._endpoint.redacted

    def _link(self) -> tuple[redis.Redis, Scripts]:
        if self._pid != forks.pid():
            self._forget_parent()
        link = self._main
        if link is None:
            with self._lock:
                link = self._main
                if link is None:
                    client = self._connect(retry=True)
                    link = self._main = (client, Scripts.register(client))
        return link

    def _client(self) -> redis.Redis:
        return self._link()[0]

    def _script(self) -> Scripts:
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
        self._pid = forks.pid()
        self._lock = threading.Lock()
        self._main = self._fetcher = None
        self._opened = []
        self._spare = SpareConnections()  # the parent's, never closed here
        self._acks = DeferredCommands()
        self._take_own_consumer_id()
        self._consumer_changed()  # the parent's ledger (and its lock) are the parent's

    def close(self) -> None:
        """Close this process's connections; the next call opens new ones. Leases stay."""
        if self._pid != forks.pid():
            self._forget_parent()
            return
        self._acks.close()  # confirms the last acks first
        self._spare.close()
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
            self._send(
                "LPUSH", self.layout.list_key(message.queue, step_of(message.priority)), message.payload
            )
        elif messages:
            self._publish_many(messages)

    def _publish_many(self, messages: Sequence[Outgoing]) -> None:
        lists: dict[str, list[bytes]] = {}
        for message in messages:
            key = self.layout.list_key(message.queue, step_of(message.priority))
            lists.setdefault(key, []).append(message.payload)
        fresh = {message.queue for message in messages} - self._declared
        pipe = self._client().pipeline(transaction=False)
        self._declare_in(pipe, fresh)
        for key, payloads in lists.items():
            for start in range(0, len(payloads), PUSH_CHUNK):
                pipe.lpush(key, *payloads[start : start + PUSH_CHUNK])
        with self._translated:
            pipe.execute()
        self._declared |= fresh

    def _send(self, *args: Arg) -> Any:
        """Run one command on a spare connection and return its reply.

        redis-py's retries, events and metrics cost about as much as the round trip itself,
        and a publish needs none of them: a failure is raised as OperationalError for the
        caller's own retry policy. The connection is checked first, so a command is never
        written into a socket the server has closed (and then sent twice by a retry).
        """
        with self._translated:
            return self._spare.run(self._client(), *args, check=True)

    def _ack_one(self, delivery: Delivery) -> None:
        """Write one ack, confirmed later (see `DeferredCommands`): a task need not wait for it.

        Once per task, so the open connection takes it first, without the client lookup and
        error translation that opening, confirming or a fork need. It may not have run yet,
        so the ledger counts it off only at the next fetch or reading.
        """
        command = lrem_last(self._inflight_of(delivery), delivery.payload)
        if self._pid != forks.pid() or not self._acks.send_ready(command):
            with self._translated:
                self._acks.send(self._client(), command)
        self._ledger.settle_later(delivery)

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
        if self._pid != forks.pid():
            self._forget_parent()
        if timeout > 0:
            with self._translated:
                self._acks.confirm()  # before a wait, the acks so far have run
        names = tuple(dict.fromkeys(queues))
        self._declare(names)
        ledger = self._ledger
        ledger.enter_fetch(self._reconcile)
        found: list[Delivery] = []
        try:
            deadline = time.monotonic() + max(timeout, 0.0)
            with self._translated:
                found = self._take(names, limit)
                while not found and (remaining := deadline - time.monotonic()) > 0:
                    found = self._wait(names, limit, remaining)
            return found
        except BaseException:
            ledger.fetch_failed()  # the server may have leased messages whose reply never came
            raise
        finally:
            ledger.leave_fetch(found)

    def _take(self, names: tuple[str, ...], limit: int) -> list[Delivery]:
        if self._deep is not None and names == (self._deep,):
            return self._take_moving(self._deep, limit)
        start = next(self._turn) % len(names)
        order = names[start:] + names[:start]
        consumer_id = self.consumer_id
        keys = self._fetch_script_keys(consumer_id, order)
        args: list[Arg] = [consumer_id, self.lease_timeout, limit, MOVE_DUE_PER_FETCH]
        reply = self._run_fetch(keys, args)
        self._renewed_at = time.monotonic()
        # Everything from one queue's first list: most likely it holds more, for `_take_moving`.
        deep = self.moves_when_deep and len(order) == 1 and reply[:3] == [0, 0, limit]
        self._deep = order[0] if deep else None
        return self._deliveries(consumer_id, order, reply)

    def _fetch_script_keys(self, consumer_id: str, order: tuple[str, ...]) -> list[str]:
        first = order[0]  # on one server the leases and the in-flight list serve every queue
        return [
            self.layout.consumers(first),
            self.layout.inflight(consumer_id, first),
            *self._queue_keys(order),
        ]

    def _take_moving(self, queue: str, limit: int) -> list[Delivery]:
        """Lease from a queue whose most urgent list is deep: one LMOVE per message.

        Per message, a native LMOVE costs Redis about a quarter of what the fetch script does,
        whose Lua copies each payload three times. Nothing is more urgent than that list, so
        skipping the others keeps the script's order. Every `renew_every` seconds the script
        also runs first, with a limit of 0, to renew the lease and move due delayed messages;
        all of it goes out behind the acks, as `_run_fetch` does. Each LMOVE is atomic on its
        own: a message is always in the queue or in the in-flight list.
        """
        consumer_id = self.consumer_id
        count = min(limit, MOST_MOVES)
        inflight = self.layout.inflight(consumer_id, queue)
        commands = packed(("LMOVE", self.layout.list_key(queue, 0), inflight, "RIGHT", "LEFT")) * count
        renewing = time.monotonic() - self._renewed_at >= self.renew_every
        script = self._script().fetch
        if renewing:
            keys = self._fetch_script_keys(consumer_id, (queue,))
            args: list[Arg] = [consumer_id, self.lease_timeout, 0, MOVE_DUE_PER_FETCH]
            commands = _evalsha(script.sha, keys, args) + commands
        replies = self._acks.call_many(self._client(), commands, renewing + count)
        renewed = replies[0] if renewing else []  # [] is what the script answers when all is well
        if isinstance(renewed, redis.exceptions.NoScriptError):  # a restart or SCRIPT FLUSH
            self._client().script_load(script.script)
            renewed = None  # the lease lasts; the next fetch runs the whole script and renews it
        elif renewing:
            self._renewed_at = time.monotonic()
        moved = itertools.islice(replies, int(renewing), None)  # payloads, or None once the list is empty
        found = self._delivered(tag_prefix(consumer_id, 0), queue, moved)
        refused = renewed if isinstance(renewed, Exception) else None
        if len(found) < count and refused is None:  # only then can an LMOVE have been refused
            refused = next((reply for reply in replies if isinstance(reply, Exception)), None)
        self._deep = queue if renewed is not None and refused is None and len(found) == count else None
        if refused is not None:
            _refused(refused, queue, leased=bool(found))
        return found

    def _run_fetch(self, keys: list[str], args: list[Arg]) -> Any:
        """Run the fetch script once, never retried (a replayed fetch would lease twice).

        It goes on the ack connection, behind the acks written since the last fetch: one
        system call and one wake-up of Redis send them all, and the reply confirms them.
        """
        script, client = self._script().fetch, self._client()
        call = _evalsha(script.sha, keys, args)
        try:
            return self._acks.call(client, call)
        except redis.exceptions.NoScriptError:  # the server lost its scripts (a restart, SCRIPT FLUSH)
            client.script_load(script.script)
            return self._acks.call(client, call)

    def _wait(self, names: tuple[str, ...], limit: int, remaining: float) -> list[Delivery]:
        # The _take before this registered our lease, so what BLMOVE lands is already leased.
        consumer_id = self.consumer_id
        queue = names[next(self._wait_turn) % len(names)]
        pause = min(max(remaining, 0.01), WAIT_SLICE)
        inflight = self.layout.inflight(consumer_id, queue)
        landed = _command(self._fetch_client(), "BLMOVE", queue, inflight, "RIGHT", "LEFT", pause)
        if landed is not None:
            # Handed over at once: an idle worker's next task should not wait another round
            # trip; the consumer's next fetch takes whatever else has arrived.
            return self._delivered(tag_prefix(consumer_id, 0), queue, [bytes(landed)])
        return self._take(names, limit)

    def _queue_keys(self, order: tuple[str, ...]) -> list[str]:
        keys = self._fetch_keys.get(order)
        if keys is None:
            layout = self.layout
            keys = [key for queue in order for key in (layout.delayed(queue), *layout.lists(queue))]
            self._fetch_keys[order] = keys
        return keys

    def _deliveries(self, consumer_id: str, order: tuple[str, ...], reply: list[Any]) -> list[Delivery]:
        found: list[Delivery] = []
        at = 0
        while at < len(reply):
            queue, step, count = order[reply[at]], reply[at + 1], reply[at + 2]
            prefix = tag_prefix(consumer_id, step)
            found += self._delivered(prefix, queue, reply[at + 3 : at + 3 + count])
            at += 3 + count
        return found

    def _delivered(self, prefix: str, queue: str, replies: Iterable[Any]) -> list[Delivery]:
        """The deliveries of the payloads among `replies` (other replies are skipped), tagged in order.

        The tag names the in-flight list and the step the payload came from, so any process
        (a forked child with another consumer id) can ack or release it.
        """
        tags = self._tags
        return [
            Delivery(f"{prefix}{next(tags)}", queue, payload, attempts(payload))
            for payload in replies
            if type(payload) is bytes
        ]

    def _declare(self, names: Sequence[str]) -> None:
        fresh = set(names) - self._declared
        if fresh:
            pipe = self._client().pipeline(transaction=False)
            self._declare_in(pipe, fresh)
            with self._translated:
                pipe.execute()
            self._declared |= fresh

    def _declare_in(self, pipe: Pipeline, queues: set[str]) -> None:
        """Queue the commands that make `queues` known: kombu's bindings."""
        for queue in queues:
            pipe.sadd(*binding(queue))

    # reconciling the in-flight list ----------------------------------------------------

    def _reconcile(self) -> None:
        """Give back what the in-flight list holds that this object never handed out.

        Runs while no fetch of this object does (the ledger sees to it).
        """
        ledger = self._ledger
        inflight = INFLIGHT_PREFIX + ledger.consumer_id
        client = self._fetch_client()  # no retries: a replayed script could take a held copy
        ledger.count_settled()  # acks written from here on stay counted: they may not have run
        with self._translated:
            self._acks.confirm()  # an ack not yet run would look like a payload never handed out
            listed = [bytes(payload) for payload in _command(client, "LRANGE", inflight, 0, -1)]
        unseen = ledger.take_stock(listed)
        if unseen:
            self._give_back_unseen([inflight, DEAD_KEY], ledger.consumer_id, unseen)
        ledger.reconciled()

    def _give_back_unseen(self, keys: list[str], consumer_id: str, payloads: list[bytes]) -> None:
        """Run the reconcile script on `keys` (in-flight list, dead letters, and any more it takes)."""
        script, client = self._script().reconcile, self._fetch_client()
        returned = dead = 0
        with self._translated:
            for start in range(0, len(payloads), RECONCILE_CHUNK):
                chunk = payloads[start : start + RECONCILE_CHUNK]
                back, aside = script(keys, [consumer_id, *chunk], client=client)
                returned, dead = returned + int(back), dead + int(aside)
        if returned:
            logger.warning(
                "Returned %d messages to their queues that a fetch with a lost reply had leased", returned
            )
        if dead:
            logger.warning(
                "Dead-lettered %d messages a fetch with a lost reply had leased (not envelopes)", dead
            )

    # settling --------------------------------------------------------------------------

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Forget processed messages, in one round trip.

        One ack is written to the process's ack connection and not waited for: the next
        fetch carries it, or a confirmation before the next wait (see `DeferredCommands`), so
        an early-acked task starts without waiting a round trip.

        Args:
            deliveries: Messages fetched through any broker object on this Redis; ones no
                longer in flight are ignored.
        """
        if not deliveries:
            return
        if len(deliveries) == 1:
            self._ack_one(deliveries[0])
            return
        pipe = self._client().pipeline(transaction=False)
        for delivery in deliveries:
            # LREM by hand: redis-py types the value as str, and ours are bytes.
            _command(pipe, "LREM", self._inflight_of(delivery), -1, delivery.payload)
        with self._translated:
            pipe.execute()
        self._ledger.settled(deliveries)

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
            self._acks.confirm()  # this broker's acks and releases run in the order they were made
            if len(deliveries) == 1:
                script(*self._release_call(deliveries[0], eta, redelivered), client=client)
            else:
                pipe = client.pipeline(transaction=False)
                for delivery in reversed(deliveries):  # the last pushed is consumed first
                    script(*self._release_call(delivery, eta, redelivered), client=pipe)
                pipe.execute()
        self._ledger.settled(deliveries)

    def _release_call(
        self, delivery: Delivery, eta: float | None, redelivered: bool
    ) -> tuple[list[str], list[Arg]]:
        """The keys and arguments of the release script for one delivery."""
        parsed = parse_tag(delivery.tag)
        consumer_id, step = parsed if parsed is not None else (delivery.tag, 0)
        inflight = self.layout.inflight(consumer_id, delivery.queue)
        if eta is None:
            mode = "now" if redelivered else "same"
            return [inflight, self.layout.list_key(delivery.queue, step)], [delivery.payload, mode, 0]
        return [inflight, self.layout.delayed(delivery.queue)], [delivery.payload, "at", repr(float(eta))]

    def _inflight_of(self, delivery: Delivery) -> str:
        """The key of the in-flight list `delivery` was leased into."""
        return self.layout.inflight(consumer_of(delivery.tag), delivery.queue)

    def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move a leased message to the dead letters atomically; False if it is no longer leased.

        Args:
            delivery: The message to set aside.
            reason: Why, for whoever reads `dead_letters()`.
        """
        record = dead_record(delivery.queue, delivery.payload, reason, time.time())
        keys = [self._inflight_of(delivery), self.layout.dead(delivery.queue)]
        with self._translated:
            self._acks.confirm()
            moved = self._script().dead_letter(keys, [delivery.payload, record], client=self._client())
        self._ledger.settled([delivery])
        return bool(moved)

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
            for raw in self._oldest_dead_first(DEAD_KEY):
                letter = read_dead_record(raw)
                if letter is not None and (queue is None or letter.queue == queue):
                    found.append(letter)
                    if len(found) >= limit:
                        break
        return found

    def _oldest_dead_first(self, key: str) -> Iterator[bytes]:
        """The records of the dead-letter list `key`, oldest first, read in chunks as needed."""
        # LPUSHed, so the oldest records are at the right end: read backwards in chunks.
        client = self._client()
        end = -1
        while True:
            chunk = cast(list[bytes], client.lrange(key, end - DEAD_LETTER_CHUNK + 1, end))
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
        args: list[Arg] = [
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
            self._acks.confirm()  # this process's acks (of the consumer's last task) run first
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
            keys = [*self.layout.lists(queue), self.layout.delayed(queue)]
            return int(self._script().purge(keys, [], client=self._client()))

    def size(self, queue: str) -> int:
        """Return how many messages wait in `queue`, delayed ones included.

        Args:
            queue: The queue to count.
        """
        with self._translated:
            pipe = self._client().pipeline(transaction=True)
            for key in self.layout.lists(queue):
                pipe.llen(key)
            pipe.zcard(self.layout.delayed(queue))
            return sum(int(count) for count in pipe.execute())

    def scheduled(self, queue: str) -> int:
        """Return how many messages of `queue` wait for an eta still to come.

        Args:
            queue: The queue to count.
        """
        with self._translated:
            return int(self._client().zcount(self.layout.delayed(queue), f"({time.time()!r}", "+inf"))


# helpers ----------------------------------------------------------------------------------


def _command(client: redis.Redis | Pipeline, *args: Arg) -> Any:
    """Send a raw command (redis-py's signatures for BLMOVE and LREM are narrower than Redis's)."""
    execute: Any = client.execute_command
    return execute(*args)


def _evalsha(sha: str, keys: list[str], args: list[Arg]) -> bytes:
    """A script call in RESP, written by hand: redis-py's call machinery costs more than the call."""
    return packed(("EVALSHA", sha, len(keys), *keys, *args))


def _refused(error: Exception, queue: str, *, leased: bool) -> None:
    """Raise what Redis refused in a busy fetch, or only log it if the fetch leased messages.

    Those messages are handed out in any case; the next fetch runs the script, which raises
    if the trouble lasts.
    """
    if not leased:
        raise error
    logger.warning("A busy fetch from %r was partly refused: %s", queue, error)
