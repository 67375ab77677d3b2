"""Redis connections kept out of redis-py's pool for the commands sent once per task.

A command through redis-py's full machinery (pool checkout, retries, events, metrics)
costs as much again as the round trip itself. `SpareConnections` keeps idle connections in
a plain list shared by all threads (`list.pop` and `append` are atomic, so no lock), sends
one command on one and puts it back; there are never more than the threads that sent a
command at the same moment, and none stays tied to a thread that has ended.

`send` leaves the reply unread, so a worker can start a task while its ack travels. The
connection goes back to the list carrying the command, and whoever takes it next reads the
reply first; if that reply was lost with the connection, the command is sent again on a
fresh one (only commands that may safely run twice are sent this way). At most one reply per
connection is ever unread, so a process that dies leaves unread only replies to commands
Redis has already run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis

Arg = bytes | str | int | float
_Idle = tuple[redis.Redis, Any, tuple[Arg, ...] | None]  # client, redis-py connection, unread command


class SpareConnections:
    """Idle connections of one or more clients, each perhaps with one reply left unread."""

    def __init__(self) -> None:
        self._idle: list[_Idle] = []

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
            connection.send_packed_command([packed(args)])
            reply = connection.read_response()
        except BaseException:
            _drop(client, connection)
            raise
        self._idle.append((client, connection, None))
        return reply

    def send(self, client: redis.Redis, *args: Arg) -> None:
        """Send one command that may safely run twice, leaving its reply to be read later."""
        connection = self._take(client, False)
        try:
            connection.send_packed_command([packed(args)])
        except BaseException:
            _drop(client, connection)
            raise
        self._idle.append((client, connection, args))

    def settle(self) -> None:
        """Read every reply left unread (sending again what was lost); idle connections stay."""
        pending: list[_Idle] = []
        while True:
            try:
                entry = self._idle.pop()
            except IndexError:
                break
            pending.append(entry)
        for client, connection, unread in pending:
            if unread is not None:
                connection = self._confirm(client, connection, unread)
            self._idle.append((client, connection, None))

    def _take(self, client: redis.Redis, check: bool) -> Any:
        while True:
            try:
                owner, connection, unread = self._idle.pop()
            except IndexError:
                return client.connection_pool.get_connection()  # redis-py leaves it untyped
            if owner is not client:  # an earlier client's, closed since
                owner.connection_pool.release(connection)
                if unread is not None:
                    return self._confirm(client, client.connection_pool.get_connection(), unread, fresh=True)
                continue
            if unread is not None:
                return self._confirm(client, connection, unread)
            if check and _stale(connection):
                _drop(client, connection)
                continue
            return connection

    def _confirm(
        self, client: redis.Redis, connection: Any, unread: tuple[Arg, ...], fresh: bool = False
    ) -> Any:
        """Read `unread`'s reply on `connection`, or send it again on a fresh one if it was lost."""
        if not fresh:
            try:
                connection.read_response()
                return connection
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                _drop(client, connection)
                connection = client.connection_pool.get_connection()
        try:
            connection.send_packed_command([packed(unread)])
            connection.read_response()
        except BaseException:
            _drop(client, connection)
            raise
        return connection

    def close(self) -> None:
        """Read what is unread, then hand every idle connection back to its pool."""
        # What cannot be confirmed stays leased until its consumer's lease lapses.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
            self.settle()
        while True:
            try:
                client, connection, _ = self._idle.pop()
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


def _stale(connection: Any) -> bool:
    """Whether an idle connection has data waiting or a closed socket (the server went away)."""
    try:
        return bool(connection.can_read())
    except (redis.ConnectionError, OSError):
        return True


def _drop(client: redis.Redis, connection: Any) -> None:
    """Forget a connection in an unknown state: never use it again as it is."""
    connection.disconnect()
    client.connection_pool.release(connection)
