"""Soft and hard time limits inside the process or thread that runs a task."""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded


@contextmanager
def alarm_limits(soft: float | None, hard: float | None, hard_in_process: bool) -> Iterator[None]:
    """Raise `SoftTimeLimitExceeded` in the main thread at `soft` seconds.

    With `hard_in_process` also raise `TimeLimitExceeded` at `hard` (the solo pool, which has
    no parent to kill it); a prefork child leaves the hard limit to its parent.
    """
    hard = hard if hard_in_process else None
    if soft is None and hard is None:
        yield
        return
    first = min(limit for limit in (soft, hard) if limit is not None)
    stages = _stages(soft, hard)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        error, rest = stages.pop(0)
        if rest is not None:
            signal.setitimer(signal.ITIMER_REAL, rest)
        raise error

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, first)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stages(soft: float | None, hard: float | None) -> list[tuple[BaseException, float | None]]:
    if soft is not None and (hard is None or soft < hard):
        soft_error = SoftTimeLimitExceeded(f"soft time limit ({soft}s) exceeded")
        if hard is None:
            return [(soft_error, None)]
        return [(soft_error, hard - soft), (TimeLimitExceeded(hard), None)]
    return [(TimeLimitExceeded(hard), None)]


def raise_in_thread(thread: threading.Thread, error: type[BaseException]) -> bool:
    """Ask `thread` to raise `error` at its next Python instruction; True if it was found."""
    ident = thread.ident
    if ident is None:
        return False
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(error))
    return bool(done == 1)
