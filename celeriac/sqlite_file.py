"""One SQLite file shared safely by many threads and processes on one host.

The plumbing under the SQLite broker and the SQLite result backend: each thread of each
process gets its own connection, since SQLite connections must not be shared across
threads without locking and must never be carried across a fork.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from celeriac import forks
from celeriac.exceptions import ImproperlyConfigured

BUSY_TIMEOUT = 30.0
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# Connections inherited from a parent process. Closing one in the child could checkpoint
# or unlink the parent's WAL, so they stay referenced (never finalised) and unused.
_INHERITED: list[sqlite3.Connection] = []


def database_path(url: str, what: str) -> str:
    """Turn ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` into an absolute file path.

    Args:
        url: A URL of any scheme; only its path is read.
        what: What the file is for ("broker", "result backend"), for the error message.

    Returns:
        The path, resolved against the current directory now, so that threads and child
        processes agree on it whatever they later do to their directory.

    Raises:
        ImproperlyConfigured: The URL names a host, no file, or ``:memory:``.
    """
    parts = urlsplit(url)
    path = parts.path[1:]
    if parts.netloc or not parts.path.startswith("/") or not path or path == ":memory:":
        raise ImproperlyConfigured(
            f"SQLite {what} URL {url!r} must name a file: sqlite:///relative.db or "
            "sqlite:////absolute/path.db (memory:// keeps everything inside one process)"
        )
    return os.path.abspath(path)


def _use_wal(connection: sqlite3.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is
    # locked" at once (without waiting busy_timeout) while another process opens it at the
    # same moment; look again until the file is in WAL mode, for up to BUSY_TIMEOUT.
    deadline = time.monotonic() + BUSY_TIMEOUT
    while str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        try:
            connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class _ThreadConnection(threading.local):
    connection: sqlite3.Connection | None = None
    generation = 0  # SQLiteFile._generation when opened; anything else means closed


class SQLiteFile:
    """Per-thread, per-process connections to one SQLite file in WAL mode.

    Args:
        path: The file's absolute path (see `database_path`).
        what: What the file is for ("broker", "result backend"), for error messages.
        error: The exception class `sqlite3.Error` is translated into.
        synchronous: SQLite's ``synchronous`` pragma: OFF, NORMAL, FULL or EXTRA.
        prepare: Called with each new connection, after the pragmas (to create tables).
        on_fork: Called once a forked child notices it inherited this object.

    Raises:
        ImproperlyConfigured: `synchronous` is not a known mode.
    """

    def __init__(
        self,
        path: str,
        *,
        what: str,
        error: type[Exception],
        synchronous: str = "NORMAL",
        prepare: Callable[[sqlite3.Connection], None] | None = None,
        on_fork: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        if self.synchronous not in SYNCHRONOUS_MODES:
            raise ImproperlyConfigured(
                f"SQLite {what} option 'synchronous' is {self.synchronous!r}; "
                f"use one of {', '.join(SYNCHRONOUS_MODES)}"
            )
        self._what = what
        self._error = error
        self._prepare = prepare
        self._on_fork = on_fork
        self._local = _ThreadConnection()
        self._lock = threading.Lock()
        self._opened: list[sqlite3.Connection] = []
        self._pid = forks.pid()
        # Bumped by close(), so every thread notices its connection is gone.
        self._generation = 0

    def connection(self) -> sqlite3.Connection:
        """Return this thread's connection, opening (and preparing) it on first use.

        Raises:
            Exception: Of the `error` class: the file cannot be opened or prepared.
        """
        if self._pid != forks.pid():
            self.reset_after_fork()
        local = self._local
        if local.connection is not None and local.generation == self._generation:
            return local.connection
        try:
            # check_same_thread is off only so close() may close every thread's connection;
            # each connection is otherwise used by the thread that opened it.
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(f"Cannot open the SQLite {self._what} file {self.path!r}: {exc}") from exc
        try:
            with self.translated():
                connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
                _use_wal(connection)
                connection.execute(f"PRAGMA synchronous = {self.synchronous}")
                if self._prepare is not None:
                    self._prepare(connection)
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._opened.append(connection)
            local.connection, local.generation = connection, self._generation
        return connection

    def close(self) -> None:
        """Close every connection this process opened; the next use opens new ones.

        In a forked child the parent's connections are set aside, never closed.
        """
        self.reset_after_fork()
        with self._lock:
            opened, self._opened = self._opened, []
            self._generation += 1
        for connection in opened:
            connection.close()

    def reset_after_fork(self) -> None:
        """In a forked child, set aside the parent's connections unclosed and call `on_fork`."""
        if self._pid == forks.pid():
            return
        _INHERITED.extend(self._opened)
        self._opened = []
        # Another thread of the parent may have held the lock at fork time.
        self._lock = threading.Lock()
        self._generation += 1
        self._pid = forks.pid()
        if self._on_fork is not None:
            self._on_fork()

    @contextmanager
    def translated(self) -> Iterator[None]:
        """Raise `sqlite3.Error` from the block as the `error` class, naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(f"SQLite {self._what} {self.path!r}: {exc}") from exc

    @staticmethod
    @contextmanager
    def transaction(connection: sqlite3.Connection) -> Iterator[None]:
        """Run the block in a ``BEGIN IMMEDIATE`` transaction: commit, or roll back on error.

        IMMEDIATE takes the write lock up front, so a read-then-write never fails half way
        with SQLITE_BUSY when another process wrote in between.
        """
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
