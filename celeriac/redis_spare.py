"""Redis connections kept out of redis-py's pool for the commands sent once per call.

A command through redis-py's full machinery (pool checkout, retries, events, metrics)
costs as much again as the round trip itself. `SpareConnections` keeps idle connections in
a plain list shared by all threads (`list.pop` and `append` are atomic, so no lock), sends
one command on one, reads its reply and puts it back; there are never more than the threads
that sent a command at the same moment, and none stays tied to a thread that has ended.
Commands whose replies can wait (a worker's acks) go through `redis_deferred` instead.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import redis

Arg = bytes | str | int | float


class SpareConnections:
    """Idle connections of one or more clients."""

    def __init__(self) -> None:
        self._idle: list[tuple[redis.Redis, Any]] = []  # client, its redis-py connection

    def run(self, client: redis.Redis, *args: Arg, check: bool = False) -> Any:
        """Send one command and return its reply, as redis-py parses it.

        Args:
            client: Whose pool lends a connection when none is idle.
            args: The command.
            check: First make sure the connection is still open (one system call), so a
                command that must not be sent twice is never written into a dead socket.

        Raises:
            redis.ConnectionError, redis.TimeoutError: The connection failed; it is dropped.
        """
        connection = self._take(client, check)
        try:
            write(connection, packed(args))
            reply = connection.read_response()
        except BaseException:
            drop(client, connection)
            raise
        self._idle.append((client, connection))
        return reply

    def _take(self, client: redis.Redis, check: bool) -> Any:
        while True:
            try:
                owner, connection = self._idle.pop()
            except IndexError:
                return client.connection_pool.get_connection()  # redis-py leaves it untyped
            if owner is not client:  # an earlier client's, closed since
                owner.connection_pool.release(connection)
                continue
            if check and _stale(connection):
                drop(client, connection)
                continue
            return connection

    def close(self) -> None:
        """Hand every idle connection back to its pool."""
        while True:
            try:
                client, connection = self._idle.pop()
            except IndexError:
                return
            client.connection_pool.release(connection)


def packed(args: tuple[Arg, ...]) -> bytes:
    """One command in RESP, as redis-py would pack it (bulk strings; str is UTF-8, numbers as text)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else (arg if isinstance(arg, str) else repr(arg)).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(parts)


def lrem_last(key: str, value: bytes) -> bytes:
    """``LREM key -1 value`` in RESP: what `packed` gives, built in one step for the per-task ack."""
    name = key.encode()
    return b"*4\r\n$4\r\nLREM\r\n$%d\r\n%b\r\n$2\r\n-1\r\n$%d\r\n%b\r\n" % (
        len(name),
        name,
        len(value),
        value,
    )


def write(connection: Any, data: bytes) -> None:
    """Write `data` to a redis-py connection, in one system call where it fits.

    A socket with a timeout costs Python a poll() before every send; a connected plain TCP or
    Unix socket is written with os.write, which the kernel takes at once when its buffer has
    room (always, for a few commands on a healthy connection). TLS, a connection not yet
    made and a full buffer go through redis-py's own send.

    Raises:
        redis.ConnectionError: The socket refused the write (the server went away).
    """
    sock = connection._sock
    if type(sock) is not socket.socket:
        connection.send_packed_command([data])
        return
    try:
        written = os.write(sock.fileno(), data)
    except BlockingIOError:
        written = 0
    except OSError as exc:
        raise redis.ConnectionError(f"Error writing to the Redis socket: {exc}") from exc
    if written < len(data):
        connection.send_packed_command([data[written:]])


def _stale(connection: Any) -> bool:
    """Whether an idle connection has data waiting or a closed socket (the server went away)."""
    try:
        return bool(connection.can_read())
    except (redis.ConnectionError, OSError):
        return True


def drop(client: redis.Redis, connection: Any) -> None:
    """Forget a connection in an unknown state: never use it again as it is."""
    connection.disconnect()
    client.connection_pool.release(connection)
