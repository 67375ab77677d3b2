"""A broker in one SQLite file, shared safely by many threads and processes on one host.

Table layout (the file may also hold the SQLite result backend's tables)::

    celeriac_broker_schema      one row: the layout version below
    celeriac_messages
        id           INTEGER PRIMARY KEY AUTOINCREMENT   publish order; Delivery.tag
        queue        TEXT
        priority     INTEGER      0-9, higher first
        visible_at   REAL         unix time the message may be fetched (its eta)
        payload      BLOB
        lease_owner  TEXT NULL    consumer_id holding the lease; NULL = waiting
        attempts     INTEGER      times fetched
        created      REAL
    index celeriac_messages_waiting on (queue, priority DESC, id) where lease_owner IS NULL
    index celeriac_messages_leased on (lease_owner) where lease_owner IS NOT NULL
    celeriac_consumers
        consumer_id  TEXT PRIMARY KEY
        lease_until  REAL         every lease this consumer holds lasts until then
    celeriac_dead_letters (id, queue, payload, reason, created)

A lease belongs to a consumer, not to a message: a heartbeat renews one consumers row,
and a message whose owner has no live row goes back to its queue. Times are wall-clock
unix seconds because every process on the host must agree on them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from celeriac.brokers.base import (
    Broker,
    DeadLetter,
    Delivery,
    Outgoing,
    clamp_priority,
    poll_until,
)
from celeriac.exceptions import ImproperlyConfigured, OperationalError
from celeriac.sqlite_file import SQLiteFile, database_path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS celeriac_broker_schema (version INTEGER NOT NULL)",
    """
    CREATE TABLE IF NOT EXISTS celeriac_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        visible_at REAL NOT NULL,
        payload BLOB NOT NULL,
        lease_owner TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS celeriac_messages_waiting
        ON celeriac_messages (queue, priority DESC, id) WHERE lease_owner IS NULL
    """,
    """
    CREATE INDEX IF NOT EXISTS celeriac_messages_leased
        ON celeriac_messages (lease_owner) WHERE lease_owner IS NOT NULL
    """,
    """
    CREATE TABLE IF NOT EXISTS celeriac_consumers (
        consumer_id TEXT PRIMARY KEY,
        lease_until REAL NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS celeriac_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        payload BLOB NOT NULL,
        reason TEXT NOT NULL,
        created REAL NOT NULL
    )
    """,
)

_INSERT = (
    "INSERT INTO celeriac_messages (queue, priority, visible_at, payload, attempts, created)"
    " VALUES (?, ?, ?, ?, 0, ?)"
)
_ANY_READY = (
    "SELECT EXISTS (SELECT 1 FROM celeriac_messages"
    " WHERE lease_owner IS NULL AND queue IN (SELECT value FROM json_each(?)) AND visible_at <= ?)"
)
_RENEW = (
    "INSERT INTO celeriac_consumers (consumer_id, lease_until) VALUES (?, ?)"
    " ON CONFLICT (consumer_id) DO UPDATE SET lease_until = excluded.lease_until"
)
_LEASE = """
    UPDATE celeriac_messages SET lease_owner = ?, attempts = attempts + 1
    WHERE id IN (
        SELECT id FROM celeriac_messages
        WHERE lease_owner IS NULL AND queue IN (SELECT value FROM json_each(?)) AND visible_at <= ?
        ORDER BY priority DESC, id
        LIMIT ?
    )
    RETURNING id, queue, payload, attempts, priority
"""
_ACK = (
    "DELETE FROM celeriac_messages WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner IS NOT NULL"
)
_RELEASE = (
    "UPDATE celeriac_messages SET lease_owner = NULL, visible_at = ?"
    " WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner IS NOT NULL"
)
_RELEASE_UNCOUNTED = (  # the fetch that leased them does not count as an attempt
    "UPDATE celeriac_messages SET lease_owner = NULL, visible_at = ?, attempts = max(attempts - 1, 0)"
    " WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner IS NOT NULL"
)
_TAKE_LEASED = (
    "DELETE FROM celeriac_messages WHERE id = ? AND lease_owner IS NOT NULL RETURNING queue, payload"
)
_ADD_DEAD_LETTER = "INSERT INTO celeriac_dead_letters (queue, payload, reason, created) VALUES (?, ?, ?, ?)"
_RETURN_ORPHANS = """
    UPDATE celeriac_messages SET lease_owner = NULL
    WHERE lease_owner IS NOT NULL
      AND lease_owner NOT IN (SELECT consumer_id FROM celeriac_consumers WHERE lease_until >= ?)
