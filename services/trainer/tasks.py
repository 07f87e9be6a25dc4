"""The Celery side of the trainer: the `modalmesh.train` task and the recovery loop.

Any process that reaches the broker can start a job by name (see docs/training.md):

    from celery import Celery
    Celery(broker="redis://127.0.0.1:6379/0").send_task(
        "modalmesh.train", kwargs={"job": {...job fields...}}, queue="train.cpu")

The task validates the job, records it in the job store (under the Celery task id when it
came without one), and runs it (`runner.JobRunner`). The recovery loop runs in every worker's
main process: it requeues RUNNING jobs of its queue whose lease expired.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown

from services.common.settings import Settings
from services.trainer.jobs import TASK_NAME, queue_for

logger = logging.getLogger(__name__)


def register(app: Celery) -> None:
    """Register the train task and the recovery loop on `app`."""

    @app.task(name=TASK_NAME, bind=True, acks_late=False, track_started=True)
    def train(self: Task, job: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
        from services.trainer.runner import JobRunner
        from services.trainer.store import JobStore

        settings: Settings = app.conf.modalmesh_settings

        def report(meta: dict[str, Any]) -> None:
            try:
                self.update_state(state="PROGRESS", meta=meta)
            except Exception as e:  # the result backend is down: progress is also in our store
                logger.debug("could not update the task state: %s", e)

        runner = JobRunner(settings, JobStore.from_url(settings.redis_url), report)
        return runner.run(job, job_id or str(self.request.id))

    stop = threading.Event()

    @worker_ready.connect(weak=False)
    def _start_recovery(sender: Any = None, **_: Any) -> None:
        settings: Settings = app.conf.modalmesh_settings
        thread = threading.Thread(
            target=_recovery_loop, args=(app, settings, stop), name="job-recovery", daemon=True
        )
        thread.start()

    @worker_shutdown.connect(weak=False)
    def _stop_recovery(sender: Any = None, **_: Any) -> None:
        stop.set()


def recover_once(app: Celery, settings: Settings) -> list[str]:
    """Requeue this hardware class's RUNNING jobs whose worker is gone; returns their ids."""
    from services.common.procenv import group_alive, stop_group
    from services.trainer.store import JobStore

    store = JobStore.from_url(settings.redis_url)
    queue = queue_for(settings.trainer_hardware)
    requeued = []
    for record in store.list(limit=1000):
        if record.queue != queue or record.state not in ("RUNNING", "CANCELLING"):
            continue
        if store.lease_holder(record.id) is not None or not store.claim_requeue(
            record.id, settings.trainer_lease_s
        ):
            continue
        if record.pgid and group_alive(record.pgid):
            stop_group(record.pgid, grace_s=5)
        if record.state == "CANCELLING" or store.cancel_requested(record.id):
            store.save(
                record.model_copy(
                    update={
                        "state": "CANCELLED",
                        "finished": time.time(),
                        "message": "cancelled; its worker stopped",
                    }
                )
            )
            continue
        store.save(
            record.model_copy(
                update={"state": "QUEUED", "message": "requeued: its worker stopped (lease expired)"}
            )
        )
        app.send_task(TASK_NAME, kwargs={"job": record.spec, "job_id": record.id}, queue=queue)
        logger.warning(
            "job %s: its worker is gone; requeued on %s to resume from its last checkpoint", record.id, queue
        )
        requeued.append(record.id)
    return requeued


def _recovery_loop(app: Celery, settings: Settings, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            recover_once(app, settings)
        except Exception as e:  # Redis down for a moment: try again next round
            logger.warning("job recovery: %s", e)
        stop.wait(settings.trainer_recover_interval_s)
