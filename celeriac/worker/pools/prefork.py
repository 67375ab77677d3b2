"""The prefork pool: N forked child processes, each a whole consumer of its own.

A child leases messages under a consumer id its parent chose, runs them one at a time and
settles them itself, so the parent does no work per task. The parent supervises: its
heartbeat renews the children's leases, it kills a child that passes a task's hard time
limit, it replaces children that die, and it returns a dead child's leased messages to
their queues at once instead of waiting for the lease to lapse. The parent learns what a
child runs from the child's `RunningSlot`, shared memory that needs no message per task.
Children die with the parent (PR_SET_PDEATHSIG): a SIGKILLed worker leaves no task behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

from celeriac.brokers.base import make_consumer_id
from celeriac.exceptions import OperationalError
from celeriac.protocol.message import read_task
from celeriac.worker.consumer import Consumer, Settings, log_completion
from celeriac.worker.execution import execute_safely, settle
from celeriac.worker.jobs import Completion, Job, Policy, make_job
from celeriac.worker.pools.base import hard_limit_completion, lost_completion
from celeriac.worker.pools.slots import Running, RunningSlot
from celeriac.worker.pools.solo import SoloPool
from celeriac.worker.serving import Guard, serve
from celeriac.worker.timelimits import alarm_limits

if TYPE_CHECKING:
    from celeriac.app import Celery

logger = logging.getLogger("celeriac.worker")
_PR_SET_PDEATHSIG = 1
WATCH_EVERY = 0.1  # how often the parent looks at hard limits; a child's death wakes it at once
GIVE_BACK_AFTER = 0.2  # a child running a task this long gives its prefetched messages back


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _ChildPool(SoloPool):
    """Runs each job inline in the child, recording it in the slot its parent watches."""

    def __init__(self, app: Celery, slot: RunningSlot) -> None:
        super().__init__(app, 1)
        self._slot = slot
        self.running_since: float | None = None  # read by the give-back thread

    def run(self, job: Job) -> Completion:
        self.running_since = self._slot.begin(job.delivery, job.hard_limit)
        try:
            if job.soft_limit is None:
                return execute_safely(self.app, job)
            # The soft limit is raised here; the hard one is the parent's to enforce by killing.
            with alarm_limits(job.soft_limit, job.hard_limit, hard_in_process=False):
                return execute_safely(self.app, job)
        finally:
            self.running_since = None
            self._slot.end()


def _give_back_while_busy(consumer: Consumer, pool: _ChildPool, stop: threading.Event) -> None:
    """Return a child's prefetched messages once its task runs long, so idle siblings take them.

    A child leases up to its prefetch limit for speed; without this, messages held behind a
    long task would wait for it while other children sit idle.
    """
    while not stop.wait(GIVE_BACK_AFTER / 4):
        since = pool.running_since
        if since is None or not consumer.reserved or time.monotonic() - since < GIVE_BACK_AFTER:
            continue
        try:
            returned = consumer.release_reserved()
        except OperationalError as exc:
            logger.error("Could not give prefetched messages back while a long task runs: %s", exc)
            continue
        if returned:
            logger.info("Returned %d prefetched message(s) to the queue while a long task runs", returned)


def _child_main(
    app: Celery, settings: Settings, consumer_id: str, slot: RunningSlot, parent_pid: int
) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    warm, cold = threading.Event(), threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        warm.set()  # the parent asks for a warm stop; a cold one is SIGKILL

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    signal.signal(signal.SIGTERM, on_term)
    app.reset_after_fork()
    broker = app.broker
    broker.consumer_id = consumer_id  # the parent renews and, if this child dies, reclaims it
    pool = _ChildPool(app, slot)
    consumer = Consumer(app, broker, pool, settings)
    giver = threading.Thread(target=_give_back_while_busy, args=(consumer, pool, cold), daemon=True)
    giver.start()
    serve(consumer, Guard(app.broker_url, warm, cold))
    cold.set()  # stops the give-back thread
    giver.join()
    app.close()


@dataclass(slots=True)
class _Child:
    process: BaseProcess
    consumer_id: str
    slot: RunningSlot


class PreforkPool:
    """`size` child consumers and the parent's supervision of them.

    Args:
        app: The app; its broker in the parent renews, reclaims and settles for the children.
        size: How many children.
        settings: Each child's consumer settings (its prefetch limit is per child).
    """

    name = "prefork"

    def __init__(self, app: Celery, size: int, settings: Settings) -> None:
        self.app = app
        self.size = max(1, size)
        self.settings = settings
        self._context = multiprocessing.get_context("fork")
        self._children: list[_Child] = []
        self._lock = threading.Lock()  # the heartbeat thread reads the consumer ids
        self._stopping = False

    def start(self) -> None:
        """Fork the children (before the parent starts any thread)."""
        for _ in range(self.size):
            self._spawn()

    def consumer_ids(self) -> list[str]:
        """The children's consumer ids, whose leases the parent's heartbeat renews."""
        with self._lock:
            return [child.consumer_id for child in self._children]

    def _spawn(self) -> None:
        consumer_id, slot = make_consumer_id(), RunningSlot()
        args = (self.app, self.settings, consumer_id, slot, os.getpid())
        process = self._context.Process(target=_child_main, args=args, name="celeriac-child", daemon=False)
        with self._lock:
            self._children.append(_Child(process, consumer_id, slot))
        process.start()

    # supervising -----------------------------------------------------------------------

    def supervise(self, stop: threading.Event) -> None:
        """Watch the children until `stop` is set."""
        while not stop.is_set():
            self.watch(WATCH_EVERY)

    def watch(self, timeout: float) -> None:
        """Wait up to `timeout` for a child to die or a hard limit to pass, then deal with it."""
        children = list(self._children)
        if not children:
            return
        deadlines = [due for due in (child.slot.deadline() for child in children) if due is not None]
        bound = max(0.0, min([timeout, *(due - time.monotonic() for due in deadlines)]))
        wait([child.process.sentinel for child in children], bound)
        for child in children:
            if not child.process.is_alive():
                self._bury(child, over_limit=False)
            elif (due := child.slot.deadline()) is not None and time.monotonic() >= due:
                child.process.kill()
                self._bury(child, over_limit=True)

    def _bury(self, child: _Child, *, over_limit: bool) -> None:
        """Settle what a dead child was running, return its other messages, and replace it."""
        running = self._forget(child)
        if running is not None:
            self._report(child, running, over_limit)
        self._reclaim(child)
        if not self._stopping:
            self._spawn()

    def _forget(self, child: _Child) -> Running | None:
        """Reap a stopped child and drop it; return what it was running, if anything."""
        child.process.join()
        with self._lock:
            self._children.remove(child)
        running = child.slot.read()
        child.slot.close()
        return running

    def _report(self, child: _Child, running: Running, over_limit: bool) -> None:
        delivery = running.delivery
        if delivery is None:
            logger.error("A child died running a message too large to record; it returns to its queue")
            return
        try:
            message = read_task(delivery.payload, self.app.accept_content)
        except Exception:  # it decoded in the child; nothing more can be done here
            logger.exception("Could not read the message a dead child was running")
            return
        task = self.app.tasks.get(message.name)
        if task is None:
            return
        job = make_job(0, delivery, message, Policy.of(self.app, task), self.settings.hostname)
        runtime = time.monotonic() - running.started
        if over_limit and running.hard_limit is not None and runtime >= running.hard_limit:
            completion = hard_limit_completion(self.app, job, runtime)
        else:
            completion = self._lost(child, job, runtime)
        log_completion(message, completion)
        try:
            settle(self.app.broker, job, completion)
        except OperationalError as exc:
            logger.error("Could not settle %s[%s]: %s", message.name, message.id, exc)

    def _lost(self, child: _Child, job: Job, runtime: float) -> Completion:
        code = child.process.exitcode
        detail = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        logger.error("Process running %s[%s] died (%s)", job.message.name, job.message.id, detail)
        requeue = job.policy.acks_late and _reject_on_lost(self.app, job.task)
        return lost_completion(self.app, job, runtime, detail, requeue)

    def _reclaim(self, child: _Child) -> None:
        try:
            returned = self.app.broker.reclaim(child.consumer_id)
        except OperationalError as exc:
            logger.error(
                "Could not return a stopped child's messages now (they return when its lease lapses): %s", exc
            )
            return
        if returned:
            logger.info("Returned %d message(s) of a stopped child to their queues", returned)

    # stopping --------------------------------------------------------------------------

    def stop(self, cold: threading.Event) -> None:
        """Warm stop: ask each child to finish its task and give back the rest; wait for them.

        Hard limits are still enforced meanwhile. If `cold` is set while waiting, kill them.
        """
        self.ask_to_stop()
        while self._children and not cold.is_set():
            self.watch(WATCH_EVERY)
        if self._children:
            self.kill()

    def ask_to_stop(self) -> None:
        """Send each child SIGTERM: it finishes its task, gives back what it prefetched, and exits.

        Safe in a signal handler; dead children are no longer replaced.
        """
        self._stopping = True
        for child in list(self._children):
            if child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        """Cold stop: kill every child and return its unacked messages to their queues."""
        self._stopping = True
        children = list(self._children)
        for child in children:
            child.process.kill()
        for child in children:
            self._forget(child)  # what it ran goes back with the rest: a cold stop settles nothing
            self._reclaim(child)


def _reject_on_lost(app: Celery, task: object) -> bool:
    reject = getattr(task, "reject_on_worker_lost", None)
    if reject is None:
        reject = app.conf.task_reject_on_worker_lost
    return bool(reject)
