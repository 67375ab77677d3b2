"""The consuming loop a worker process runs, and its patience with an unreachable broker.

The solo and threads pools run it in the worker's main process; each prefork child runs
its own copy. A warm stop ends fetching, gives prefetched messages back unchanged and
lets running tasks finish; a cold stop abandons them.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from celeriac.exceptions import OperationalError
from celeriac.worker import banner
from celeriac.worker.consumer import Consumer

logger = logging.getLogger("celeriac.worker")
T = TypeVar("T")
LONGEST_PAUSE = 8.0


class Guard:
    """Runs broker actions; when the broker is unreachable, logs it and backs off.

    Args:
        broker_url: Shown (masked) in the log lines.
        warm: Set when the worker stops fetching; a backoff pause ends early when it is set.
        cold: Set on a cold shutdown; ends a backoff pause taken while stopping.
    """

    def __init__(self, broker_url: str, warm: threading.Event, cold: threading.Event) -> None:
        self.url = banner.mask_url(broker_url)
        self.warm = warm
        self.cold = cold
        self.outages = 0

    def __call__(self, action: Callable[[], T]) -> T | None:
        """Run `action`; if the broker cannot be reached, log, pause and return None.

        The caller's loop tries again; messages a failed call could not give back return
        to their queues when this consumer's leases lapse.
        """
        try:
            result = action()
        except OperationalError as exc:
            self.outages += 1
            pause = min(0.5 * 2 ** (self.outages - 1), LONGEST_PAUSE)
            logger.error(
                "consumer: Cannot reach the broker at %s: %s. Trying again in %.1f seconds... (%d)",
                self.url,
                exc,
                pause,
                self.outages,
            )
            (self.cold if self.warm.is_set() else self.warm).wait(pause)
            return None
        if self.outages:
            logger.info("consumer: Connected to %s again", self.url)
            self.outages = 0
        return result


def serve(consumer: Consumer, guard: Guard) -> None:
    """Consume until `guard.warm` is set, give prefetched messages back, finish running tasks."""
    step = functools.partial(consumer.step, stop=guard.warm)
    while not guard.warm.is_set():
        guard(step)
    released = guard(consumer.release_reserved)
    if released:
        logger.info("Returned %d prefetched message(s) to the queue", released)
    while consumer.active and not guard.cold.is_set():
        guard(lambda: consumer.step(fetching=False))
