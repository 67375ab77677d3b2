"""The Redis broker on Redis Cluster: the same envelopes, scripts and leases, each script in one hash slot.

The slot rule: every key of queue ``Q`` lies in the hash slot of the tag ``{Q}``. The most
urgent list keeps kombu's name ``Q`` (a key without braces hashes by its whole name, which
is the same slot); the others are ``{Q}\\x06\\x163``, ``{Q}\\x06\\x166`` and ``{Q}\\x06\\x169``, and
celeriac's keys are ``celeriac.inflight.{Q}.<consumer id>``, ``celeriac.consumers.{Q}``,
``celeriac.delayed.{Q}`` and ``celeriac.dead.{Q}`` (`redis_layout.ClusterLayout`). Queue
names must be non-empty and hold no ``{`` or ``}``. The SET ``celeriac.queues`` lists every
queue used, and ``_kombu.binding.Q`` is written as on one server; each is touched alone.

What differs from `RedisBroker` on one server:

- A fetch from several queues runs the fetch script once per queue, the queues taking turns
  to come first. Within a queue the most urgent list still comes first, but priority does
  not order messages across queues (on one server every queue's first list is drained
  before any queue's second).
- Leases and in-flight lists are per queue: a heartbeat, and `reclaim`, run their script
  once per queue listed in ``celeriac.queues``.
- A message given back (a lapsed or reclaimed consumer's, or one a lost fetch reply leased)
  returns to the queue it was taken from, whatever its envelope's routing says; payloads
  that are not envelopes therefore go back too, instead of becoming dead letters.
- Commands go through redis-py's cluster client, which routes each by its key: there is no
  held connection per thread, and an ack waits for its reply.

Celery has no Redis Cluster transport, so nothing here needs to match a Celery process on
the same keys; the envelopes are byte for byte what `RedisBroker` publishes.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, cast

import redis
from redis.client import Pipeline

from celeriac.brokers.base import DeadLetter, Delivery
from celeriac.brokers.redis import _ROLE, LAPSED_PER_HEARTBEAT, RedisBroker, _command
from celeriac.brokers.redis_layout import (
    QUEUES_KEY,
    Arg,
    ClusterLayout,
    KeyLayout,
    check_queue,
    read_dead_record,
)
from celeriac.redis_cluster_connection import CLUSTER_SCHEMES, cluster_endpoint
from celeriac.redis_connection import no_retry

logger = logging.getLogger("celeriac.brokers.redis")


class RedisClusterBroker(RedisBroker):
    """A broker on Redis Cluster, with kombu's envelopes and celeriac's leases, every script in one slot.

    Args:
        url: ``redis+cluster://[[user]:password@]host[:port][,host2[:port]...][/0]`` or
            ``rediss+cluster://...`` (TLS); see `celeriac.redis_cluster_connection`.
        options: `broker_transport_options`, as for `RedisBroker` (but Sentinel's).

    Raises:
        ImproperlyConfigured: The URL or an option is unusable.
    """

    schemes: ClassVar[tuple[str, ...]] = CLUSTER_SCHEMES
    layout: ClassVar[KeyLayout] = ClusterLayout()
    moves_when_deep: ClassVar[bool] = False  # every fetch runs the script, routed to its slot

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._taken_from: set[str] = set()  # queues fetched from: a reconcile reads their in-flight lists

    # connections -----------------------------------------------------------------------

    def _reach(self, url: str) -> str:
        self._cluster = cluster_endpoint(url, self.options, _ROLE)
        return self._cluster.redacted

    def _connect(self, *, retry: bool) -> redis.Redis:
        overrides: dict[str, Any] = {} if retry else {"retry": no_retry()}
        with self._translated:  # the cluster client reads the slot map as it is made
            cluster = self._cluster.connect(**overrides)
        # The base class sends through its client only commands the cluster client routes by
        # key (LPUSH, LREM, LRANGE, scripts, same-slot pipelines); what needs a single
        # server's connection pool (`_send` on a held connection) is overridden below.
        client = cast(redis.Redis, cluster)
        self._opened.append(client)
        return client

    def _send(self, *args: Arg) -> Any:
        with self._translated:
            return _command(self._client(), *args)

    def _ack_one(self, delivery: Delivery) -> None:
        self._send("LREM", self._inflight_of(delivery), -1, delivery.payload)
        self._ledger.settled([delivery])

    def _declare_in(self, pipe: Pipeline, queues: set[str]) -> None:
        """Queue kombu's bindings and list the queues in ``celeriac.queues``, for heartbeats to walk."""
        for queue in queues:
            check_queue(queue)
        super()._declare_in(pipe, queues)
        if queues:
            pipe.sadd(QUEUES_KEY, *sorted(queues))

    def _queues(self) -> list[str]:
        """Every queue listed in ``celeriac.queues`` whose keys can share a slot, sorted."""
        members = cast(set[bytes], self._client().smembers(QUEUES_KEY))
        names = (member.decode("utf-8", "replace") for member in members)
        return sorted(name for name in names if name and "{" not in name and "}" not in name)

    # consuming -------------------------------------------------------------------------

    def _take(self, names: tuple[str, ...], limit: int) -> list[Delivery]:
        """Run the fetch script once per queue (each in its own slot) until `limit` are leased."""
        start = next(self._turn) % len(names)
        found: list[Delivery] = []
        for queue in names[start:] + names[:start]:
            self._taken_from.add(queue)
            found += super()._take((queue,), limit - len(found))
            if len(found) >= limit:
                break
        return found

    def _run_fetch(self, keys: list[str], args: list[Arg]) -> Any:
        # The cluster client routes the script to the node that serves the queue's slot.
        return self._script().fetch(keys, args, client=self._fetch_client())

    def _reconcile(self) -> None:
        """Give back what this consumer's in-flight lists hold that this object never handed out."""
        ledger = self._ledger
        layout = self.layout
        client = self._fetch_client()  # no retries: a replayed script could take a held copy
        listed: list[tuple[str, bytes]] = []
        with self._translated:
            for queue in sorted(self._taken_from):
                key = layout.inflight(ledger.consumer_id, queue)
                listed += [(queue, bytes(payload)) for payload in _command(client, "LRANGE", key, 0, -1)]
        unseen = ledger.take_stock([payload for _, payload in listed])
        for queue, payloads in _by_queue(listed, unseen).items():
            inflight = layout.inflight(ledger.consumer_id, queue)
            self._give_back_unseen(
                [inflight, layout.dead(queue), *layout.lists(queue)], ledger.consumer_id, payloads
            )
        ledger.reconciled()

    # settling --------------------------------------------------------------------------

    def release(
        self, deliveries: Sequence[Delivery], *, eta: float | None = None, redelivered: bool = True
    ) -> None:
        """Return leased messages to their lists, or park them until `eta` (see `RedisBroker.release`).

        One script call per message: a cluster pipeline would not load a script a node lacks.
        """
        if not deliveries:
            return
        script, client = self._script().release, self._client()
        with self._translated:
            for delivery in reversed(deliveries):  # the last pushed is consumed first
                script(*self._release_call(delivery, eta, redelivered), client=client)
        self._ledger.settled(deliveries)

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Return dead letters, oldest first: `queue`'s, or every listed queue's merged by time.

        Args:
            queue: Only this queue's; all queues' if None.
            limit: The most to return.
        """
        if limit <= 0:
            return []
        with self._translated:
            queues = [queue] if queue is not None else self._queues()
            merged = heapq.merge(*(self._letters(name) for name in queues), key=lambda letter: letter.when)
            return list(itertools.islice(merged, limit))

    def _letters(self, queue: str) -> Iterator[DeadLetter]:
        for raw in self._oldest_dead_first(self.layout.dead(queue)):
            letter = read_dead_record(raw)
            if letter is not None:
                yield letter

    def heartbeat(self, also: Sequence[str] = ()) -> int:
        """Renew this consumer's leases in every listed queue and return lapsed consumers' messages.

        Args:
            also: Other consumer ids whose leases to renew in the same scripts.

        Returns:
            How many messages went back (marked redelivered, consumed next).
        """
        layout = self.layout
        returned = dead = 0
        with self._translated:
            script, client = self._script().recover, self._client()
            for queue in self._queues():
                keys = [layout.consumers(queue), layout.dead(queue), *layout.lists(queue)]
                args: list[Arg] = [
                    self.consumer_id,
                    self.lease_timeout,
                    self.lease_grace,
                    layout.inflight_prefix(queue),
                    LAPSED_PER_HEARTBEAT,
                    *also,
                ]
                back, aside = script(keys, args, client=client)
                returned, dead = returned + int(back), dead + int(aside)
        if returned:
            logger.info("Returned %d messages of lapsed consumers to their queues", returned)
        if dead:
            logger.warning("Dead-lettered %d in-flight messages of lapsed consumers", dead)
        return returned

    def reclaim(self, consumer_id: str) -> int:
        """Return every message in flight with `consumer_id`, in every listed queue, now; drop its leases.

        Args:
            consumer_id: The consumer known to be gone; an unknown one holds nothing.

        Returns:
            How many messages went back to their queues.
        """
        layout = self.layout
        returned = 0
        with self._translated:
            script, client = self._script().reclaim, self._client()
            for queue in self._queues():
                keys = [
                    layout.consumers(queue),
                    layout.dead(queue),
                    layout.inflight(consumer_id, queue),
                    *layout.lists(queue),
                ]
                back, _ = script(keys, [consumer_id], client=client)
                returned += int(back)
        return returned


def _by_queue(listed: Sequence[tuple[str, bytes]], payloads: Sequence[bytes]) -> dict[str, list[bytes]]:
    """Sort `payloads` (copies taken from `listed`) by the queue each copy was listed under, keeping order."""
    left = collections.Counter(payloads)
    found: dict[str, list[bytes]] = {}
    for queue, payload in listed:
        if left[payload] > 0:
            left[payload] -= 1
            found.setdefault(queue, []).append(payload)
    return found
