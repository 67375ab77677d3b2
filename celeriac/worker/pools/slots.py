"""What a prefork child is running, in memory its parent can read without asking.

Each child writes the message it starts into its own shared page and clears it when the
task ends. The parent reads it only to enforce hard time limits and, when a child dies, to
learn which task died with it; nothing crosses a pipe per task.

Layout: a header ``<q d d i i i q`` (sequence, start time, hard limit, and the lengths of the
tag, the queue name and the payload, then the delivery's attempt count), followed by those
three byte strings. The sequence is odd while the child writes, so a reader never takes a
torn record (a seqlock). It only grows, so a reader that sees the same even number before and
after reading took one record, not parts of two tasks'. A start time of -1 means idle.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

from celeriac.brokers.base import Delivery

_FIELDS = "ddiiiq"  # start time, hard limit, the three lengths, attempts
_HEADER = struct.Struct("<q" + _FIELDS)
_SEQ = struct.Struct("<q")
_BODY = struct.Struct("<" + _FIELDS)  # the header after the sequence, written with the strings
_IDLE = struct.Struct("<d")  # the start time, -1 between tasks
CAPACITY = 1 << 20  # a payload that does not fit is not recorded; the parent then cannot settle it
_TRIES = 100


@dataclass(frozen=True, slots=True)
class Running:
    """The task a child was running: its leased message, when it began and its hard limit."""

    delivery: Delivery | None  # None when the payload was too large to record
    started: float  # time.monotonic() of the child, which is the same clock as the parent's
    hard_limit: float | None


class RunningSlot:
    """One child's record of the task it is running; written by the child, read by the parent."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, CAPACITY)  # anonymous and shared: a forked child writes the same pages
        self._seq = 0
        self._names: dict[str, bytes] = {}  # queue names, encoded once

    def begin(self, delivery: Delivery, hard_limit: float | None) -> float:
        """Record that `delivery`'s task starts now (in the child); return now, in `time.monotonic()`."""
        tag, payload = delivery.tag.encode(), delivery.payload
        queue = self._names.get(delivery.queue)
        if queue is None:
            queue = self._names[delivery.queue] = delivery.queue.encode()
        size = len(payload)
        if _HEADER.size + len(tag) + len(queue) + size > CAPACITY:
            payload, size = b"", -1
        seq, started = self._seq + 1, time.monotonic()
        fields = _BODY.pack(started, hard_limit or 0.0, len(tag), len(queue), size, delivery.attempts)
        record = fields + tag + queue + payload
        _SEQ.pack_into(self._map, 0, seq)  # odd: a reader retries until the record is whole
        self._map[_SEQ.size : _SEQ.size + len(record)] = record
        _SEQ.pack_into(self._map, 0, seq + 1)
        self._seq = seq + 1
        return started

    def end(self) -> None:
        """Record that the task ended (in the child)."""
        seq = self._seq + 1
        _SEQ.pack_into(self._map, 0, seq)
        _IDLE.pack_into(self._map, _SEQ.size, -1.0)
        _SEQ.pack_into(self._map, 0, seq + 1)
        self._seq = seq + 1

    def deadline(self) -> float | None:
        """The monotonic time at which the running task passes its hard limit, if any (in the parent)."""
        for _ in range(_TRIES):
            seq, started, hard, *_ = _HEADER.unpack_from(self._map, 0)
            if seq % 2 == 0 and _SEQ.unpack_from(self._map, 0)[0] == seq:
                return started + hard if hard > 0 and started >= 0 else None
        return None

    def read(self) -> Running | None:
        """The running task's record, or None if the child was idle (in the parent, child stopped)."""
        seq, started, hard, tag_len, queue_len, payload_len, attempts = _HEADER.unpack_from(self._map, 0)
        if seq == 0 or seq % 2 == 1 or started < 0:  # never used, the child died mid-write, or idle
            return None
        at = _HEADER.size
        tag = self._map[at : at + tag_len].decode()
        at += tag_len
        queue = self._map[at : at + queue_len].decode()
        at += queue_len
        delivery = None
        if payload_len >= 0:
            delivery = Delivery(tag, queue, bytes(self._map[at : at + payload_len]), attempts)
        return Running(delivery, started, hard if hard > 0 else None)

    def close(self) -> None:
        """Unmap the page."""
        self._map.close()
