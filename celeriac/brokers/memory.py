"""A broker that lives inside one process: for tests, eager setups and single-process workers.

Brokers built with the same URL share one store while any of them is alive, so a
producer and a consumer in one process can be separate objects (`memory://` and
`memory://name` are different stores). Nothing survives the process.

Leases: a consumer in this process cannot die without the process, so leases never
time out on their own. `mark_dead()` declares a consumer gone (a test's stand-in for a
killed worker); the next `heartbeat()` of any broker on the store returns its messages,
unless that heartbeat renews it (`also`). `reclaim()` returns a consumer's messages at once.
"""

from __future__ import annotations

import heapq
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from celeriac.brokers.base import Broker, DeadLetter, Delivery, Outgoing, clamp_priority


@dataclass(slots=True)
class _Message:
    id: int
    queue: str
    priority: int
    payload: bytes
    visible_at: float
    attempts: int = 0
    owner: str | None = None


@dataclass(slots=True)
class _Queue:
    ready: list[tuple[int, int]] = field(default_factory=list)  # heap of (-priority, id)
    delayed: list[tuple[float, int]] = field(default_factory=list)  # heap of (visible_at, id)

    def promote(self, now: float, messages: Mapping[int, _Message]) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _, message_id = heapq.heappop(self.delayed)
            heapq.heappush(self.ready, (-messages[message_id].priority, message_id))


class _Store:
    """Every queue, lease and dead letter of one memory URL, guarded by one condition."""

    def __init__(self) -> None:
        self.changed = threading.Condition(threading.Lock())
        self.messages: dict[int, _Message] = {}
        self.queues: dict[str, _Queue] = {}
        self.dead_letters: list[DeadLetter] = []
        self.dead_consumers: set[str] = set()
        self.last_id = 0

    def add(self, queue: str, payload: bytes, priority: int, visible_at: float) -> None:
        self.last_id += 1
        message = _Message(self.last_id, queue, priority, payload, visible_at)
        self.messages[message.id] = message
        self.enqueue(message)

    def enqueue(self, message: _Message) -> None:
        message.owner = None
        queue = self.queues.setdefault(message.queue, _Queue())
        heapq.heappush(queue.delayed, (message.visible_at, message.id))

    def take(self, queues: Sequence[str], limit: int, owner: str) -> list[_Message]:
        now = time.time()
        candidates = [self.queues[name] for name in dict.fromkeys(queues) if name in self.queues]
        for queue in candidates:
            queue.promote(now, self.messages)
        taken: list[_Message] = []
        while len(taken) < limit:
            waiting = [queue for queue in candidates if queue.ready]
            if not waiting:
                break
            best = min(waiting, key=lambda queue: queue.ready[0])
            message = self.messages[heapq.heappop(best.ready)[1]]
            message.owner = owner
            message.attempts += 1
            taken.append(message)
        return taken

    def next_due(self, queues: Sequence[str]) -> float | None:
        delayed = (self.queues[name].delayed for name in queues if name in self.queues)
        return min((heap[0][0] for heap in delayed if heap), default=None)

    def leased(self, tag: str) -> _Message | None:
        message = self.messages.get(int(tag))
        return message if message is not None and message.owner is not None else None

    def return_leased(self, owners: set[str]) -> int:
        """Put every message leased to one of `owners` back in its queue; return how many."""
        orphans = [m for m in self.messages.values() if m.owner in owners]
        for message in orphans:
            self.enqueue(message)
        if orphans:
            self.changed.notify_all()
        return len(orphans)


# Stores live while a broker uses them, so tests that pick fresh names leave nothing behind.
_STORES: weakref.WeakValueDictionary[str, _Store] = weakref.WeakValueDictionary()
_STORES_LOCK = threading.Lock()


def _store_for(url: str) -> _Store:
    parts = urlsplit(url)
    name = parts.netloc + parts.path
    with _STORES_LOCK:
        store = _STORES.get(name)
        if store is None:
            store = _Store()
            _STORES[name] = store
        return store


