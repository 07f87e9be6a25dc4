"""Submit, watch and cancel training jobs: what the CLI and the gateway call.

`submit` validates the job in full before anything is queued, records it (QUEUED) in the job
store and sends the Celery task to the queue of its hardware class, with the job id as the
Celery task id. `cancel` on a queued job revokes the message and marks it CANCELLED at once;
on a running job it sets the cancel flag, which the worker turns into a cooperative stop and
then, after a grace period, into killing the ranks' process group.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from services.common.errors import FailedPreconditionError
from services.common.settings import Settings
from services.trainer.jobs import (
    TASK_NAME,
    JobRecord,
    JobSpec,
    check_one_launcher,
    new_job_id,
    parse_job,
    queue_for,
    validate_job,
)
from services.trainer.store import JobStore

logger = logging.getLogger(__name__)


class TrainingClient:
    """Talks to the job store and the broker (both on the settings' Redis).

    Args:
        settings: Redis URL, cache and preset folders (for validation).
        store: Job records; default from the settings' Redis.
        celery: An app used to send and revoke tasks; default a minimal one on the same Redis.
    """

    def __init__(
        self, settings: Settings, store: JobStore | None = None, celery: Celery | None = None
    ) -> None:
        self.settings = settings
        self.store = store or JobStore.from_url(settings.redis_url)
        self.celery = celery or Celery(
            "modalmesh-client", broker=settings.redis_url, backend=settings.redis_url
        )

    def submit(self, job: JobSpec | dict[str, Any] | str) -> JobRecord:
        """Validate and queue a job; returns its record.

        Raises:
            InvalidArgumentError: The job is invalid (nothing is queued).
            UnavailableError: Redis is unreachable.
        """
        spec = job if isinstance(job, JobSpec) else parse_job(job)
        validate_job(spec, self.settings)
        check_one_launcher(spec)
        record = JobRecord(
            id=new_job_id(), spec=spec.model_dump(mode="json"), queue=queue_for(spec.deepspeed.hardware)
        )
        self.store.save(record)
        self.celery.send_task(
            TASK_NAME, kwargs={"job": record.spec, "job_id": record.id}, queue=record.queue, task_id=record.id
        )
        logger.info("job %s queued on %s (%s, preset %s)", record.id, record.queue, spec.stage, spec.preset)
        return record

    def get(self, job_id: str) -> JobRecord:
        """Raises NotFoundError for an unknown id."""
        return self.store.get(job_id)

    def list(self, *, limit: int = 100) -> list[JobRecord]:
        return self.store.list(limit=limit)

    def cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop; returns its record as it stands.

        Raises:
            NotFoundError: Unknown id.
            FailedPreconditionError: The job already finished.
        """
        record = self.store.get(job_id)
        if record.done:
            raise FailedPreconditionError(f"training job {job_id} already finished ({record.state})")
        self.store.request_cancel(job_id)
        if record.state == "QUEUED":
            self.celery.control.revoke(job_id)
            record = record.model_copy(update={"state": "CANCELLED", "message": "cancelled while queued"})
            import time

            record = record.model_copy(update={"finished": time.time()})
        else:
            record = record.model_copy(update={"state": "CANCELLING", "message": "cancel requested"})
        self.store.save(record)
        return record
