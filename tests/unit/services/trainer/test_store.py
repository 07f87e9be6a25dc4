"""The job store on a private Redis: records, listing order, the cancel flag, the lease that
marks a running job's worker as alive, the once-only requeue claim, and writes across outages."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from services.common.errors import NotFoundError, UnavailableError
from services.trainer.jobs import JobRecord
from services.trainer.store import PREFIX, JobStore
from tests.helpers.procs import Process, free_port
from tests.helpers.services import start_redis


def record(job_id: str, *, created: float = 1000.0, **fields: object) -> JobRecord:
    return JobRecord(id=job_id, spec={"preset": "tiny"}, queue="train.cpu", created=created, **fields)  # type: ignore[arg-type]


# -- records --------------------------------------------------------------------------------------


def test_save_then_get_returns_the_whole_record(store: JobStore) -> None:
    saved = record("a", state="RUNNING", progress={"step": 4, "loss": 1.5}, metrics={"loss_first": 2.0})
    store.save(saved)
    assert store.get("a") == saved
    assert store.find("a") == saved


def test_a_second_save_replaces_the_record_whole(store: JobStore) -> None:
    store.save(record("a", error="old", progress={"step": 1}))
    store.save(record("a", state="SUCCEEDED"))
    got = store.get("a")
    assert (got.state, got.error, got.progress) == ("SUCCEEDED", None, {})


def test_an_unknown_id_is_not_found(store: JobStore) -> None:
    with pytest.raises(NotFoundError, match="training job 'nope' not found") as info:
        store.get("nope")
    assert info.value.param == "job_id"
    assert store.find("nope") is None


def test_list_is_most_recent_first_and_honours_the_limit(store: JobStore) -> None:
    for job_id, created in [("mid", 2000.0), ("old", 1000.0), ("new", 3000.0)]:
        store.save(record(job_id, created=created))
    assert [r.id for r in store.list()] == ["new", "mid", "old"]
    assert [r.id for r in store.list(limit=2)] == ["new", "mid"]


def test_list_skips_an_indexed_id_whose_record_is_gone(store: JobStore) -> None:
    store.save(record("kept", created=1.0))
    store.save(record("lost", created=2.0))
    store.client.delete(f"{PREFIX}:lost")
    assert [r.id for r in store.list()] == ["kept"]


# -- cancel flag ----------------------------------------------------------------------------------


def test_cancel_flag_is_per_job(store: JobStore) -> None:
    assert not store.cancel_requested("a")
    store.request_cancel("a")
    assert store.cancel_requested("a")
    assert not store.cancel_requested("b")


# -- lease ----------------------------------------------------------------------------------------


def test_a_lease_has_one_holder_until_released(store: JobStore) -> None:
    assert store.lease_holder("j") is None
    assert store.acquire_lease("j", "w1", 30)
    assert not store.acquire_lease("j", "w2", 30)
    assert store.acquire_lease("j", "w1", 30)  # re-entrant for its holder
    assert store.lease_holder("j") == "w1"
    store.release_lease("j", "w2")  # not the holder: no effect
    assert store.lease_holder("j") == "w1"
    store.release_lease("j", "w1")
    assert store.lease_holder("j") is None
    assert store.acquire_lease("j", "w2", 30)
    assert store.lease_holder("j") == "w2"


def test_acquire_by_the_holder_extends_the_ttl(store: JobStore) -> None:
    key = f"{PREFIX}:j:lease"
    assert store.acquire_lease("j", "w1", 1.0)
    assert 0 < store.client.pttl(key) <= 1000
    assert store.acquire_lease("j", "w1", 60.0)
    assert store.client.pttl(key) > 50_000


def test_an_expired_lease_can_be_taken_by_another_worker(store: JobStore) -> None:
    assert store.acquire_lease("j", "w1", 0.1)
    time.sleep(0.25)
    assert store.lease_holder("j") is None
    assert store.acquire_lease("j", "w2", 30)


def test_renew_extends_our_lease_and_retakes_a_lost_one(store: JobStore) -> None:
    key = f"{PREFIX}:j:lease"
    store.acquire_lease("j", "w1", 1.0)
    store.renew_lease("j", "w1", 60.0)
    assert store.client.pttl(key) > 50_000
    store.client.delete(key)  # Redis restarted without persistence
    store.renew_lease("j", "w1", 60.0)
    assert store.lease_holder("j") == "w1"
    assert store.client.pttl(key) > 50_000


def test_renew_never_takes_a_lease_another_worker_holds(store: JobStore) -> None:
    store.acquire_lease("j", "w2", 30)
    store.renew_lease("j", "w1", 60)
    assert store.lease_holder("j") == "w2"
    assert store.client.pttl(f"{PREFIX}:j:lease") <= 30_000


def test_claim_requeue_is_won_once_until_it_expires(store: JobStore) -> None:
    assert store.claim_requeue("j", 0.2)
    assert not store.claim_requeue("j", 0.2)
    assert store.claim_requeue("other", 0.2)
    time.sleep(0.3)
    assert store.claim_requeue("j", 0.2)


# -- outages --------------------------------------------------------------------------------------


def test_save_retries_until_its_deadline_then_raises_unavailable() -> None:
    down = JobStore.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="job store: Redis unreachable while saving job a"):
        down.save(record("a"), deadline_s=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 10  # it kept retrying until the deadline, then gave up


def test_save_succeeds_once_redis_comes_back_within_the_deadline(tmp_path: Path) -> None:
    port = free_port()
    store = JobStore.from_url(f"redis://127.0.0.1:{port}/0")
    started: list[Process] = []

    def start_later() -> None:
        time.sleep(0.4)
        started.append(start_redis(tmp_path / "redis", port=port)[0])

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        store.save(record("a"), deadline_s=10.0)
        assert store.get("a").id == "a"
    finally:
        thread.join()
        for proc in started:
            proc.kill_group()
