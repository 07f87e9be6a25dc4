"""Run one training job from the worker: validate, launch the ranks, follow them, publish.

`JobRunner.run` is what the Celery task calls; it knows nothing of Celery beyond a `report`
callback for the task state. It holds the job's lease while it runs (renewed every second),
tails `progress.jsonl` into the job record and the worker log, turns a cancel request into the
cooperative sentinel and then, after a grace period, into killing the process group, and on
success publishes the exported bundle. A job delivered again (its previous worker died)
resumes from the latest checkpoint in the same job folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.procenv import group_alive, stop_group
from services.common.settings import Settings
from services.trainer import launcher
from services.trainer.jobs import (
    JobRecord,
    ValidatedJob,
    check_one_launcher,
    parse_job,
    queue_for,
    validate_job,
)
from services.trainer.runconfig import RunConfig
from services.trainer.store import JobStore

# Loss parts a recipe logs beside the loss (stage 2: the LM loss and the signal distance term);
# they reach the record's progress, and their first values its metrics.
LOSS_PARTS = ("lm_loss", "distance")
# The record keeps at most this many [step, loss] points: past it every other one is dropped
# and the grain doubles, so the history always spans the whole run evenly (a few KB of JSON).
HISTORY_POINTS = 512


def extend_history(history: list[tuple[int, float]], step: int, loss: float) -> list[tuple[int, float]]:
    """`history` with (step, loss) appended.

    The points lie on a grain (the gap between the first two: 1 step until the first
    thinning), except the newest, which stands for the end of the curve until the next point
    replaces it. A step at or before the last one (a resumed run replaying from its
    checkpoint) first drops the points it replaces. Past HISTORY_POINTS every other point is
    dropped (the first and the newest stay), doubling the grain.
    """
    kept = [p for p in history if p[0] < step]
    if len(kept) >= 3 and kept[-1][0] - kept[-2][0] < kept[1][0] - kept[0][0]:
        kept.pop()  # off the grain: it only stood for the newest step
    kept.append((step, loss))
    if len(kept) > HISTORY_POINTS:
        kept = [*kept[:-1:2], kept[-1]]
    return kept


logger = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    """Runs jobs for one worker process.

    Args:
        settings: Paths, Redis, lease and grace times.
        store: The job records.
        report: Called with small progress dicts (the Celery task state); failures ignored.
        node: Set on node 0 of a job run one launcher per node without ssh
            (`python -m services.trainer.node`): its launcher is that node's; the other nodes
            run theirs beside it. None (a queue worker): the one launcher of the job.
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        report: Report | None = None,
        *,
        node: launcher.Node | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.report = report or (lambda _: None)
        self.owner = worker_id()
        self.node = node  # node 0 of a job run one launcher per node (services.trainer.node)

    # -- entry ------------------------------------------------------------------------------------

    def run(self, job: dict[str, Any], job_id: str) -> dict[str, Any]:
        """Run (or resume) job `job_id`; returns the final record as a dict.

        Raises:
            InvalidArgumentError: The job is invalid (recorded as FAILED first).
        """
        record = self.store.find(job_id)
        if record is None:  # sent to the task by name, not through the client
            record = JobRecord(
                id=job_id, spec=job, queue=queue_for(str(job.get("deepspeed", {}).get("hardware", "cpu")))
            )
        if record.done:
            logger.info("job %s is already %s; nothing to do", job_id, record.state)
            return record.public()
        if self.store.cancel_requested(job_id):
            return self._finish(record, "CANCELLED", message="cancelled before it started")
        if not self.store.acquire_lease(job_id, self.owner, self.settings.trainer_lease_s):
            logger.warning(
                "job %s is held by %s; this delivery is a duplicate", job_id, self.store.lease_holder(job_id)
            )
            return record.public()
        try:
            try:
                validated = validate_job(parse_job(job, source=f"job {job_id}"), self.settings)
                if self.node is None:
                    check_one_launcher(validated.spec)
            except ModalmeshError as e:
                self._finish(record, "FAILED", error=e.message)
                raise InvalidArgumentError(e.message) from e
            try:
                _ensure_models(validated)
                return self._run(record, validated)
            except (ModalmeshError, OSError) as e:  # before or at launch: the job must not stay QUEUED
                message = e.message if isinstance(e, ModalmeshError) else f"{type(e).__name__}: {e}"
                self._finish(self.store.find(job_id) or record, "FAILED", error=message)
                raise
        finally:
            self.store.release_lease(job_id, self.owner)

    # -- the run ----------------------------------------------------------------------------------

    def _run_config(self, record: JobRecord, job: ValidatedJob) -> RunConfig:
        job_dir = self.settings.jobs_root() / record.id
        if (job_dir / "config.json").is_file():  # a redelivery: keep what the first attempt resolved
            return RunConfig.read(job_dir)
        cfg = RunConfig(
            job_id=record.id,
            spec=job.spec,
            job_dir=job_dir.resolve(),
            cache_dir=self.settings.cache_dir.resolve(),
            presets_dir=self.settings.presets_dir,
            adapter_name=job.adapter_name,
            init_bundle=self._init_bundle(job),
            hardware=job.spec.deepspeed.hardware,
        )
        cfg.write()
        return cfg

    def _init_bundle(self, job: ValidatedJob) -> Path:
        init = job.spec.init_from
        if init == "preset":
            return job.preset.adapter.path
        if init == "current" or "@" in init:
            from services.common.adapter_registry import AdapterRegistry

            registry = AdapterRegistry.from_url(self.settings.redis_url)
            name, _, version = init.partition("@") if "@" in init else (job.adapter_name, "", "")
            version = version or registry.current(name) or ""
            if not version:
                return job.preset.adapter.path
            known = registry.versions(name)
            if version not in known:
                raise InvalidArgumentError(
                    f"job.init_from: {name}@{version} is not published; known: {sorted(known)}"
                )
            return Path(known[version].path)
        return Path(init)

    def _run(self, record: JobRecord, job: ValidatedJob) -> dict[str, Any]:
        cfg = self._run_config(record, job)
        if (
            record.pgid
            and group_alive(record.pgid)
            and (record.worker or "").startswith(socket.gethostname())
        ):
            logger.warning(
                "job %s: stopping ranks left by a previous attempt (group %s)", record.id, record.pgid
            )
            stop_group(record.pgid, grace_s=5)
        cfg.cancel_path.unlink(missing_ok=True)
        resuming = (cfg.checkpoint_dir / "latest").is_file()
        launch = launcher.start(cfg, node=self.node)
        record = record.model_copy(
            update={
                "state": "RUNNING",
                "error": None,
                "attempts": record.attempts + 1,
                "started": record.started or time.time(),
                "worker": self.owner,
                "pgid": launch.pgid,
                "job_dir": str(cfg.job_dir),
                "message": "resuming from the latest checkpoint" if resuming else "started",
            }
        )
        self.store.save(record)
        logger.info(
            "job %s: %s (attempt %s, group %s)", record.id, record.message, record.attempts, launch.pgid
        )
        record, rc, cancelled = self._follow(record, cfg, launch)
        return self._outcome(record, cfg, job, rc, cancelled)

    def _follow(
        self, record: JobRecord, cfg: RunConfig, launch: launcher.Launch
    ) -> tuple[JobRecord, int, bool]:
        tail = _Tail(cfg.progress_path)
        cancel_at: float | None = None
        while True:
            rc = launch.poll()
            step = record.progress.get("step")
            for event in tail.read():
                record = self._apply(record, event)
            if record.progress.get("step") != step and "loss" in record.progress:
                self._log_progress(record)
            try:
                self.store.renew_lease(record.id, self.owner, self.settings.trainer_lease_s)
                cancel = self.store.cancel_requested(record.id)
                self.store.save(record, deadline_s=0.5)
            except Exception as e:  # Redis down (restart): keep training, catch up later
                logger.warning("job %s: Redis unavailable (%s); the job goes on", record.id, e)
                cancel = False
            if rc is not None:
                for event in tail.read():
                    record = self._apply(record, event)
                return record, rc, cancel_at is not None
            if cancel and cancel_at is None:
                cancel_at = time.monotonic()
                cfg.cancel_path.touch()
                record = record.model_copy(update={"state": "CANCELLING", "message": "cancel requested"})
                logger.info("job %s: cancel requested; asking the ranks to stop", record.id)
            if cancel_at is not None and time.monotonic() - cancel_at > self.settings.trainer_cancel_grace_s:
                logger.warning(
                    "job %s: ranks did not stop in %.0fs; killing the group",
                    record.id,
                    self.settings.trainer_cancel_grace_s,
                )
                rc = launch.stop(grace_s=5)
                return record, rc, True
            time.sleep(1.0)

    def _apply(self, record: JobRecord, event: dict[str, Any]) -> JobRecord:
        kind = event.get("event")
        update: dict[str, Any] = {}
        if kind == "start":
            update["resumed_from_step"] = event.get("resumed_from_step") or record.resumed_from_step
            if event.get("data"):
                update["data_report"] = event["data"]
            update["progress"] = {"step": event.get("step", 0), "total_steps": event.get("total_steps")}
        elif kind == "step":
            update["progress"] = {
                k: event[k]
                for k in ("step", "total_steps", "epoch", "loss", *LOSS_PARTS, "lr", "samples_per_s", "eta_s")
                if k in event
            }
            firsts = {
                f"{k}_first": event[k]
                for k in ("loss", *LOSS_PARTS)
                if k in event and f"{k}_first" not in record.metrics
            }
            if firsts:
                update["metrics"] = record.metrics | firsts
            if isinstance(event.get("step"), int) and isinstance(event.get("loss"), (int, float)):
                update["loss_history"] = extend_history(
                    record.loss_history, event["step"], float(event["loss"])
                )
            self.report(update["progress"])
        elif kind == "checkpoint":
            update["checkpoint"] = event.get("path")
        elif kind == "error" and not record.error:
            update["error"] = f"rank {event.get('rank')}: {event.get('message')}"
        elif kind == "done":
            update["bundle"] = event.get("bundle")
            update["metrics"] = record.metrics | (event.get("metrics") or {})
        return record.model_copy(update=update) if update else record

    @staticmethod
    def _log_progress(record: JobRecord) -> None:
        p = record.progress
        logger.info(
            "job %s: step %s/%s epoch %s loss %.4f %.1f samples/s ETA %.0fs",
            record.id, p.get("step"), p.get("total_steps"), p.get("epoch"),
            p.get("loss", float("nan")), p.get("samples_per_s", 0.0), p.get("eta_s", 0.0),
        )  # fmt: skip

    def _outcome(
        self, record: JobRecord, cfg: RunConfig, job: ValidatedJob, rc: int, cancelled: bool
    ) -> dict[str, Any]:
        if cancelled:
            return self._finish(
                record, "CANCELLED", message=f"cancelled at step {record.progress.get('step', 0)}"
            )
        if rc != 0 or not (cfg.bundle_dir / "manifest.json").is_file():
            why = record.error or launcher.last_error(cfg.job_dir / launcher.log_name(self.node))
            error = f"training exited with code {rc}: {why}"
            return self._finish(record, "FAILED", error=error)
        record = record.model_copy(update={"bundle": str(cfg.bundle_dir)})
        if job.spec.publish:
            try:
                published = self._publish(cfg, job)
            except ModalmeshError as e:
                return self._finish(record, "FAILED", error=f"publishing the bundle failed: {e.message}")
            record = record.model_copy(update={"published": published})
        return self._finish(record, "SUCCEEDED", message="published" if job.spec.publish else "done")

    def _publish(self, cfg: RunConfig, job: ValidatedJob) -> dict[str, Any]:
        from services.common.adapter_registry import AdapterRegistry
        from services.models.checkpoints.bundle import base_fingerprint
        from services.trainer.publisher import publish_bundle

        registry = AdapterRegistry.from_url(self.settings.redis_url)
        out = publish_bundle(
            cfg.bundle_dir,
            registry=registry,
            artifact_dir=self.settings.artifact_root(),
            name=cfg.adapter_name,
            base_fingerprint=base_fingerprint(job.preset.llm.checkpoint),
            job_id=cfg.job_id,
        )
        logger.info("job %s: published %s@%s at %s", cfg.job_id, out.name, out.version, out.path)
        return {
            "name": out.name,
            "version": out.version,
            "path": str(out.path),
            "ref": f"{out.name}@{out.version}",
        }

    def _finish(
        self, record: JobRecord, state: str, *, error: str | None = None, message: str | None = None
    ) -> dict[str, Any]:
        record = record.model_copy(
            update={
                "state": state,
                "finished": time.time(),
                "error": error,
                "message": message or record.message,
            }
        )
        self.store.save(record, deadline_s=120.0)  # the result must be recorded, Redis restart or not
        log = logger.error if state == "FAILED" else logger.info
        log("job %s: %s%s", record.id, state, f": {error}" if error else "")
        self.report({"state": state})
        return record.public()


class _Tail:
    """New JSON lines of a file that another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open() as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("progress: not a JSON line: %r", line[:200])
        return out


def _ensure_models(job: ValidatedJob) -> None:
    """A job for a built-in tiny preset whose models were never generated in this cache (the
    stack serves another one) gets them now, as the services do at start; a no-op otherwise."""
    from services.models.tiny import ensure_generated

    if ensure_generated(job.preset):
        logger.info("generated the %s preset's models for the job", job.preset.name)
