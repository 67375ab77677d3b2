"""The broker interface every transport implements, and the logic they share.

A broker moves opaque payloads (packed envelopes) between named queues. It knows
nothing of tasks. Every message a consumer fetches is *leased* to that consumer
(`Broker.consumer_id`) until it is acked, released or dead-lettered; the consumer
keeps its leases alive with `heartbeat()`, and any consumer's `heartbeat()` returns
the messages of consumers whose leases have lapsed (a SIGKILLed worker's) to their
queues. Delayed messages (`eta`) wait inside the broker until due.

A consumer may also renew other consumers' leases (`heartbeat(also=...)`: a prefork
parent renews its children's, which do not heartbeat) and hand back at once the messages
of a consumer it knows is gone (`reclaim`: a child it saw die). The caller may assign
`consumer_id` (the prefork parent picks each child's id before forking it); an id
assigned in a process is kept for that process's leases.

Priorities run 0-9 and mean what they mean on the transport, as in Celery: on SQLite,
memory and AMQP a higher number is more urgent; on Redis 0 is the most urgent.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from celeriac import forks

logger = logging.getLogger(__name__)

DEFAULT_LEASE_TIMEOUT = 20.0  # with heartbeats every third of it, a dead worker's messages return within 27 s
MAX_PRIORITY = 9


@dataclass(slots=True)  # not frozen: built once per message, and frozen costs more
class Outgoing:
    """A payload to publish: where to, how urgent, and when it becomes visible (unix time)."""

    queue: str
    payload: bytes
    priority: int = 0
    eta: float | None = None


@dataclass(slots=True)  # not frozen: built once per message, and frozen costs more
class Delivery:
    """A leased message: ack it, release it, or dead-letter it through the broker that gave it."""

    tag: str
    queue: str
    payload: bytes
    attempts: int = 1

    @property
    def redelivered(self) -> bool:
        """True when this message was handed out before (its earlier consumer died or released it)."""
        return self.attempts > 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message set aside because it could not be processed, and why."""

    queue: str
    payload: bytes
    reason: str
    when: float


def clamp_priority(priority: int | None) -> int:
    """Keep a priority inside 0-9."""
    return max(0, min(MAX_PRIORITY, int(priority or 0)))


def make_consumer_id() -> str:
    """Return an id for this process's leases that no other process will share."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


class Broker(ABC):
    """A transport for task messages. Subclasses implement the abstract methods and nothing else.

    Args:
        url: The broker URL; its scheme chose this class.
        options: `broker_transport_options`; `lease_timeout` (seconds, default 20) is how long
            a silent consumer keeps its leases, and `polling_interval` bounds idle waits.
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.options: dict[str, Any] = dict(options or {})
        self.lease_timeout = float(self.options.get("lease_timeout", DEFAULT_LEASE_TIMEOUT))
        self.polling_interval = float(self.options.get("polling_interval", 0.05))
        self.consumer_id = make_consumer_id()

    @property
    def consumer_id(self) -> str:
        """The id this process's fetches lease messages to; assignable, e.g. right after a fork."""
        return self._consumer_id

    @consumer_id.setter
    def consumer_id(self, value: str) -> None:
        self._consumer_id = value
        self._consumer_id_pid = forks.pid()
        self._consumer_changed()

    def _consumer_changed(self) -> None:  # noqa: B027 - optional hook
        """Called whenever `consumer_id` is assigned: forget what was tied to the old id."""

    def _take_own_consumer_id(self) -> None:
        """In a forked child, take a fresh consumer id unless one was assigned in this process.

        For brokers that notice a fork lazily, on first use: the parent's leases are the
        parent's, but an id the child was given (the prefork parent's choice) must stick.
        """
        if self._consumer_id_pid != forks.pid():
            self.consumer_id = make_consumer_id()

    # producing -------------------------------------------------------------------------

    @abstractmethod
    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Store `messages` durably in their queues, in one round trip where the broker can."""

    def publish_one(self, queue: str, payload: bytes, *, priority: int = 0, eta: float | None = None) -> None:
        """Store one payload in `queue`."""
        self.publish([Outgoing(queue, payload, priority, eta)])

    # consuming -------------------------------------------------------------------------

    @abstractmethod
    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to `limit` ready messages from `queues`, waiting at most `timeout` seconds for one.

        Messages come out most urgent first, then oldest first; a message whose eta
        has not come is not ready.
        """

    @abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Forget messages that were processed."""

    @abstractmethod
    def release(
        self, deliveries: Sequence[Delivery], *, eta: float | None = None, redelivered: bool = True
    ) -> None:
        """Return leased messages to their queues, visible again at `eta` (now if None).

        With `redelivered` (the default) a message released without an eta comes back as a
        redelivery, counted toward its attempts. Without it the message goes back exactly as
        it was fetched, its attempts unchanged: for prefetched messages that never started.
        """

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a leased message to the dead-letter store with `reason`.

        A message no longer leased (acked, released, or returned after its consumer's lease
        lapsed) is left where it is, with a warning.
        """
        if not self._dead_letter(delivery, reason):
            logger.warning(
                "Not dead-lettering message %s of %r: it is no longer leased", delivery.tag, delivery.queue
            )

    @abstractmethod
    def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move a leased message to the dead-letter store; return False if it is no longer leased."""

    @abstractmethod
    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Return dead-lettered messages, oldest first, from `queue` or from all queues."""

    @abstractmethod
    def heartbeat(self, also: Sequence[str] = ()) -> int:
        """Renew this consumer's leases and requeue lapsed consumers' messages; return how many.

        Args:
            also: Other consumer ids whose leases to renew with this one's (a prefork
                parent's children, which do not heartbeat themselves).
        """

    @abstractmethod
    def reclaim(self, consumer_id: str) -> int:
        """Return every message leased to `consumer_id` to its queue now, as if its lease lapsed.

        For a consumer known to be gone (a pool child seen dying): its messages come back
        marked redelivered at once instead of after a lease, and its lease entry is dropped.
        An unknown id returns nothing.

        Returns:
            How many messages went back.
        """

    # administration --------------------------------------------------------------------

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every waiting message in `queue` (not leased ones); return how many."""

    @abstractmethod
    def size(self, queue: str) -> int:
        """Return how many messages wait in `queue`, delayed ones included, leased ones not."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the broker may be used again afterwards."""

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process and take a fresh consumer id.

        A caller that wants the child to use an id of its choosing assigns `consumer_id`
        after this call.
        """
        self.close()
        self.consumer_id = make_consumer_id()


def poll_until(fetch_once: Callable[[], list[Delivery]], timeout: float, ceiling: float) -> list[Delivery]:
    """Call `fetch_once` until it returns messages or `timeout` passes, backing off up to `ceiling`."""
    found = fetch_once()
    if found or timeout <= 0:
        return found
    deadline = time.monotonic() + timeout
    pause = min(0.0005, ceiling)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return []
        time.sleep(min(pause, remaining))
        found = fetch_once()
        if found:
            return found
        pause = min(pause * 2, ceiling)
