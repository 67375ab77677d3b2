"""A result backend in a SQLite file, shared safely by many threads and processes.

Table layout (the file may also hold a SQLite broker's tables; these names are ours)::

    celeriac_results
        task_id     TEXT PRIMARY KEY   the task's id
        status      TEXT               its state (PENDING ... SUCCESS), kept beside the
                                       document so the upsert can guard SUCCESS in SQL
        document    BLOB               the serialised task meta
        updated     REAL               unix time of the last write
        expires_at  REAL NULL          unix time the row stops being readable; NULL = never
    index celeriac_results_expires_at on (expires_at), for `cleanup()`

Times are wall-clock unix seconds because several processes, possibly started at
different times, must agree on them. Each thread of each process gets its own
connection: SQLite connections must not be shared across threads without locking,
and must never be carried across a fork.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend
from celeriac.exceptions import BackendError, ImproperlyConfigured

BUSY_TIMEOUT = 30.0

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS celeriac_results (
        task_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        document BLOB NOT NULL,
        updated REAL NOT NULL,
        expires_at REAL
    )
    """,
    "CREATE INDEX IF NOT EXISTS celeriac_results_expires_at ON celeriac_results (expires_at)",
)

# A stored SUCCESS is final, unless it has expired: an expired row reads as missing,
# so it must be as writable as a missing one.
_UPSERT = """
    INSERT INTO celeriac_results (task_id, status, document, updated, expires_at)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (task_id) DO UPDATE SET
        status = excluded.status,
        document = excluded.document,
        updated = excluded.updated,
        expires_at = excluded.expires_at
    WHERE celeriac_results.status != 'SUCCESS' OR celeriac_results.expires_at <= excluded.updated
"""
_SELECT = "SELECT document FROM celeriac_results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)"
_DELETE = "DELETE FROM celeriac_results WHERE task_id = ?"
_CLEANUP = "DELETE FROM celeriac_results WHERE expires_at <= ?"

# Connections inherited from a parent process. Closing one in the child could
# disturb the parent's locks and journal, so they are kept referenced (never
# finalised) and never used.
_INHERITED: list[sqlite3.Connection] = []


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


def database_path(url: str) -> str:
    """Turn a ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` URL into an absolute path.

    Args:
        url: The backend URL; any of `SQLiteBackend.schemes`.

    Returns:
        The database file's absolute path, resolved against the current directory now so
        that threads and child processes agree on it whatever they do to their directory.

    Raises:
        ImproperlyConfigured: The URL names a host, or no file.
    """
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
        raise ImproperlyConfigured(
            f"bad SQLite result backend URL {url!r}: use sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    return os.path.abspath(parts.path[1:])


class _ThreadConnection(threading.local):
    connection: sqlite3.Connection | None = None
    # (pid, generation) the connection was opened under; anything else is stale.
    key: tuple[int, int] = (0, 0)


class SQLiteBackend(ResultBackend):
    """Keeps results in a SQLite file that any number of processes may share.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``db+sqlite:///...``
            (Celery's spelling). A relative path is resolved against the current directory.
        serializer: Name of the serializer for stored documents (`result_serializer`).
        expires: Seconds a ready result is kept (`result_expires`); None keeps it forever.
        accept: Content types accepted when reading results back (`result_accept_content`).

    Raises:
        ImproperlyConfigured: The URL does not name a file.
    """

    schemes = ("sqlite", "db+sqlite")

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        expires: float | None = DEFAULT_EXPIRES,
        accept: frozenset[str] | None = None,
    ) -> None:
        super().__init__(url, serializer=serializer, expires=expires, accept=accept)
        self.path = database_path(url)
        self._local = _ThreadConnection()
        self._lock = threading.Lock()
        self._opened: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        # Bumped by close(), so every thread notices its connection is gone.
        self._generation = 0

    # connections -----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if pid != self._pid:
            self._adopt_fork(pid)
        local = self._local
        if local.connection is not None and local.key == (pid, self._generation):
            return local.connection
        connection = self._connect()
        with self._lock:
            self._opened.append(connection)
            local.connection, local.key = connection, (pid, self._generation)
        return connection

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so close() may close other threads' connections;
        # each connection is otherwise used by the thread that opened it.
        with self._translated_errors():
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                self._prepare(connection)
            except BaseException:
                connection.close()
                raise
        return connection

    @staticmethod
    def _prepare(connection: sqlite3.Connection) -> None:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        # Switching to WAL takes an exclusive lock; skip it when another process
        # (or the broker sharing this file) already did, as is usual.
        _use_wal(connection)
        connection.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            connection.execute(statement)

    def _adopt_fork(self, pid: int) -> None:
        # We are a forked child: the parent's connections (and possibly its held
        # lock) came along. Set them aside untouched and start afresh.
        _INHERITED.extend(self._opened)
        self._opened = []
        self._lock = threading.Lock()
        self._pid = pid

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite result backend {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close every connection this process opened; the next use opens new ones."""
        if os.getpid() != self._pid:
            self._adopt_fork(os.getpid())
        with self._lock:
            opened, self._opened = self._opened, []
            self._generation += 1
        for connection in opened:
            connection.close()

    def reset_after_fork(self) -> None:
        """Set aside the connections inherited from the parent process, without closing them."""
        if os.getpid() != self._pid:
            self._adopt_fork(os.getpid())

    # storage ---------------------------------------------------------------------------

    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        now = time.time()
        expires_at = None if expires is None else now + expires
        with self._translated_errors():
            self._connection().execute(_UPSERT, (task_id, state, document, now, expires_at))

    def _load(self, task_id: str) -> bytes | None:
        with self._translated_errors():
            row = self._connection().execute(_SELECT, (task_id, time.time())).fetchone()
        return None if row is None else bytes(row[0])

    def _delete(self, task_id: str) -> None:
        with self._translated_errors():
            self._connection().execute(_DELETE, (task_id,))

    def cleanup(self) -> int:
        """Delete expired results now.

        Returns:
            How many results were deleted.

        Raises:
            BackendError: SQLite failed (for example, the database stayed locked for 30 s).
        """
        with self._translated_errors():
            cursor = self._connection().execute(_CLEANUP, (time.time(),))
        return cursor.rowcount
