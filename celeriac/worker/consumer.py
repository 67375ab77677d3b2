"""The consumer: lease messages, vet them, feed the pool, ack, and give back what it cannot run.

Early ack (the default) acks a message just before its task starts; `acks_late` acks
after the task ends, so a task whose worker dies mid-run is delivered again. Messages
fetched but not started stay leased, never acked, so a dead worker's prefetched
messages return to the queue when its lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.brokers.base import Broker, Delivery
from celeriac.exceptions import ContentDisallowed, NotRegistered, ProtocolError, WorkerLostError
from celeriac.protocol.message import TaskMessage, read_task
from celeriac.worker.execution import is_expired, revoke_expired, settle
from celeriac.worker.jobs import Completion, Job, Policy, make_job
from celeriac.worker.pools.base import Pool

if TYPE_CHECKING:
    from celeriac.app import Celery
    from celeriac.task import Task

logger = logging.getLogger("celeriac.worker")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the consumer needs to know about its worker."""

    hostname: str
    queues: tuple[str, ...]
    prefetch_limit: int
    max_deliveries: int
    idle_wait: float = 1.0


class Consumer:
    """Moves messages from the broker through the pool and acks them."""

    def __init__(self, app: Celery, broker: Broker, pool: Pool, settings: Settings) -> None:
        self.app = app
        self.broker = broker
        self.pool = pool
        self.settings = settings
        self.accept = app.accept_content
        self.reserved: deque[Job] = deque()
        self.active: dict[int, Job] = {}
        self.processed = 0
        self._next_key = 0
        self._policies: dict[str, Policy] = {}  # by task name; settings do not change while serving

    # the loop --------------------------------------------------------------------------

    def step(self, fetching: bool = True, stop: threading.Event | None = None) -> None:
        """Fetch what the prefetch budget allows, start what the pool can take, collect what ended.

        A pool that runs jobs in this thread runs them here, one after another, until the
        prefetch wants topping up or `stop` is set.
        """
        if fetching:
            self._fetch()
        run = self.pool.inline_runner()
        if run is not None and stop is not None:
            self._run_here(run, stop, self.settings.prefetch_limit // 4 if fetching else -1)
            return
        self._dispatch()
        waiting = bool(self.reserved) and self.pool.free_slots() > 0
        for completion in self.pool.collect(0.0 if waiting else 0.5):
            self._complete(completion)

    def _fetch(self) -> None:
        limit = self.settings.prefetch_limit
        budget = limit - len(self.reserved) - len(self.active)
        if budget <= 0 or len(self.reserved) > limit // 4:
            # Top up in large batches, not one message per finished task: each fetch costs
            # about as much again as the messages it brings.
            return
        busy = bool(self.reserved or self.active)
        timeout = 0.0 if busy else self.settings.idle_wait
        for delivery in self.broker.fetch(self.settings.queues, budget, timeout):
            self._receive(delivery)

    # receiving -------------------------------------------------------------------------

    def _receive(self, delivery: Delivery) -> None:
        message = self._decode(delivery)
        if message is None:
            return
        task = self._vet(delivery, message)
        if task is None:
            return
        if logger.isEnabledFor(logging.INFO):  # the arguments cost more than the check
            logger.info("Task %s[%s] received", task.name, message.id)
        self.reserved.append(self._job(delivery, message, task))

    def _decode(self, delivery: Delivery) -> TaskMessage | None:
        try:
            return read_task(delivery.payload, self.accept)
        except ContentDisallowed as exc:
            self.dead_letter(delivery, str(exc))
        except ProtocolError as exc:
            self.dead_letter(delivery, f"undecodable message: {exc}")
        except Exception as exc:  # decoding does no I/O, so any other error is the message's fault
            logger.exception("Unexpected error while decoding a message from %r", delivery.queue)
            self.dead_letter(delivery, f"undecodable message: {type(exc).__name__}: {exc}")
        return None

    def _vet(self, delivery: Delivery, message: TaskMessage) -> Task[Any, Any] | None:
        """The task to run `message` with, or None if the message is set aside or parked."""
        task = self.app.tasks.get(message.name)
        if task is None:
            self.dead_letter(delivery, f"NotRegistered: no task named {message.name!r} in this worker")
            self._store_failure(message, NotRegistered(message.name))
            return None
        if delivery.attempts > self.settings.max_deliveries:
            reason = f"delivered {delivery.attempts} times without completing (max_deliveries)"
            self.dead_letter(delivery, reason)
            self._store_failure(message, WorkerLostError(f"Task given up: {reason}"))
            return None
        eta = message.eta
        if eta is not None and eta.timestamp() > time.time() + 0.001:
            self.broker.release([delivery], eta=eta.timestamp())  # delayed work waits in the broker
            return None
        return task

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Set a message aside with `reason`; it is kept, never dropped."""
        logger.error("Message from queue %r moved to the dead-letter queue: %s", delivery.queue, reason)
        self.broker.dead_letter(delivery, reason)

    def _store_failure(self, message: TaskMessage, exc: BaseException) -> None:
        backend = self.app.backend
        if backend is not None:
            backend.store_result(message.id, exc, states.FAILURE)

    def _job(self, delivery: Delivery, message: TaskMessage, task: Task[Any, Any]) -> Job:
        self._next_key += 1
        policy = self._policies.get(task.name)
        if policy is None:
            policy = self._policies[task.name] = Policy.of(self.app, task)
        return make_job(self._next_key, delivery, message, policy, self.settings.hostname)

    # running ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self.reserved and self.pool.free_slots() > 0:
            job = self._next_job()
            if job is None:
                break
            self.active[job.key] = job
            self.pool.submit(job)  # the pool's process acks it when the task starts (or ends)

    def _run_here(self, run: Callable[[Job], Completion], stop: threading.Event, floor: int) -> None:
        """Run reserved jobs in this thread until no more than `floor` are left (at least one)."""
        reserved, active = self.reserved, self.active
        while not stop.is_set():
            job = self._next_job()
            if job is None:
                return
            active[job.key] = job
            self._complete(run(job))  # the job acks its message when its task starts (or ends)
            if len(reserved) <= floor:
                return

    def _next_job(self) -> Job | None:
        """The next reserved job worth starting; expired ones are revoked and acked on the way."""
        while True:
            try:
                job = self.reserved.popleft()
            except IndexError:  # none, or given back meanwhile by a prefork child's give-back thread
                return None
            message = job.message
            if not is_expired(message):
                return job
            logger.info("Task %s[%s] expired: revoked", message.name, message.id)
            revoke_expired(self.app, message)
            self.broker.ack([job.delivery])

    def _complete(self, completion: Completion) -> None:
        job = self.active.pop(completion.key, None)
        if job is None:
            return
        self.processed += 1
        log_completion(job.message, completion)
        if not completion.settled:
            settle(self.broker, job, completion)  # logs a dead-lettering itself

    # stopping --------------------------------------------------------------------------

    def release_reserved(self) -> int:
        """Give prefetched, unstarted messages back to the queue unchanged; return how many.

        Those the pool holds but has not started come back first (they were reserved first).
        They never ran, so they are not marked redelivered and do not count toward
        `worker_max_deliveries`.
        """
        deliveries = []
        for job in self.pool.withdraw():
            self.active.pop(job.key, None)
            deliveries.append(job.delivery)
        while True:  # popped one by one: a prefork child's give-back thread may race its main thread
            try:
                deliveries.append(self.reserved.popleft().delivery)
            except IndexError:
                break
        if deliveries:
            self.broker.release(deliveries, redelivered=False)
        return len(deliveries)

    def release_active(self) -> None:
        """Give back the messages of stopped tasks that were not acked yet (cold shutdown).

        Messages already acked (early ack) are gone from the broker; releasing them does nothing.
        """
        deliveries = [job.delivery for job in self.active.values()]
        self.active.clear()
        if deliveries:
            self.broker.release(deliveries)


def log_completion(message: TaskMessage, completion: Completion) -> None:
    """Log a finished task the way Celery's worker does at info level."""
    if completion.state == states.SUCCESS and not logger.isEnabledFor(logging.INFO):
        return  # the common case, without building the line's arguments
    name, task_id = message.name, message.id
    if completion.state == states.SUCCESS:
        logger.info(
            "Task %s[%s] succeeded in %.6fs: %s", name, task_id, completion.runtime, completion.summary
        )
    elif completion.state == states.RETRY:
        logger.info("Task %s[%s] retry: %s", name, task_id, completion.summary)
    elif completion.state == states.FAILURE:
        logger.error(
            "Task %s[%s] raised unexpected: %s\n%s",
            name,
            task_id,
            completion.summary,
            completion.traceback or "",
        )
    else:
        logger.info("Task %s[%s] %s", name, task_id, completion.state.lower())
