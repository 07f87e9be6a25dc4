"""Trainer workers that end by themselves (`--max-jobs`, `--idle-exit-s`), as a KEDA ScaledJob
pod runs them (deploy/k8s/components/trainer-keda): a private Redis and real Celery workers.

The jobs here fail at once (unknown preset), so no model is built: what is tested is the
worker's life around a job, and the Redis list that holds the queue (what KEDA counts).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.trainer.jobs import TASK_NAME, queue_for
from tests.helpers.procs import Process, start_process, wait_until
from tests.helpers.services import start_redis

pytestmark = pytest.mark.integration


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, url = start_redis(tmp_path / "redis")
    try:
        yield url
    finally:
        proc.kill_group()


def start_worker(redis_url: str, tmp_path: Path, *flags: str) -> Process:
    env = {
        "MODALMESH_TRAINER_LEASE_S": "4",
        "MODALMESH_TRAINER_RECOVER_INTERVAL_S": "1",
        "MODALMESH_REDIS_URL": redis_url,
        "MODALMESH_CACHE_DIR": str(tmp_path / "cache"),
        "MODALMESH_JOBS_DIR": str(tmp_path / "jobs"),
        "MODALMESH_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "MODALMESH_LOG_JSON": "false",
        "MODALMESH_TRAINER_HARDWARE": "cpu",
    }
    return start_process(
        [sys.executable, "-m", "services.trainer", *flags], log_path=tmp_path / "worker.log", env=env
    )


def failing_job(tmp_path: Path) -> dict[str, object]:
    return {
        "preset": "no-such-preset",
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": str(tmp_path / "missing.json")}],
    }


def wait_exit(proc: Process, timeout: float) -> int:
    wait_until(lambda: not proc.alive(), timeout=timeout, what="the worker to exit by itself", proc=proc)
    code = proc.popen.returncode
    assert code is not None
    return code


def test_idle_worker_exits_cleanly(redis_url: str, tmp_path: Path) -> None:
    worker = start_worker(redis_url, tmp_path, "--idle-exit-s", "2")
    try:
        code = wait_exit(worker, timeout=90)
        assert code == 0, worker.log_tail()
        assert "stopping the worker: no job for" in worker.log_text()
    finally:
        worker.kill_group()


def test_one_job_worker_takes_one_job_and_leaves_the_rest_in_the_queue_list(
    redis_url: str, tmp_path: Path
) -> None:
    from celery import Celery

    from services.trainer.store import JobStore

    sender = Celery(broker=redis_url)
    ids = [
        sender.send_task(TASK_NAME, kwargs={"job": failing_job(tmp_path)}, queue=queue_for("cpu")).id
        for _ in range(2)
    ]
    broker = redis.Redis.from_url(redis_url)
    # Celery's Redis transport keeps the queue as a list named after it: what KEDA counts.
    assert broker.llen("train.cpu") == 2

    worker = start_worker(redis_url, tmp_path, "--max-jobs", "1", "--idle-exit-s", "600")
    try:
        code = wait_exit(worker, timeout=120)
        assert code == 0, worker.log_tail()
        assert "stopping the worker: 1 of max 1 jobs done" in worker.log_text()
    finally:
        worker.kill_group()
    store = JobStore.from_url(redis_url)
    records = [store.find(i) for i in ids]
    states = sorted(r.state if r is not None else "not taken" for r in records)
    assert states == ["FAILED", "not taken"], states
    assert broker.llen("train.cpu") == 1  # the other job waits for the next worker


def test_a_worker_started_in_place_of_a_lost_one_requeues_its_job_and_takes_it(
    redis_url: str, tmp_path: Path
) -> None:
    """The Job controller's replacement pod: its recovery loop finds the RUNNING job whose
    lease expired (its pod is gone), requeues it, takes it, and ends."""
    from services.trainer.jobs import JobRecord
    from services.trainer.store import JobStore

    store = JobStore.from_url(redis_url)
    lost = JobRecord(
        id="lost-job", spec=failing_job(tmp_path), state="RUNNING", queue=queue_for("cpu"), worker="gone@pod"
    )
    store.save(lost)  # no lease: the worker that held it died
    worker = start_worker(redis_url, tmp_path, "--max-jobs", "1", "--idle-exit-s", "60")
    try:
        code = wait_exit(worker, timeout=120)
        assert code == 0, worker.log_tail()
        log = worker.log_text()
        assert "job lost-job: its worker is gone; requeued on train.cpu" in log
        assert "stopping the worker: 1 of max 1 jobs done" in log
    finally:
        worker.kill_group()
    record = store.get("lost-job")
    assert record.state == "FAILED" and "no-such-preset" in (record.error or ""), record
    assert redis.Redis.from_url(redis_url).llen("train.cpu") == 0
