"""The shared page a prefork child records its running task in (`worker/pools/slots.py`)."""

from __future__ import annotations

import struct

from celeriac.brokers.base import Delivery
from celeriac.worker.pools.slots import RunningSlot


def sequence(slot: RunningSlot) -> int:
    """The record's sequence: the page's first 8 bytes, as the module's layout says."""
    raw = bytes(slot._map[:8])
    return int(struct.unpack("<q", raw)[0])


def test_a_slot_records_each_task_while_it_runs_and_nothing_between_tasks() -> None:
    # Given a child's slot
    slot = RunningSlot()
    first = Delivery("c|0|1", "celery", b"payload one", 1)
    second = Delivery("c|0|2", "mail", b"payload two", 3)

    # When a task runs, ends, and another runs with a hard limit
    slot.begin(first, None)
    during_first = slot.read()
    slot.end()
    between = slot.read(), slot.deadline()
    slot.begin(second, 30.0)
    during_second, deadline = slot.read(), slot.deadline()
    slot.end()

    # Then the parent reads each task while it runs, and nothing between or after them
    assert during_first is not None and during_first.delivery == first
    assert between == (None, None)
    assert during_second is not None and during_second.delivery == second
    assert during_second.hard_limit == 30.0
    assert deadline == during_second.started + 30.0
    assert (slot.read(), slot.deadline()) == (None, None)
    slot.close()


def test_a_slots_sequence_never_repeats_so_no_read_mixes_two_tasks() -> None:
    # Given a slot that ran one task
    slot = RunningSlot()
    delivery = Delivery("c|0|1", "celery", b"p", 1)
    slot.begin(delivery, None)
    running_first = sequence(slot)
    slot.end()

    # When the next task starts
    slot.begin(delivery, None)

    # Then its record carries a later, even sequence than the first task's
    assert running_first % 2 == 0
    assert sequence(slot) > running_first and sequence(slot) % 2 == 0
    slot.close()
