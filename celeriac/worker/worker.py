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
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING

from celeriac.exceptions import ImproperlyConfigured
from celeriac.worker import banner
from celeriac.worker.consumer import Consumer, Settings
from celeriac.worker.pools import create_pool
from celeriac.worker.pools.prefork import PreforkPool
from celeriac.worker.serving import Guard, serve

if TYPE_CHECKING:
    from celeriac.app import Celery

logger = logging.getLogger("celeriac.worker")
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
        self._cold_event = threading.Event()
        self._stopped = threading.Event()
        self._prefork: PreforkPool | None = None
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat, name="celeriac-heartbeat", daemon=True
        )

    # running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Start, serve until asked to stop, and shut down cleanly."""
        self.app.import_includes()
        settings = Settings(
            hostname=self.hostname,
            queues=self.queues,
            prefetch_limit=self.prefetch_limit,
            max_deliveries=int(self.app.conf.worker_max_deliveries),
        )
        if self.pool_kind == "prefork":
            self._run_supervisor(settings)
        else:
            self._run_consumer(settings)

    def _run_consumer(self, settings: Settings) -> None:
        pool = create_pool(self.pool_kind, self.app, self.concurrency, halt=self._warm)
        pool.start()
        consumer = Consumer(self.app, self.app.broker, pool, settings)
        self._started()
        try:
            serve(consumer, Guard(self.app.broker_url, self._warm, self._cold_event))
        except ColdShutdown:
            self._cold_event.set()
        finally:
            if self._cold_event.is_set():
                pool.stop(cold=True)
                consumer.release_reserved()
                consumer.release_active()
            else:
                pool.stop(cold=False)
            self._stopped_all()

    def _run_supervisor(self, settings: Settings) -> None:
        per_child = replace(settings, prefetch_limit=max(1, self.prefetch_limit // self.concurrency))
        pool = self._prefork = PreforkPool(self.app, self.concurrency, per_child)
        pool.start()  # fork before any thread exists
        self._started()
        try:
            pool.supervise(self._warm)
        finally:
            if self._cold_event.is_set():
                pool.kill()
            else:
                pool.stop(self._cold_event)
            self._stopped_all()

    def _started(self) -> None:
        self._install_signals()
        sys.stdout.write(self.banner())
        sys.stdout.flush()
        try:
            self._beat()  # the leases exist from "ready" on; an unreachable broker is retried later
        except Exception as exc:
            logger.error("First heartbeat failed (will try again): %s", exc)
        self._heartbeat_thread.start()
        logger.info("Connected to %s", banner.mask_url(self.app.broker_url))
        logger.info("%s ready.", self.hostname)

    def _stopped_all(self) -> None:
        self.app.close()
        logger.info("%s stopped.", self.hostname)
        self._stopped.set()
        if self._heartbeat_thread.is_alive():
            self._heartbeat_thread.join(timeout=5)

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
        every = max(0.05, self.app.broker.lease_timeout / 3)
        since_cleanup = 0.0
        while not self._stopped.wait(every):
            try:
                self._beat()
                since_cleanup += every
                if since_cleanup >= CLEANUP_EVERY:
                    since_cleanup = 0.0
                    self._cleanup_results()
            except Exception:
                logger.exception("heartbeat failed; will try again")

    def _beat(self) -> None:
        """Renew this worker's leases (a prefork parent's and its children's); return lost ones' messages."""
        also = self._prefork.consumer_ids() if self._prefork is not None else ()
        recovered = self.app.broker.heartbeat(also=also)
        if recovered:
            logger.warning("Returned %d message(s) of a lost worker to their queues", recovered)

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
        if self._prefork is not None:
            self._prefork.ask_to_stop()  # at once: a child must not start another task meanwhile
        logger.warning("worker: Warm shutdown (MainProcess)")

    def _on_cold_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("worker: Cold shutdown (MainProcess)")
        self._cold_event.set()
        self._warm.set()
        if self.pool_kind == "solo":
            raise ColdShutdown(1)
