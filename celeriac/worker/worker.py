"""`Worker`: wires the consumer, the pool and the heartbeat together, and handles shutdown.

SIGTERM or SIGINT asks for a warm shutdown: stop fetching, give prefetched messages back,
let running tasks finish. A second signal (or SIGQUIT) is a cold shutdown: children are
killed and messages not yet acked go back to the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from celeriac.exceptions import ImproperlyConfigured, OperationalError
from celeriac.worker import banner
from celeriac.worker.consumer import Consumer, Settings
from celeriac.worker.pools import create_pool

if TYPE_CHECKING:
    from celeriac.app import Celery

logger = logging.getLogger("celeriac.worker")
T = TypeVar("T")
CLEANUP_EVERY = 60.0
MAX_PREFETCH = 10_000


def expand_hostname(pattern: str | None) -> str:
    """Expand `%h` (host), `%n` (short host) and `%d` (domain) in a node name."""
    host = socket.gethostname()
    if not pattern:
        return f"celeriac@{host}"
    short, _, domain = host.partition(".")
    return pattern.replace("%h", host).replace("%n", short).replace("%d", domain)


class ColdShutdown(SystemExit):
    """Raised in the main thread by a second shutdown signal while a solo task runs."""


class Worker:
    """A worker node: one supervising process and its pool.

    Args:
        app: The app whose tasks this worker runs.
        hostname: Node name; `%h`, `%n` and `%d` are expanded (default `celeriac@<host>`).
        pool: `prefork`, `threads` or `solo`.
        concurrency: Pool size (default `worker_concurrency`, else the number of CPUs).
        queues: Queues to consume (default `task_default_queue`).
        prefetch_multiplier: Messages leased per pool slot (default `worker_prefetch_multiplier`).
    """

    def __init__(
        self,
        app: Celery,
        *,
        hostname: str | None = None,
        pool: str = "prefork",
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        prefetch_multiplier: int | None = None,
    ) -> None:
        self.app = app
        self.hostname = expand_hostname(hostname)
        self.pool_kind = pool
        if pool == "prefork" and app.broker_url.startswith("memory:"):
            raise ImproperlyConfigured(
                "the memory:// broker lives in one process: use --pool threads or solo"
            )
        size = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
        self.concurrency = 1 if pool == "solo" else int(size)
        self.queues = tuple(queues or (app.conf.task_default_queue,))
        multiplier = (
            app.conf.worker_prefetch_multiplier if prefetch_multiplier is None else prefetch_multiplier
        )
        limit = self.concurrency * int(multiplier) if multiplier else MAX_PREFETCH
        self.prefetch_limit = max(1, min(limit, MAX_PREFETCH))
        self._warm = threading.Event()
        self._cold = False
        self._cold_event = threading.Event()
        self._outages = 0
        self._stopped = threading.Event()
        self._consumer: Consumer | None = None

    # running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Start, serve until asked to stop, and shut down cleanly."""
        self.app.import_includes()
        pool = create_pool(self.pool_kind, self.app, self.concurrency)
        pool.start()  # fork before any thread exists
        broker = self.app.broker
        settings = Settings(
            hostname=self.hostname,
            queues=self.queues,
            prefetch_limit=self.prefetch_limit,
            max_deliveries=int(self.app.conf.worker_max_deliveries),
        )
        consumer = self._consumer = Consumer(self.app, broker, pool, settings)
        self._install_signals()
        sys.stdout.write(self.banner())
        sys.stdout.flush()
        heartbeat = threading.Thread(target=self._heartbeat, name="celeriac-heartbeat", daemon=True)
        heartbeat.start()
        logger.info("Connected to %s", banner.mask_url(self.app.broker_url))
        logger.info("%s ready.", self.hostname)
        try:
            self._serve(consumer)
        except ColdShutdown:
            self._cold = True
        finally:
            self._shutdown(consumer)
            self._stopped.set()
            heartbeat.join(timeout=5)

    def _serve(self, consumer: Consumer) -> None:
        while not self._warm.is_set():
            self._guarded(consumer.step)
        released = self._guarded(consumer.release_reserved)
        if released:
            logger.info("Returned %d prefetched message(s) to the queue", released)
        while consumer.active and not self._cold:
            self._guarded(lambda: consumer.step(fetching=False))

    def _guarded(self, action: Callable[[], T]) -> T | None:
        """Run `action`; if the broker is unreachable, log it, back off, and return None.

        The caller's loop tries again; messages this worker could not give back return
        to their queues when its leases lapse.
        """
        try:
            result = action()
        except OperationalError as exc:
            self._outages += 1
            pause = min(0.5 * 2 ** (self._outages - 1), 8.0)
            logger.error(
                "consumer: Cannot reach the broker at %s: %s. Trying again in %.1f seconds... (%d)",
                banner.mask_url(self.app.broker_url),
                exc,
                pause,
                self._outages,
            )
            (self._cold_event if self._warm.is_set() else self._warm).wait(pause)
            return None
        if self._outages:
            logger.info("consumer: Connected to %s again", banner.mask_url(self.app.broker_url))
            self._outages = 0
        return result

    def _shutdown(self, consumer: Consumer) -> None:
        if self._cold:
            consumer.pool.stop(cold=True)
            consumer.release_reserved()
            consumer.release_active()
        else:
            consumer.pool.stop(cold=False)
        self.app.close()
        logger.info("%s stopped.", self.hostname)

    def banner(self) -> str:
        """The startup banner text."""
        main = self.app.main or "__main__"
        return banner.render(
            hostname=self.hostname,
            app_label=f"{main}:{id(self.app):#x}",
            transport=self.app.broker_url,
            results=self.app.conf.result_backend,
            concurrency=self.concurrency,
            pool=self.pool_kind,
            queues=self.queues,
            tasks=list(self.app.tasks),
        )

    def stop(self) -> None:
        """Ask for a warm shutdown (from another thread or a signal handler)."""
        self._warm.set()

    # background duties -----------------------------------------------------------------

    def _heartbeat(self) -> None:
        broker = self.app.broker
        every = max(0.05, broker.lease_timeout / 3)
        since_cleanup = 0.0
        while not self._stopped.wait(every):
            try:
                recovered = broker.heartbeat()
                if recovered:
                    logger.warning("Returned %d message(s) of a lost worker to their queues", recovered)
                since_cleanup += every
                if since_cleanup >= CLEANUP_EVERY:
                    since_cleanup = 0.0
                    self._cleanup_results()
            except Exception:
                logger.exception("heartbeat failed; will try again")

    def _cleanup_results(self) -> None:
        backend = self.app.backend
        if backend is not None:
            backend.cleanup()

    # signals ---------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGQUIT, self._on_cold_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._warm.is_set():
            self._on_cold_signal(signum, frame)
            return
        # Set before logging: a second signal handled while the warning is written must be cold.
        self._warm.set()
        logger.warning("worker: Warm shutdown (MainProcess)")

    def _on_cold_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("worker: Cold shutdown (MainProcess)")
        self._cold = True
        self._cold_event.set()
        self._warm.set()
        if self.pool_kind == "solo":
            raise ColdShutdown(1)
