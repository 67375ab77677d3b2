"""The Redis result backend's shared subscription: one pub/sub connection per backend and process.

Threads waiting for results do not each subscribe, and no thread of its own reads the
connection: whichever waiting thread finds it unattended reads it for everyone (the
*reader*), handing what is published to the waiters' `Inbox` objects, until its own inbox
holds something; then it gives the turn to the others. A lone waiter thus reads its own
result straight off the socket, with no hand-over between threads. A channel is subscribed
only while someone waits on it. After every (re)subscription a waiter is told to
`Signal.LOOK` at the key itself, so a result stored while the connection was down or not
yet subscribed is never missed.
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
from collections.abc import Callable, Iterator
from typing import Any

import redis

from celeriac.exceptions import TimeoutError
from celeriac.redis_connection import close_client

# Logs as the backend it serves, so one logging setting covers both.
logger = logging.getLogger("celeriac.backends.redis")

# Longest a reader blocks on the connection before it looks at the subscriptions again; a
# safety net only, since waiters wake it when they need a new subscription.
_READ_SLICE = 1.0
_RECONNECT_DELAY_MAX = 1.0


class Signal(enum.Enum):
    """What a waiter is told besides the published documents."""

    LOOK = "look"  # the channel is (again) subscribed: read the key, something may be there
    CLOSED = "closed"  # the backend was closed while the thread waited
    TURN = "turn"  # internal: the reader stopped reading; take the turn if nobody has


class Inbox:
    """What one waiting thread receives: published documents and signals, in order."""

    def __init__(self, listener: Listener) -> None:
        self._queue: queue.SimpleQueue[bytes | Signal] = queue.SimpleQueue()
        self._listener = listener

    def put(self, item: bytes | Signal) -> None:
        """Hand the waiter a published document or a signal."""
        self._queue.put(item)

    def holds_something(self) -> bool:
        """True when an item waits to be taken."""
        return not self._queue.empty()

    def get(self, deadline: float | None) -> bytes | Signal:
        """Return the next document, `Signal.LOOK` or `Signal.CLOSED`, waiting for it until `deadline`.

        While it waits, the calling thread reads the shared connection for every waiter if
        no other thread is doing so.

        Args:
            deadline: A `time.monotonic` time; None waits forever.

        Raises:
            TimeoutError: The deadline passed first.
        """
        while True:
            item = self._next(deadline)
            if item is not Signal.TURN:
                return item

    def _next(self, deadline: float | None) -> bytes | Signal:
        while True:
            with contextlib.suppress(queue.Empty):
                return self._queue.get_nowait()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise TimeoutError("The operation timed out.")
            if self._listener.read_for(self, deadline):
                continue  # this thread read until its inbox got something, or the deadline passed
            with contextlib.suppress(queue.Empty):  # a lock timeout may end a hair early
                return self._queue.get(timeout=remaining)


class Listener:
    """One pub/sub connection serving every `wait` of one backend in this process.

    A redis-py connection is not thread-safe, so only the thread that holds the turn (`_busy`,
    taken and given back under `_lock`) touches it and the state marked below as the
    reader's. A waiter that finds the turn taken registers in `_want_turn` and blocks on its
    inbox; whoever gives the turn back puts `Signal.TURN` in each of those inboxes, so no
    waiter is ever left with nobody reading. Waiting threads put their inboxes in `_waiting`
    (under `_lock`); when a reader is blocked on the connection and a new channel must be
    subscribed, the newcomer wakes it by publishing on a private channel it always listens
    to, and the reader brings the server's subscriptions in line with `_waiting`. A channel
    is *live* once the server has confirmed its subscription with no (un)subscribe still in
    flight: only then may a waiter read the key and be sure no later publish escapes it.

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
        self._dirty = False  # _waiting changed since the reader last reconciled
        self._stopping = threading.Event()
        self._busy = False  # a thread holds the turn: it alone may use the connection
        self._want_turn: set[Inbox] = set()
        # The reader's: the connection, what it asked the server for, how many
        # (un)subscribe replies per channel are still to come, and failures in a row.
        self._connection: Any = None  # a redis-py Connection, subscribed
        self._sent: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._failures = 0

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
        inbox = Inbox(self)
        with self._lock:
            self._waiting.setdefault(channel, []).append(inbox)
            live, closed, busy = channel in self._live, self._closed, self._busy
            self._dirty |= not live
        if closed:
            inbox.put(Signal.CLOSED)
        elif live:
            inbox.put(Signal.LOOK)
        elif busy:
            self._wake()  # a reader may be blocked on the connection: it must subscribe for us
        else:
            self._subscribe_now()
        try:
            yield inbox
        finally:
            self._leave(channel, inbox)

    def _subscribe_now(self) -> None:
        # Send the SUBSCRIBE without waiting for its answer (the caller reads the key
        # meanwhile); whoever reads next takes the answer and tells the waiter to LOOK.
        if not self._take_turn(None):
            return  # a reader is at work: it reconciles before it gives the turn back
        try:
            if self._connection is None and not self._closed:
                self._open()
        except Exception as exc:  # the next reader reconnects
            self._lost(exc)
        finally:
            self._give_turn()

    def read_for(self, inbox: Inbox, deadline: float | None) -> bool:
        """Read the connection for every waiter until `inbox` holds something or `deadline` passes.

        Returns:
            False at once if another thread holds the turn; `inbox` then gets `Signal.TURN`
            when that thread gives it back.
        """
        if not self._take_turn(inbox):
            return False
        try:
            while not inbox.holds_something() and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._read_once(_READ_SLICE if remaining is None else min(remaining, _READ_SLICE))
        finally:
            self._give_turn()
        return True

    def _take_turn(self, inbox: Inbox | None) -> bool:
        with self._lock:
            if not self._busy:
                self._busy = True
                return True
            if inbox is not None:
                self._want_turn.add(inbox)
            return False

    def _give_turn(self) -> None:
        # First send the (un)subscribes that changes to _waiting call for (waiters that came
        # or left while this thread held the turn could not); the next reader reads the answers.
        while True:
            with self._lock:
                settled = not self._dirty or self._closed or self._connection is None
                if settled:
                    self._busy = False
                    wanting, self._want_turn = self._want_turn, set()
            if settled:
                break
            self._reconcile_quietly()
        for inbox in wanting:
            inbox.put(Signal.TURN)

    def _leave(self, channel: str, inbox: Inbox) -> None:
        with self._lock:
            self._want_turn.discard(inbox)
            inboxes = self._waiting.get(channel, [])
            if inbox in inboxes:
                inboxes.remove(inbox)
            if not inboxes:
                self._waiting.pop(channel, None)
                self._dirty = True
        # Unsubscribe now, unless a reader is at work (it will, before it gives the turn back).
        if self._take_turn(None):
            self._give_turn()

    def _reconcile_quietly(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            self._reconcile(connection)
        except Exception as exc:  # the next reader reconnects
            self._lost(exc)

    def _wake(self) -> None:
        # If this fails the reader's connection is down too, and it re-subscribes
        # everything once it reconnects.
        with contextlib.suppress(redis.RedisError):
            self._client.publish(self._wake_channel, b"")

    def close(self) -> None:
        """Close the connections and release every waiter with CLOSED."""
        with self._lock:
            self._closed = True
            inboxes = [inbox for waiting in self._waiting.values() for inbox in waiting]
        self._stopping.set()
        for inbox in inboxes:
            inbox.put(Signal.CLOSED)
        close_client(self._client)  # a reader blocked on the connection wakes with an error

    # the reader (holding the turn) ------------------------------------------------------

    def _read_once(self, wait: float) -> None:
        try:
            connection = self._connection if self._connection is not None else self._open()
            self._reconcile(connection)
            # What is already buffered is returned without a system call; else this blocks.
            if connection.can_read(timeout=wait):
                self._handle(connection.read_response(push_request=True))
            self._failures = 0
        except Exception as exc:
            if self._closed:
                return
            self._failures += 1
            # Once per outage: while the server stays down this repeats every read.
            log = logger.warning if self._failures == 1 else logger.debug
            log("result listener lost its Redis connection (%s); reconnecting", exc)
            self._lost(exc)
            # The first retry is at once (a killed connection is the usual cause),
            # then back off so a dead server is not hammered.
            delay = (
                0.0 if self._failures == 1 else min(0.05 * 2 ** (self._failures - 2), _RECONNECT_DELAY_MAX)
            )
            self._stopping.wait(min(delay, wait))

    def _open(self) -> Any:
        # A connection of the client's pool, used raw: redis-py's PubSub would cost a
        # system call per (un)subscribe and much bookkeeping per message.
        connection: Any = self._client.connection_pool.get_connection()  # redis-py leaves it untyped
        self._connection = connection
        with self._lock:
            self._dirty = True  # everyone waiting must be subscribed on this connection
        connection.send_command("SUBSCRIBE", self._wake_channel, check_health=False)
        return connection

    def _lost(self, exc: Exception) -> None:
        # The connection is gone and its subscriptions with it: waiters will be told
        # to LOOK again once the next connection has re-subscribed their channels.
        connection, self._connection = self._connection, None
        with self._lock:
            self._live.clear()
        self._sent.clear()
        self._in_flight.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect()
                self._client.connection_pool.release(connection)

    def _reconcile(self, connection: Any) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            add = [channel for channel in self._waiting if channel not in self._sent]
            drop = [channel for channel in self._sent if channel not in self._waiting]
            # Not live from now on, so a waiter arriving before the UNSUBSCRIBE is
            # answered waits for the fresh SUBSCRIBE's answer instead.
            self._live.difference_update(drop)
        commands = [("SUBSCRIBE", *add)] if add else []
        if drop:
            commands.append(("UNSUBSCRIBE", *drop))
        if not commands:
            return
        try:
            # One write for both; the server answers each channel of each in order.
            connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        except BaseException:
            with self._lock:
                self._dirty = True
            raise
        self._sent.update(add)
        self._sent.difference_update(drop)
        self._in_flight.update(add)
        self._in_flight.update(drop)

    def _handle(self, reply: Any) -> None:
        # A pub/sub reply: [kind, channel, data or count]; anything else is not for us.
        if not isinstance(reply, list) or len(reply) != 3:
            return
        kind, channel = _text(reply[0]), _text(reply[1])
        if channel == self._wake_channel:
            return
        if kind == "message":
            for inbox in self._inboxes(channel):
                inbox.put(reply[2])
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
