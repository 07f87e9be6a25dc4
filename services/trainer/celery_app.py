"""The Celery application of the trainer, configured for multi-hour jobs on Redis.

Choices (TRAINING_NOTES section 7):
- **Early ack, recovery from our own job record.** A delivered job is acknowledged when it
  starts, so Redis never redelivers a long job behind the visibility timeout's back (acks_late
  with a 1 h default would train twice in parallel). Instead the worker holds a lease on the job
  in Redis, renewed every couple of seconds; a reconciler in every worker requeues a RUNNING job
  whose lease expired (its worker died), and the new delivery resumes from the latest
  checkpoint. Recovery therefore takes about the lease time, not the visibility timeout.
- **One job at a time, nothing reserved:** concurrency 1, prefetch multiplier 1 and
  `worker_disable_prefetch` (Redis only), so queued jobs stay in Redis where any free worker
  can take them.
- **A queue per hardware class** (`train.cpu`, `train.gpu`, ...): a job resumes on the same
  class of machine it started on (a ZeRO checkpoint cannot change world size).
- The training itself runs in a subprocess group (launcher.py), never in the pool process:
  no CUDA in forked children, no daemonic-process limits, cancellable as a group.

Celery's `-A` loader needs a module attribute, hence the module-level `app` built from the
environment's settings; everything else takes the app or settings as arguments.
"""

from __future__ import annotations

from celery import Celery

from services.common.settings import Settings

DAY = 24 * 3600


def create_app(settings: Settings) -> Celery:
    """A Celery app on the settings' Redis, with the trainer's task registered."""
    app = Celery("modalmesh-trainer", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_acks_late=False,
        task_track_started=True,
        task_default_queue="train.cpu",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * DAY,
        result_extended=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Messages are acked at once, so the visibility timeout only matters for a message
        # that was fetched but not yet started; keep the three settings equal (Celery docs).
        broker_transport_options={"visibility_timeout": DAY},
        result_backend_transport_options={"visibility_timeout": DAY},
        visibility_timeout=DAY,
    )
    app.conf.modalmesh_settings = settings
    from services.trainer.tasks import register

    register(app)
    return app


app = create_app(Settings())
