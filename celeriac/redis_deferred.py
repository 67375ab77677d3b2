"""Commands written at once and confirmed in batches: the acks a worker sends once per task.

An early ack must be on its way to Redis before its task starts, so that a worker that dies
mid-task never runs that task again; but nothing needs to know that it landed until the
consumer waits for more work. Written one by one, each ack wakes an idle server, and on a
small virtual machine that wake-up costs the worker about as much as the rest of a no-op task.
`DeferredCommands` keeps one connection per process for such commands instead:

- The connection runs with CLIENT REPLY OFF, so Redis sends nothing back and this side holds
  unread data only while `call` or `confirm` waits for its reply, when nothing is left corked.
  (A socket closed with unread data is reset, and what it had not yet sent is dropped.)
- On TCP it is corked (TCP_CORK): a command goes into the kernel's send buffer, which the
  kernel sends when a packet is full, after 200 ms at most, when `call` or `confirm` uncorks
  it, or when the socket is closed, which includes the death of the process. A command
  written is therefore never lost with the process, only with the machine.
- `call` sends one more command behind them (a busy consumer's next fetch; `call_many`
  sends several) and reads its reply: one system call and one wake-up of Redis carry the
  acks, the fetch and their confirmation. `confirm` sends CLIENT REPLY ON, whose +OK comes
  after every earlier command has run, then CLIENT REPLY OFF, and waits for that +OK. If it
  does not come, every command written since the last confirmation is sent again on a fresh
  connection; only commands that may safely run twice are sent this way (never the commands
  of a `call`).

A server that refuses CLIENT REPLY gets plain writes, whose replies `confirm` reads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import ModuleType
from typing import Any

import redis

from celeriac.redis_spare import drop, packed, write

hiredis: ModuleType | None
try:
    import hiredis
except ImportError:  # redis-py installed without its hiredis extra
    hiredis = None

MOST_PENDING = 256  # commands written before a confirmation is awaited, with no wait between
_QUIET = packed(("CLIENT", "REPLY", "OFF"))
_REPLY_ON = packed(("CLIENT", "REPLY", "ON"))
_CONFIRM = _REPLY_ON + _QUIET
_LOST = (redis.ConnectionError, redis.TimeoutError, OSError)
_READ_SIZE = 1 << 16  # bytes per read of a busy fetch's replies


class DeferredCommands:
    """One process's connection for commands whose replies can wait; safe to share between threads."""

    def __init__(self, most_pending: int = MOST_PENDING) -> None:
        self._lock = threading.Lock()
        self._most_pending = most_pending
        self._client: redis.Redis | None = None
        self._connection: Any = None  # a redis-py connection, or None when there is none yet
        self._quiet = True  # the connection runs with CLIENT REPLY OFF
        self._corked = False
        self._pending: list[bytes] = []  # commands (RESP) written since the last confirmation
        self._buffer = bytearray(_READ_SIZE)  # what `call_many` reads replies into, under the lock

    def send(self, client: redis.Redis, command: bytes) -> None:
        """Write one command that may safely run twice; it has run when the next `confirm` returns.

        Args:
            client: Whose pool lends the connection.
            command: The command in RESP (see `redis_spare.packed`).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis could not be reached; this command
                was not written (earlier ones are kept and sent again).
        """
        with self._lock:
            connection = self._ready(client)
            if len(self._pending) >= self._most_pending:
                self._confirm()  # before writing: a command once written is never reported lost
                connection = self._connection
            try:
                write(connection, command)
            except BaseException:
                self._lose()
                raise
            self._pending.append(command)

    def send_ready(self, command: bytes) -> bool:
        """Write `command` as `send` does if the connection is open and has room; say whether it did.

        The per-task ack's path: no client to check and no error to translate. On False,
        nothing was written and `send` does the rest (opening, confirming, sending again).
        """
        with self._lock:
            connection = self._connection
            if connection is None or len(self._pending) >= self._most_pending:
                return False
            try:
                write(connection, command)
            except redis.ConnectionError:
                self._lose()  # `send` opens a new connection and sends what is pending again
                return False
            self._pending.append(command)
            return True

    def call(self, client: redis.Redis, command: bytes) -> Any:
        """Run `command` after every command written so far, and return its reply.

        The earlier commands go out with it, in one system call, and its round trip confirms
        them: a busy consumer's fetch carries the acks of the tasks it ran. `command` itself is
        never sent twice: should the connection fail, this raises, and only the earlier
        commands are kept to be sent again.

        Args:
            client: Whose pool lends the connection.
            command: The command in RESP (see `redis_spare.packed`).

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis could not be reached.
            redis.ResponseError: Redis refused `command`; the connection stays in use.
        """
        [reply] = self.call_many(client, command, 1)
        if isinstance(reply, redis.RedisError):
            raise reply
        return reply

    def call_many(self, client: redis.Redis, commands: bytes, count: int) -> list[Any]:
        """Run `count` commands as `call` runs one, and return their replies in order.

        A command Redis refuses does not stop the ones after it: its reply is the error
        redis-py would raise for it (a `redis.RedisError`), returned in its place.

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis could not be reached; none of
                `commands` is sent again.
        """
        with self._lock:
            connection = self._ready(client)
            try:
                if self._quiet:
                    self._push(connection, _REPLY_ON + commands + _QUIET)
                    # ON's +OK comes first, once every earlier command has run
                    replies = _replies(connection, 1 + count, self._buffer)[1:]
                else:
                    write(connection, commands)
                    self._read_pending(connection)
                    replies = [_reply(connection) for _ in range(count)]
                self._pending.clear()
            except BaseException:
                self._lose()
                raise
            if any(isinstance(reply, redis.ConnectionError) for reply in replies):
                self._lose()  # such as LOADING: redis-py drops the connection too
            return replies

    def confirm(self) -> None:
        """Return once every command written so far has run, sending again what was lost.

        Raises:
            redis.ConnectionError, redis.TimeoutError: Redis could not be reached; the
                commands are kept for the next try.
        """
        with self._lock:
            if self._pending:
                self._confirm()

    def close(self) -> None:
        """Confirm what can be confirmed, then close the connection (never pooled again as it is)."""
        with self._lock:
            if self._pending and self._client is not None:
                # What cannot be confirmed stays leased until its consumer's lease lapses.
                with contextlib.suppress(*_LOST):
                    self._confirm()
            self._lose()

    def _confirm(self) -> None:
        if self._connection is not None:
            try:
                self._await(self._connection)
                self._pending.clear()
                return
            except _LOST:
                self._lose()
        self._reconnect()

    def _reconnect(self) -> None:
        """Open a connection and run on it again every command not yet confirmed."""
        assert self._client is not None
        connection = self._open(self._client)
        try:
            if self._pending:
                write(connection, b"".join(self._pending))
                self._await(connection)
        except BaseException:
            drop(self._client, connection)
            raise
        self._pending.clear()
        self._connection = connection

    def _open(self, client: redis.Redis) -> Any:
        connection = client.connection_pool.get_connection()  # redis-py leaves it untyped
        try:
            # OFF, ON, OFF: a server that knows CLIENT REPLY answers only the ON, with +OK
            write(connection, _QUIET + _CONFIRM)
            self._quiet = _replies_ok(connection)
            self._corked = self._quiet and _cork(connection._sock)
        except BaseException:
            drop(client, connection)
            raise
        return connection

    def _ready(self, client: redis.Redis) -> Any:
        """The connection to write on, opened again (with what is pending) if it was lost."""
        if client is not self._client:
            self._lose()  # what is pending goes again on the new client's connection
            self._client = client
        if self._connection is None or self._connection._sock is None:  # closed under us
            self._lose()
            self._reconnect()
        return self._connection

    def _await(self, connection: Any) -> None:
        """Push out what is written and wait until Redis has run all of it."""
        if not self._quiet:
            self._read_pending(connection)
            return
        self._push(connection, _CONFIRM)
        connection.read_response()

    def _push(self, connection: Any, data: bytes) -> None:
        """Write `data` and have the kernel send it now, with everything corked before it."""
        write(connection, data)
        if self._corked:
            _uncork(connection._sock)

    def _read_pending(self, connection: Any) -> None:
        # A server that refuses CLIENT REPLY answers every pending command.
        for _ in self._pending:
            with contextlib.suppress(redis.ResponseError):  # an ack of something gone
                connection.read_response()

    def _lose(self) -> None:
        if self._connection is not None:
            assert self._client is not None
            drop(self._client, self._connection)
            self._connection = None