"""
_FORGET_DEAD_CONSUMERS = "DELETE FROM celeriac_consumers WHERE lease_until < ?"
_RETURN_OWNED = "UPDATE celeriac_messages SET lease_owner = NULL WHERE lease_owner = ?"
_FORGET_CONSUMER = "DELETE FROM celeriac_consumers WHERE consumer_id = ?"
_PURGE = "DELETE FROM celeriac_messages WHERE queue = ? AND lease_owner IS NULL"
_SIZE = "SELECT count(*) FROM celeriac_messages WHERE queue = ? AND lease_owner IS NULL"
_SCHEDULED = (
    "SELECT count(*) FROM celeriac_messages WHERE queue = ? AND lease_owner IS NULL AND visible_at > ?"
)


class SQLiteBroker(Broker):
    """A durable broker in a SQLite file: no server, safe for every process on one host.

    Args:
        url: ``sqlite:///relative/path.db`` (relative to the current directory) or
            ``sqlite:////absolute/path.db``; ``sqla+sqlite://`` works too.
        options: `broker_transport_options`: `lease_timeout`, `polling_interval` (the longest
            pause between polls while waiting for messages) and `synchronous` (SQLite's
            pragma; NORMAL by default, which can lose the last commits on power loss but
            not on a crash).

    Raises:
        ImproperlyConfigured: The URL or an option is unusable.
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqlite", "sqla+sqlite")

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, options)
        self._file = SQLiteFile(
            database_path(url, "broker"),
            what="broker",
            error=OperationalError,
            synchronous=str(self.options.get("synchronous", "NORMAL")),
            prepare=self._prepare,
            on_fork=self._forked,
        )
        self.path = self._file.path
        self._schema_ready = False
        self._renewed_until = 0.0
        self._last_full = False

    # connections -----------------------------------------------------------------------

    def _prepare(self, connection: sqlite3.Connection) -> None:
        if self._schema_ready:
            return
        with self._file.transaction(connection):
            for statement in _SCHEMA:
                connection.execute(statement)
            row = connection.execute("SELECT max(version) FROM celeriac_broker_schema").fetchone()
            if row[0] is None:
                connection.execute(
                    "INSERT INTO celeriac_broker_schema (version) VALUES (?)", (SCHEMA_VERSION,)
                )
            elif row[0] > SCHEMA_VERSION:
                raise ImproperlyConfigured(
                    f"{self.path!r} holds broker tables of layout {row[0]}, newer than this celeriac "
                    f"understands ({SCHEMA_VERSION}); upgrade celeriac or use another file"
                )
        self._schema_ready = True

    def _forked(self) -> None:
        # The parent's consumer id and its leases are the parent's own; an id this process
        # was given (a prefork child's) stays.
        self._take_own_consumer_id()

    def _consumer_changed(self) -> None:
        # The consumer row renewed so far was the old id's: renew the new one on the next fetch.
        self._renewed_until = 0.0

    def close(self) -> None:
        """Close every connection this broker opened; the next call opens new ones.

        In a forked child the parent's connections are abandoned, never closed.
        """
        self._file.close()

    # producing -------------------------------------------------------------------------

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Store `messages` in one transaction.

        Args:
            messages: What to store; a message with an `eta` stays hidden until then.
        """
        if not messages:
            return
        now = time.time()
        rows = [
            (m.queue, clamp_priority(m.priority), now if m.eta is None else m.eta, m.payload, now)
            for m in messages
        ]
        connection = self._file.connection()
        with self._file.translated(), self._file.transaction(connection):
            connection.executemany(_INSERT, rows)

    # consuming -------------------------------------------------------------------------

    def fetch(self, queues: Sequence[str], limit: int, timeout: float) -> list[Delivery]:
        """Lease up to `limit` ready messages, most urgent then oldest first.

        Args:
            queues: Queue names to take from.
            limit: The most messages to return.
            timeout: Seconds to wait for a first message, polling at most every `polling_interval`.

        Returns:
            The leased messages, possibly none.
        """
        if limit <= 0 or not queues:
            return []
        names = _json_list(dict.fromkeys(queues))
        return poll_until(lambda: self._fetch_once(names, limit), timeout, self.polling_interval)

    def _fetch_once(self, names: str, limit: int) -> list[Delivery]:
        connection = self._file.connection()
        now = time.time()
        with self._file.translated():
            # A read first, so idle pollers never queue up for the write lock; skipped
            # while the queue is busy (the last fetch came back full).
            if not self._last_full and not connection.execute(_ANY_READY, (names, now)).fetchone()[0]:
                return []
            with self._file.transaction(connection):
                self._renew_if_due(connection, now)
                rows = connection.execute(_LEASE, (self.consumer_id, names, now, limit)).fetchall()
        self._last_full = len(rows) == limit
        rows.sort(key=lambda row: (-row[4], row[0]))
        return [Delivery(str(row[0]), row[1], bytes(row[2]), row[3]) for row in rows]

    def _renew_if_due(self, connection: sqlite3.Connection, now: float) -> None:
        # New leases are only safe under a consumer row that outlives them by a margin;
        # renewing once per half lease (not per fetch) keeps that true at a fraction of the writes.
        if now > self._renewed_until - self.lease_timeout / 2:
            connection.execute(_RENEW, (self.consumer_id, now + self.lease_timeout))
            self._renewed_until = now + self.lease_timeout

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete processed messages in one statement.

        Args:
            deliveries: Messages this broker's file handed out; ones no longer leased are ignored.
        """
        if deliveries:
            self._execute(_ACK, (_tags(deliveries),))

    def release(
        self, deliveries: Sequence[Delivery], *, eta: float | None = None, redelivered: bool = True
    ) -> None:
        """Return leased messages to their queues in one statement.

        Args:
            deliveries: Messages to give back; ones no longer leased are left alone.
            eta: Unix time they become visible again; now if None.
            redelivered: False to give them back as they were fetched: this fetch does not
                count as an attempt.
        """
        if deliveries:
            sql = _RELEASE if redelivered else _RELEASE_UNCOUNTED
            self._execute(sql, (time.time() if eta is None else eta, _tags(deliveries)))

    def _dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move a leased message to the dead letters in one transaction; False if it is no longer leased.

        Args:
            delivery: The message to set aside.
            reason: Why, for whoever reads `dead_letters()`.
        """
        connection = self._file.connection()
        with self._file.translated(), self._file.transaction(connection):
            row = connection.execute(_TAKE_LEASED, (int(delivery.tag),)).fetchone()
            if row is not None:
                connection.execute(_ADD_DEAD_LETTER, (row[0], row[1], reason, time.time()))
        return row is not None

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Return dead letters, oldest first.

        Args:
            queue: Only this queue's; all queues' if None.
            limit: The most to return.

        Returns:
            The dead letters.
        """
        select = "SELECT queue, payload, reason, created FROM celeriac_dead_letters"
        where, params = ("", ()) if queue is None else (" WHERE queue = ?", (queue,))
        rows = self._query(f"{select}{where} ORDER BY id LIMIT ?", (*params, max(limit, 0)))
        return [DeadLetter(row[0], bytes(row[1]), row[2], row[3]) for row in rows]

    def heartbeat(self, also: Sequence[str] = ()) -> int:
        """Renew this consumer's leases and return lapsed consumers' messages to their queues.

        Args:
            also: Other consumer ids whose leases to renew in the same transaction.

        Returns:
            How many messages went back.
        """
        connection = self._file.connection()
        now = time.time()
        until = now + self.lease_timeout
        with self._file.translated(), self._file.transaction(connection):
            connection.executemany(_RENEW, [(consumer, until) for consumer in (self.consumer_id, *also)])
            self._renewed_until = until
            returned = connection.execute(_RETURN_ORPHANS, (now,)).rowcount
            connection.execute(_FORGET_DEAD_CONSUMERS, (now,))
        if returned:
            logger.info("Returned %d messages of lapsed consumers to their queues", returned)
        return returned

    def reclaim(self, consumer_id: str) -> int:
        """Return every message leased to `consumer_id` to its queue now and drop its consumer row.

        Args:
            consumer_id: The consumer known to be gone; an unknown one holds nothing.

        Returns:
            How many messages went back (their next fetch counts as another attempt).
        """
        connection = self._file.connection()
        with self._file.translated(), self._file.transaction(connection):
            returned = connection.execute(_RETURN_OWNED, (consumer_id,)).rowcount
            connection.execute(_FORGET_CONSUMER, (consumer_id,))
        if consumer_id == self.consumer_id:
            self._renewed_until = 0.0
        return returned

    # administration --------------------------------------------------------------------

    def purge(self, queue: str) -> int:
        """Delete every waiting message of `queue`; leased ones stay.

        Args:
            queue: The queue to empty.

        Returns:
            How many messages were deleted.
        """
        return self._execute(_PURGE, (queue,))

    def size(self, queue: str) -> int:
        """Return how many messages wait in `queue`, delayed ones included.

        Args:
            queue: The queue to count.
        """
        return int(self._query(_SIZE, (queue,))[0][0])

    def scheduled(self, queue: str) -> int:
        """Return how many messages of `queue` wait for an eta still to come.

        Args:
            queue: The queue to count.
        """
        return int(self._query(_SCHEDULED, (queue, time.time()))[0][0])

    def _execute(self, sql: str, params: Sequence[Any]) -> int:
        with self._file.translated():
            return self._file.connection().execute(sql, params).rowcount

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._file.translated():
            return self._file.connection().execute(sql, params).fetchall()


def _tags(deliveries: Sequence[Delivery]) -> str:
    return _json_list(int(delivery.tag) for delivery in deliveries)


def _json_list(items: Iterable[object]) -> str:
    return json.dumps(list(items))
