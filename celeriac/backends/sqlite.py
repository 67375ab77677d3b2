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
    celeriac_chords (group_id PRIMARY KEY, size, created)
                                       a chord waiting for its header; deleted by the
                                       report that completes it
    celeriac_chord_parts (group_id, task_id, idx, part)
                                       each header task's outcome, until the body is sent

Times are wall-clock unix seconds because several processes, possibly started at
different times, must agree on them. Each thread of each process gets its own
connection: SQLite connections must not be shared across threads without locking,
and must never be carried across a fork.
"""

from __future__ import annotations

import sqlite3
import time

from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend
from celeriac.exceptions import BackendError
from celeriac.sqlite_file import SQLiteFile, database_path

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
    """
    CREATE TABLE IF NOT EXISTS celeriac_chords (
        group_id TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        created REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS celeriac_chord_parts (
        group_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        part BLOB NOT NULL,
        PRIMARY KEY (group_id, task_id)
    )
    """,
)
_CHORD_SIZE = "INSERT OR REPLACE INTO celeriac_chords (group_id, size, created) VALUES (?, ?, ?)"
_CHORD_PART = "INSERT OR IGNORE INTO celeriac_chord_parts (group_id, task_id, idx, part) VALUES (?, ?, ?, ?)"
_CHORD_READ = "SELECT part FROM celeriac_chord_parts WHERE group_id = ? ORDER BY idx"
_CHORD_CLAIM = (
    "DELETE FROM celeriac_chords WHERE group_id = ?"
    " AND size <= (SELECT count(*) FROM celeriac_chord_parts WHERE group_id = ?)"
)
_CHORD_FORGET = "DELETE FROM celeriac_chord_parts WHERE group_id = ?"

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
        self._file = SQLiteFile(
            database_path(url, "result backend"),
            what="result backend",
            error=BackendError,
            prepare=_create_tables,
        )
        self.path = self._file.path

    def close(self) -> None:
        """Close every connection this process opened; the next use opens new ones."""
        self._file.close()

    def reset_after_fork(self) -> None:
        """Set aside the connections inherited from the parent process, without closing them."""
        self._file.reset_after_fork()

    # storage ---------------------------------------------------------------------------

    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        now = time.time()
        expires_at = None if expires is None else now + expires
        with self._file.translated():
            self._file.connection().execute(_UPSERT, (task_id, state, document, now, expires_at))

    def _load(self, task_id: str) -> bytes | None:
        with self._file.translated():
            row = self._file.connection().execute(_SELECT, (task_id, time.time())).fetchone()
        return None if row is None else bytes(row[0])

    def _delete(self, task_id: str) -> None:
        with self._file.translated():
            self._file.connection().execute(_DELETE, (task_id,))

    def cleanup(self) -> int:
        """Delete expired results now.

        Returns:
            How many results were deleted.

        Raises:
            BackendError: SQLite failed (for example, the database stayed locked for 30 s).
        """
        with self._file.translated():
            cursor = self._file.connection().execute(_CLEANUP, (time.time(),))
        return cursor.rowcount

    # chords ----------------------------------------------------------------------------

    def _chord_set_size(self, group_id: str, size: int) -> None:
        with self._file.translated():
            self._file.connection().execute(_CHORD_SIZE, (group_id, size, time.time()))

    def _chord_add(self, group_id: str, index: int, task_id: str, part: bytes) -> list[bytes] | None:
        # One transaction: add the part, then delete the chord row only if every part is
        # in. Exactly one caller's DELETE removes the row, so the body is sent once.
        connection = self._file.connection()
        with self._file.translated(), self._file.transaction(connection):
            connection.execute(_CHORD_PART, (group_id, task_id, index, part))
            if connection.execute(_CHORD_CLAIM, (group_id, group_id)).rowcount == 0:
                return None
            parts = [bytes(row[0]) for row in connection.execute(_CHORD_READ, (group_id,))]
            connection.execute(_CHORD_FORGET, (group_id,))
        return parts


def _create_tables(connection: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        connection.execute(statement)
