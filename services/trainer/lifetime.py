"""A bounded worker lifetime: stop after N jobs, or after a while with nothing to do.

A worker started for one queued job (a KEDA ScaledJob pod, docs/deployment.md "Autoscaling")
must end by itself once that job is done, and also when another worker took the job first;
an always-on worker (compose, the Deployment) runs without a bound. The watcher runs in the
worker's main process, reads Celery's own request bookkeeping (`celery.worker.state`: requests
reserved or executing, requests accepted so far) and, when the bound is reached while no job
is held, asks for the worker's warm shutdown (SIGTERM to itself, as `kill` or Kubernetes would).
With `max_jobs`, the worker also stops consuming its queues as it receives its last job, in
the consumer's own thread, so a job that ends at once does not let it take one more. A warm
shutdown never stops a running job: a job taken in the last instant finishes first.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lifetime:
    """When a worker stops by itself. None = no bound of that kind.

    Attributes:
        max_jobs: Jobs to take; the worker stops once that many have ended.
        idle_exit_s: Seconds without a job (since start, or since the last job ended) after
            which the worker stops. Keep it above the job lease plus the recovery interval, so
            that a worker started in place of a lost one lives long enough to requeue its job.
    """

    max_jobs: int | None = None
    idle_exit_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ValueError(f"max_jobs: expected a positive number of jobs, got {self.max_jobs}")
        if self.idle_exit_s is not None and self.idle_exit_s <= 0:
            raise ValueError(f"idle_exit_s: expected seconds > 0, got {self.idle_exit_s}")

    @property
    def bounded(self) -> bool:
        return self.max_jobs is not None or self.idle_exit_s is not None

    def stop_reason(self, *, taken: int, busy: bool, idle_for_s: float) -> str | None:
        """Why the worker should stop now, or None to keep it.

        Args:
            taken: Jobs the worker has taken so far (ended or running).
            busy: Whether it holds a job (reserved or running) now.
            idle_for_s: Seconds since it started or its last job ended, whichever is later.
        """
        if busy:
            return None
        if self.max_jobs is not None and taken >= self.max_jobs:
            return f"{taken} of max {self.max_jobs} jobs done"
        if self.idle_exit_s is not None and idle_for_s >= self.idle_exit_s:
            return f"no job for {idle_for_s:.0f} s (idle exit after {self.idle_exit_s:g} s)"
        return None


def _celery_counts() -> tuple[int, bool]:
    """(requests accepted so far, whether one is reserved or executing) in this worker."""
    from celery.worker import state

    return state.all_total_count[0], bool(state.active_requests or state.reserved_requests)


def watch(
    lifetime: Lifetime,
    stop: threading.Event,
    *,
    counts: Callable[[], tuple[int, bool]] = _celery_counts,
    shutdown: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = 1.0,
) -> None:
    """Poll `counts` until `lifetime` says stop, then call `shutdown(reason)` once."""
    last_active = clock()
    while not stop.is_set():
        taken, busy = counts()
        if busy:
            last_active = clock()
        reason = lifetime.stop_reason(taken=taken, busy=busy, idle_for_s=clock() - last_active)
        if reason is not None:
            shutdown(reason)
            return
        stop.wait(poll_s)


def _warm_shutdown(reason: str) -> None:
    logger.info("stopping the worker: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def install(app: Celery, lifetime: Lifetime) -> None:
    """Start the watcher in the worker's main process when `app`'s worker is ready."""
    if not lifetime.bounded:
        return
    stop = threading.Event()

    @worker_ready.connect(weak=False)
    def _start(sender: Any = None, **_: Any) -> None:
        thread = threading.Thread(
            target=watch, args=(lifetime, stop), kwargs={"shutdown": _warm_shutdown}, daemon=True
        )
        thread.name = "worker-lifetime"
        thread.start()

    @worker_shutdown.connect(weak=False)
    def _stop(sender: Any = None, **_: Any) -> None:
        stop.set()

    if lifetime.max_jobs is not None:
        max_jobs = lifetime.max_jobs
        received = [0]

        @task_received.connect(weak=False)
        def _count(sender: Any = None, **_: Any) -> None:  # sender: the worker's consumer
            received[0] += 1
            if received[0] >= max_jobs:
                _stop_consuming(sender, received[0])


def _stop_consuming(consumer: Any, received: int) -> None:
    """Cancel every queue `consumer` reads: the worker takes no job after this one."""
    names = [queue.name for queue in consumer.task_consumer.queues]
    logger.info("received job %d, the last this worker takes; no longer consuming %s", received, names)
    for name in names:
        consumer.cancel_task_queue(name)
