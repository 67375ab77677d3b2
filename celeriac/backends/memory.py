"""An in-process result backend: a dict behind a condition variable.

Results live only as long as the backend object and are visible only inside this
process, which makes it the backend for tests, eager mode and in-process workers.
Waiters are woken by the store itself, so `wait` never polls.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from celeriac import states
from celeriac.backends.base import DEFAULT_EXPIRES, ResultBackend, TaskMeta
from celeriac.exceptions import TimeoutError


class _Entry(NamedTuple):
    state: str
    document: bytes
    # On the monotonic clock: entries never leave this process, and wall-clock
    # jumps must not expire (or resurrect) results.
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class MemoryBackend(ResultBackend):
    """Keeps results in this process's memory; safe to share between threads.

    Args:
        url: ``memory://`` or ``cache+memory://`` (Celery's spelling).
        serializer: Name of the serializer for stored documents (`result_serializer`).
        expires: Seconds a ready result is kept (`result_expires`); None keeps it forever.
        accept: Content types accepted when reading results back (`result_accept_content`).
    """

    schemes = ("memory", "cache+memory")

    def __init__(
        self,
        url: str = "memory://",
        *,
        serializer: str = "json",
        expires: float | None = DEFAULT_EXPIRES,
        accept: frozenset[str] | None = None,
    ) -> None:
        super().__init__(url, serializer=serializer, expires=expires, accept=accept)
        self._entries: dict[str, _Entry] = {}
        self._changed = threading.Condition()
        # chord group id -> (size, {task_id: (index, part)}); a group is dropped once complete
        self._chords: dict[str, tuple[int, dict[str, tuple[int, bytes]]]] = {}

    def _live(self, task_id: str) -> _Entry | None:
        # Callers hold self._changed.
        entry = self._entries.get(task_id)
        if entry is None or entry.expired(time.monotonic()):
            return None
        return entry

    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        expires_at = None if expires is None else time.monotonic() + expires
        with self._changed:
            current = self._live(task_id)
            if current is not None and current.state == states.SUCCESS:
                return
            self._entries[task_id] = _Entry(state, document, expires_at)
            self._changed.notify_all()

    def _load(self, task_id: str) -> bytes | None:
        with self._changed:
            entry = self._live(task_id)
        return None if entry is None else entry.document

    def _delete(self, task_id: str) -> None:
        with self._changed:
            self._entries.pop(task_id, None)

    def cleanup(self) -> int:
        """Drop expired results now.

        Returns:
            How many results were dropped.
        """
        now = time.monotonic()
        with self._changed:
            expired = [task_id for task_id, entry in self._entries.items() if entry.expired(now)]
            for task_id in expired:
                del self._entries[task_id]
        return len(expired)

    def reset_after_fork(self) -> None:
        """Replace the lock, which another thread of the parent may have held at the fork."""
        self._changed = threading.Condition()

    def wait(self, task_id: str, timeout: float | None, interval: float) -> TaskMeta:
        """Return the meta of `task_id` once it is ready, woken by the store itself.

        Args:
            task_id: The task to wait for.
            timeout: Seconds to wait at most; None waits forever.
            interval: Unused: a store wakes waiters at once, so there is nothing to poll.

        Returns:
            The task's meta, whose status is one of `states.READY_STATES`.

        Raises:
            TimeoutError: `timeout` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                entry = self._live(task_id)
                if entry is not None and entry.state in states.READY_STATES:
                    document = entry.document
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("The operation timed out.")
                self._changed.wait(remaining)
        # Decode outside the lock so a slow decode never holds up writers.
        return self.decode(document)

    def _chord_set_size(self, group_id: str, size: int) -> None:
        with self._changed:
            self._chords[group_id] = (size, {})

    def _chord_add(self, group_id: str, index: int, task_id: str, part: bytes) -> list[bytes] | None:
        with self._changed:
            size, parts = self._chords.get(group_id, (0, {}))
            if group_id not in self._chords:
                return None
            parts[task_id] = (index, part)
            if len(parts) < size:
                return None
            del self._chords[group_id]
        return [document for _, document in sorted(parts.values(), key=lambda item: item[0])]
