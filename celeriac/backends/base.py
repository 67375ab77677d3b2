"""The result backend interface, and the logic every backend shares.

A backend stores one document per task id: Celery's task meta,
``{"status", "result", "traceback", "children", "date_done", "task_id", ...}``,
serialised with `result_serializer`. Failures are stored in the
``{"exc_type", "exc_message", "exc_module"}`` form. Subclasses implement only
`_store`, `_load`, `_delete` (and may override `wait` to be told instead of polling).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from celeriac import states
from celeriac.exceptions import ProtocolError, TimeoutError
from celeriac.protocol import serializers
from celeriac.protocol.failures import encode_exception

TaskMeta = dict[str, Any]
DEFAULT_EXPIRES = 86400.0


def pending_meta(task_id: str) -> TaskMeta:
    """The meta of a task the backend knows nothing about."""
    return {
        "status": states.PENDING,
        "result": None,
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": task_id,
    }


class ResultBackend(ABC):
    """Stores task states and results.

    Args:
        url: The backend URL; its scheme chose this class.
        serializer: Name of the serializer for stored documents (`result_serializer`).
        expires: Seconds a ready result is kept (`result_expires`); None keeps it forever.
        accept: Content types accepted when reading results back (`result_accept_content`).
    """

    schemes: tuple[str, ...] = ()

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        expires: float | None = DEFAULT_EXPIRES,
        accept: frozenset[str] | None = None,
    ) -> None:
        self.url = url
        self.serializer = serializers.by_name(serializer)
        self.expires = expires if expires else None
        self.accept = accept if accept is not None else frozenset({self.serializer.content_type})

    # what subclasses implement ---------------------------------------------------------

    @abstractmethod
    def _store(self, task_id: str, state: str, document: bytes, expires: float | None) -> None:
        """Write `document` for `task_id`, unless a SUCCESS is already stored there."""

    @abstractmethod
    def _load(self, task_id: str) -> bytes | None:
        """Return the stored document for `task_id`, or None (missing or expired)."""

    @abstractmethod
    def _delete(self, task_id: str) -> None:
        """Remove whatever is stored for `task_id`."""

    def cleanup(self) -> int:
        """Delete expired results now; return how many. Backends whose store expires keys need not."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the backend may be used again afterwards."""

    def reset_after_fork(self) -> None:
        """Drop connections inherited from a parent process."""
        self.close()

    # the shared logic ------------------------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Record `state` and `result` (an exception for the failure states) for `task_id`."""
        meta = self.build_meta(task_id, result, state, traceback=traceback, extra=extra)
        expires = self.expires if state in states.READY_STATES else None
        self._store(task_id, state, self.encode(meta), expires)

    def build_meta(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> TaskMeta:
        """Lay out a task meta document in Celery's field order."""
        if isinstance(result, BaseException):
            result = encode_exception(result)
        done = datetime.now(UTC).isoformat() if state in states.READY_STATES else None
        meta: TaskMeta = {
            "status": state,
            "result": result,
            "traceback": traceback,
            "children": [],
            "date_done": done,
        }
        if extra:
            meta.update(extra)
        meta["task_id"] = task_id
        return meta

    def encode(self, meta: TaskMeta) -> bytes:
        """Serialise a meta document, saying plainly when the result cannot be serialised."""
        try:
            return self.serializer.dumps(meta)
        except TypeError as exc:
            kind = type(meta.get("result")).__name__
            raise ProtocolError(
                f"cannot store result of type {kind} with the {self.serializer.name} serializer: {exc}"
            ) from exc

    def decode(self, document: bytes) -> TaskMeta:
        """Read a stored meta document."""
        meta = serializers.loads(document, self.serializer.content_type, self.accept)
        if not isinstance(meta, dict):
            raise ProtocolError("stored result is not a task meta document")
        return meta

    def get_meta(self, task_id: str) -> TaskMeta:
        """Return the meta for `task_id`; a task never stored is PENDING."""
        document = self._load(task_id)
        return pending_meta(task_id) if document is None else self.decode(document)

    def wait(self, task_id: str, timeout: float | None, interval: float) -> TaskMeta:
        """Return the meta of `task_id` once it is ready, polling every `interval` at most.

        Raises:
            TimeoutError: `timeout` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = min(0.0005, interval)
        while True:
            meta = self.get_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("The operation timed out.")
            wait_for = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(wait_for)
            pause = min(pause * 2, interval)

    def forget(self, task_id: str) -> None:
        """Remove the stored result of `task_id`."""
        self._delete(task_id)

    # chords ----------------------------------------------------------------------------

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Record how many header tasks the chord `group_id` waits for (before any is sent)."""
        self._chord_set_size(group_id, size)

    def chord_part_done(
        self, group_id: str, index: int, task_id: str, state: str, result: Any
    ) -> list[TaskMeta] | None:
        """Record one header task's outcome.

        Returns:
            Every part's meta, ordered by index, to the one caller whose part completed the
            set (exactly once, however many workers report at the same moment); else None.
        """
        if isinstance(result, BaseException):
            result = encode_exception(result)
        part = self.encode({"status": state, "result": result, "task_id": task_id})
        documents = self._chord_add(group_id, index, task_id, part)
        return None if documents is None else [self.decode(document) for document in documents]

    def _chord_set_size(self, group_id: str, size: int) -> None:
        raise NotImplementedError(f"the {type(self).__name__} result backend does not support chords")

    def _chord_add(self, group_id: str, index: int, task_id: str, part: bytes) -> list[bytes] | None:
        raise NotImplementedError(f"the {type(self).__name__} result backend does not support chords")