def _replies(connection: Any, count: int, buffer: bytearray) -> list[Any]:
    """Read `count` replies, the last the connection will get until its next command.

    On a plain socket they are read straight into a hiredis reader of their own: through
    redis-py, each reply costs about a microsecond of checks. Nothing is read past them, as
    nothing follows them, so redis-py's reader stays empty for the connection's next user.
    """
    sock = connection._sock
    if hiredis is None or type(sock) is not socket.socket:  # TLS, or redis-py without hiredis
        return [_reply(connection) for _ in range(count)]
    # Errors become the classes redis-py raises (NoScriptError, BusyLoadingError, ...).
    reader = hiredis.Reader(
        protocolError=redis.exceptions.InvalidResponse, replyError=connection._parser.parse_error
    )
    replies: list[Any] = []
    gets = reader.gets
    while len(replies) < count:
        reader.feed(buffer, 0, _received(sock, buffer))
        while (reply := gets()) is not False:
            replies.append(reply)
    return replies


def _received(sock: socket.socket, buffer: bytearray) -> int:
    try:
        size = sock.recv_into(buffer)
    except TimeoutError as exc:
        raise redis.TimeoutError(f"Timeout reading from the Redis socket: {exc}") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"Error reading from the Redis socket: {exc}") from exc
    if not size:
        raise redis.ConnectionError("Redis closed the connection")
    return size


def _reply(connection: Any) -> Any:
    """The next reply, or the error Redis answered with."""
    try:
        return connection.read_response()
    except redis.ResponseError as exc:
        return exc


def _replies_ok(connection: Any) -> bool:
    """Read the answer to OFF, ON, OFF: True if replies are now off, False if the server refused."""
    try:
        connection.read_response()
        return True
    except redis.ResponseError:
        for _ in range(2):
            with contextlib.suppress(redis.ResponseError):
                connection.read_response()
        return False


def _cork(sock: Any) -> bool:
    """Cork a plain TCP socket (Linux); say whether it was."""
    corkable = type(sock) is socket.socket and sock.family in (socket.AF_INET, socket.AF_INET6)
    if not corkable or not hasattr(socket, "TCP_CORK"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except OSError as exc:
        raise redis.ConnectionError(f"Error setting up the Redis socket: {exc}") from exc
    return True


def _uncork(sock: socket.socket) -> None:
    """Send what the corked socket holds, and cork it again for what comes next.

    Raises:
        redis.ConnectionError: The socket is gone.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except OSError as exc:
        raise redis.ConnectionError(f"Error sending on the Redis socket: {exc}") from exc
