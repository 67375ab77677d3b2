"""The thread pool's queue of jobs not yet started (`worker/pools/threads.py`), in one process."""

from __future__ import annotations

import threading
import uuid

from celeriac import Celery
from celeriac.protocol.message import read_task
from celeriac.worker.jobs import Job, Policy, make_job
from celeriac.worker.pools.threads import ThreadPool
from tests.conftest import wait_until


def held_jobs(count: int) -> tuple[Celery, list[Job], list[int], threading.Event]:
    """`count` jobs of a task that records its argument, then waits for the returned gate."""
    app = Celery("pools", broker=f"memory://pools-{uuid.uuid4()}", set_as_current=False)
    started: list[int] = []
    gate = threading.Event()

    @app.task(name="pools.hold")
    def hold(index: int) -> int:
        started.append(index)
        gate.wait(30)
        return index

    for index in range(count):
        app.send_task("pools.hold", (index,))
    deliveries = app.broker.fetch(["celery"], count, timeout=1)
    assert len(deliveries) == count  # a store of its own: no other test's messages
    policy = Policy.of(app, hold)
    jobs = [
        make_job(key, delivery, read_task(delivery.payload, app.accept_content), policy, "pools@test")
        for key, delivery in enumerate(deliveries)
    ]
    return app, jobs, started, gate


def test_a_thread_pool_queues_jobs_beyond_its_threads_and_gives_back_the_unstarted_in_order() -> None:
    # Given a two-thread pool, which takes more jobs than it has threads
    app, jobs, started, gate = held_jobs(6)
    pool = ThreadPool(app, 2)
    pool.start()
    assert pool.free_slots() == 2 + pool.backlog > len(jobs)

    # When six jobs are submitted while the first two block their threads
    for job in jobs:
        pool.submit(job)
    wait_until(lambda: len(started) == 2, 10, "two jobs to start")

    # Then the four queued ones come back unstarted, oldest first, and count as free again
    assert [job.key for job in pool.withdraw()] == [2, 3, 4, 5]
    assert pool.free_slots() == pool.backlog
    # And the two running jobs end and are collected; nothing else ever started
    gate.set()
    completions = []
    while len(completions) < 2:
        completions += pool.collect(5.0)
    assert sorted(completion.key for completion in completions) == [0, 1]
    assert sorted(started) == [0, 1]
    pool.stop(cold=False)


def test_once_halted_a_thread_pool_starts_no_queued_job() -> None:
    # Given a one-thread pool whose thread runs a blocked job, with two more jobs queued
    halt = threading.Event()
    app, jobs, started, gate = held_jobs(3)
    pool = ThreadPool(app, 1, halt)
    pool.start()
    for job in jobs:
        pool.submit(job)
    wait_until(lambda: started == [0], 10, "the first job to start")

    # When the warm stop begins and the running job then ends
    halt.set()
    gate.set()
    [completion] = pool.collect(5.0)

    # Then the thread started neither queued job, and both can be withdrawn
    assert completion.key == 0 and started == [0]
    assert [job.key for job in pool.withdraw()] == [1, 2]
    pool.stop(cold=False)