class MemoryBroker(Broker):
    """An in-process broker with the same semantics as the durable ones.

    Args:
        url: ``memory://`` or ``memory://name``; brokers with the same URL share messages.
        options: `broker_transport_options`; only `polling_interval` and `lease_timeout`
            are read, and neither changes behaviour here.
    """

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, url: str = "memory://", options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._store = _store_for(url)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Store `messages` in their queues and wake waiting fetches.

        Args:
            messages: What to store; a message with an `eta` stays hidden until then.
        """
        now = time.time()
        with self._store.changed:
            for message in messages:
                visible_at = now if message.eta is None else message.eta
                self._store.add(message.queue, message.payload, clamp_priority(message.priority), visible_at)
            self._store.changed.notify_all()

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to `limit` ready messages, most urgent then oldest first.

        Args:
            queues: Queue names to take from.
            limit: The most messages to return.
            timeout: Seconds to wait for a first message; a publish or a due eta wakes the wait.

        Returns:
            The leased messages, possibly none.
        """
        if limit <= 0 or not queues:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        store = self._store
        with store.changed:
            store.dead_consumers.discard(self.consumer_id)
            while True:
                taken = store.take(queues, limit, self.consumer_id)
                remaining = deadline - time.monotonic()
                if taken or remaining <= 0:
                    return [Delivery(str(m.id), m.queue, m.payload, m.attempts) for m in taken]
                due = store.next_due(queues)
                store.changed.wait(remaining if due is None else max(0.0, min(remaining, due - time.time())))

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Forget processed messages.

        Args:
            deliveries: Messages this store handed out; unknown or already acked ones are ignored.
        """
        with self._store.changed:
            for delivery in deliveries:
                if self._store.leased(delivery.tag) is not None:
                    del self._store.messages[int(delivery.tag)]

    def release(
        self, deliveries: Sequence[Delivery], *, eta: float | None = None, redelivered: bool = True
    ) -> None:
        """Return leased messages to their queues.

        Args:
            deliveries: Messages to give back; ones no longer leased are left alone.
            eta: Unix time they become visible again; now if None.
            redelivered: False to give them back as they were fetched: this fetch does not
                count as an attempt.
        """
        visible_at = time.time() if eta is None else eta
        with self._store.changed:
            for delivery in deliveries:
                message = self._store.leased(delivery.tag)
                if message is not None:
                    message.visible_at = visible_at
                    if not redelivered:
                        message.attempts = max(0, message.attempts - 1)
                    self._store.enqueue(message)
            self._store.changed.notify_all()

    def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move a leased message to the dead letters; False if it is no longer leased.

        Args:
            delivery: The message to set aside.
            reason: Why, for whoever reads `dead_letters()`.
        """
        with self._store.changed:
            message = self._store.leased(delivery.tag)
            if message is None:
                return False
            del self._store.messages[message.id]
            self._store.dead_letters.append(DeadLetter(message.queue, message.payload, reason, time.time()))
        return True

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Return dead letters, oldest first.

        Args:
            queue: Only this queue's; all queues' if None.
            limit: The most to return.

        Returns:
            The dead letters.
        """
        with self._store.changed:
            found = [letter for letter in self._store.dead_letters if queue is None or letter.queue == queue]
        return found[: max(limit, 0)]

    def heartbeat(self, also: Sequence[str] = ()) -> int:
        """Return the messages of consumers marked dead to their queues.

        Live consumers in this process need no renewal: their leases never lapse.

        Args:
            also: Consumer ids renewed with this one: no longer marked dead, they keep their messages.

        Returns:
            How many messages went back.
        """
        store = self._store
        with store.changed:
            store.dead_consumers.difference_update(also)
            if not store.dead_consumers:
                return 0
            returned = store.return_leased(store.dead_consumers)
            store.dead_consumers.clear()
        return returned

    def reclaim(self, consumer_id: str) -> int:
        """Return every message leased to `consumer_id` to its queue now, as a lapsed lease would.

        Args:
            consumer_id: The consumer known to be gone; an unknown one holds nothing.

        Returns:
            How many messages went back.
        """
        store = self._store
        with store.changed:
            store.dead_consumers.discard(consumer_id)
            return store.return_leased({consumer_id})

    def mark_dead(self, consumer_id: str) -> None:
        """Declare a consumer gone, so the next `heartbeat()` returns its messages.

        Args:
            consumer_id: The `consumer_id` of the broker that stands for the dead consumer.
        """
        with self._store.changed:
            self._store.dead_consumers.add(consumer_id)

    def purge(self, queue: str) -> int:
        """Delete every waiting message of `queue`; leased ones stay.

        Args:
            queue: The queue to empty.

        Returns:
            How many messages were deleted.
        """
        with self._store.changed:
            emptied = self._store.queues.pop(queue, None)
            if emptied is None:
                return 0
            waiting = [message_id for _, message_id in emptied.ready + emptied.delayed]
            for message_id in waiting:
                del self._store.messages[message_id]
        return len(waiting)

    def size(self, queue: str) -> int:
        """Return how many messages wait in `queue`, delayed ones included.

        Args:
            queue: The queue to count.
        """
        with self._store.changed:
            waiting = self._store.queues.get(queue)
            return 0 if waiting is None else len(waiting.ready) + len(waiting.delayed)

    def scheduled(self, queue: str) -> int:
        """Return how many messages of `queue` wait for an eta still to come.

        Args:
            queue: The queue to count.
        """
        now = time.time()
        with self._store.changed:
            waiting = self._store.queues.get(queue)
            return 0 if waiting is None else sum(1 for due, _ in waiting.delayed if due > now)
