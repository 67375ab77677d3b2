"""The Redis result backend's shared subscription: one pub/sub connection per backend and process.

Threads waiting for results do not each subscribe: a `Listener`'s background thread owns
the single pub/sub connection, subscribes to a task's channel only while someone waits
for that task, and hands what is published to the waiters' `Inbox` objects. After every
(re)subscription a waiter is told to `Signal.LOOK` at the key itself, so a result stored
while the connection was down or not yet subscribed is never missed.
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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis

from celeriac.exceptions import TimeoutError
from celeriac.redis_connection import close_client

# Logs as the backend it serves, so one logging setting covers both.
logger = logging.getLogger("celeriac.backends.redis")

# How long the listener blocks for a message before it looks at its subscriptions
# again; a safety net only, since waiters wake it when they need a new subscription.
_LISTENER_IDLE = 1.0
_RECONNECT_DELAY_MAX = 1.0
_LISTENER_JOIN_TIMEOUT = 5.0


class Signal(enum.Enum):
    """What a waiter is told besides the published documents."""

    LOOK = "look"  # the channel is (again) subscribed: read the key, something may be there
    CLOSED = "closed"  # the backend was closed while the thread waited


class Inbox:
    """What the listener hands one waiting thread: published documents and signals, in order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[bytes | Signal] = queue.SimpleQueue()

    def put(self, item: bytes | Signal) -> None:
        """Hand the waiter a published document or a signal."""
        self._queue.put(item)

    def get(self, deadline: float | None) -> bytes | Signal:
        """Return the next item, waiting for it until `deadline`.

        Args:
            deadline: A `time.monotonic` time; None waits forever.

        Returns:
            A published document, or a `Signal`.

        Raises:
            TimeoutError: The deadline passed first.
        """
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self._queue.get(timeout=remaining)
            except queue.Empty:
                # A lock timeout may end a hair early: give up only once no time is left.
                if remaining == 0.0:
                    raise TimeoutError("The operation timed out.") from None


class Listener:
    """One pub/sub connection serving every `wait` of one backend in this process.

    redis-py's PubSub is not thread-safe, so only the listener's thread touches it.
    Waiting threads put their inboxes in `_waiting` (under `_lock`) and wake the thread
    by publishing on a private channel it always listens to; the thread then brings
    the server's subscriptions in line with `_waiting`. A channel is *live* once the
    server has confirmed its subscription with no (un)subscribe still in flight: only
    then may a waiter read the key and be sure no later publish escapes it.

    Args:
        connect: Makes the listener's client. It should not retry commands by itself,
            so the listener sees every lost connection and can tell its waiters to look again.
    """

    def __init__(self, connect: Callable[[], redis.Redis]) -> None:
        self._client = connect()
        self._wake_channel = f"celeriac-result-listener-wake-{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Inbox]] = {}
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
    def subscription(self, channel: str) -> Iterator[Inbox]:
        """Receive what is published on `channel` while the block runs.

        The first item is `Signal.LOOK` once the subscription is live, and again after
        every reconnect: the caller must then read the key itself.

        Args:
            channel: The channel, named like the key it announces.

        Yields:
            The inbox that receives the channel's documents and the signals.
        """
        inbox = Inbox()
        with self._lock:
            self._waiting.setdefault(channel, []).append(inbox)
            live, closed = channel in self._live, self._closed
        if closed:
            inbox.put(Signal.CLOSED)
        elif live:
            inbox.put(Signal.LOOK)
        else:
            self._wake()
        try:
            yield inbox
        finally:
            self._leave(channel, inbox)

    def _leave(self, channel: str, inbox: Inbox) -> None:
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
            inbox.put(Signal.CLOSED)
        close_client(self._client)

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
            inbox.put(Signal.LOOK)

    def _inboxes(self, channel: str) -> list[Inbox]:
        with self._lock:
            return list(self._waiting.get(channel, ()))
