"""The training job REST API over a real TrainingClient and a private redis-server.

No Celery worker runs: a submitted job stays QUEUED in Redis, which is all these routes need.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.http_app import create_app
from gateway.serving import ChatService
from services.common.settings import Settings
from services.trainer.client import TrainingClient
from services.trainer.synth import synthesize
from tests.helpers.procs import Process
from tests.helpers.services import start_redis

JOBS = "/v1/training/jobs"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[Process, str]]:
    proc, url = start_redis(tmp_path / "redis")
    try:
        yield proc, url
    finally:
        proc.kill_group()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    synthesize(tmp_path / "data", train=8, heldout=2)
    return tmp_path / "data"


@pytest.fixture
def training(redis_server: tuple[Process, str], tiny_cache_dir: Path) -> TrainingClient:
    return TrainingClient(Settings(redis_url=redis_server[1], cache_dir=tiny_cache_dir))


@pytest.fixture
async def api(down_service: ChatService, training: TrainingClient) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(down_service, training=training))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        yield c


def stage1(data_dir: Path, **changes: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "preset": "tiny",
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": str(data_dir / "captions.json")}],
        "hyperparameters": {"max_steps": 2, "micro_batch_size": 2},
    }
    return job | changes


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


async def test_a_valid_job_is_queued_readable_and_listed(api: httpx.AsyncClient, data_dir: Path) -> None:
    r = await api.post(JOBS, json=stage1(data_dir))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "QUEUED" and job["queue"] == "train.cpu"
    assert job["spec"]["stage"] == "stage1" and job["spec"]["hyperparameters"]["max_steps"] == 2

    got = await api.get(f"{JOBS}/{job['id']}")
    assert got.status_code == 200 and got.json() == job

    second = (
        await api.post(
            JOBS,
            json=stage1(
                data_dir, stage="stage3", datasets=[{"format": "llava", "path": str(data_dir / "train.json")}]
            ),
        )
    ).json()
    listing = (await api.get(JOBS)).json()
    assert listing["object"] == "list"
    assert [j["id"] for j in listing["data"]] == [second["id"], job["id"]]  # most recent first
    assert [j["id"] for j in (await api.get(JOBS, params={"limit": 1})).json()["data"]] == [second["id"]]


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"preset": "no-such-preset"}, ("job.preset", "no-such-preset", "not found")),
        ({"stage": "stage9"}, ("stage", "stage1")),
        ({"stage": "stage2"}, ("job.stage", "stage2")),
        ({"hyperparameters": {"epochs": "many"}}, ("hyperparameters.epochs",)),
        ({"learning_rate": 0.1}, ("learning_rate", "Extra inputs are not permitted")),
        ({"datasets": []}, ("datasets",)),
        ({"datasets": [{"format": "captions", "path": "data/captions.json"}]}, ("absolute path",)),
    ],
    ids=["unknown-preset", "unknown-stage", "stage2", "wrong-type", "extra-field", "no-datasets", "relative"],
)
async def test_an_invalid_job_is_refused_naming_the_problem(
    api: httpx.AsyncClient, data_dir: Path, changes: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    assert_error(await api.post(JOBS, json=stage1(data_dir, **changes)), 400, *fragments)
    assert (await api.get(JOBS)).json()["data"] == []  # nothing was queued


async def test_a_missing_dataset_file_is_named(api: httpx.AsyncClient, data_dir: Path) -> None:
    missing = data_dir / "missing.json"
    job = stage1(data_dir, datasets=[{"format": "captions", "path": str(missing)}])
    assert_error(await api.post(JOBS, json=job), 400, "job.datasets[0]", str(missing), "found nothing")


async def test_stage1_refuses_conversation_datasets(api: httpx.AsyncClient, data_dir: Path) -> None:
    job = stage1(data_dir, datasets=[{"format": "llava", "path": str(data_dir / "train.json")}])
    assert_error(await api.post(JOBS, json=job), 400, "captions")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"preset": "tiny", "stage": ', "not valid JSON"),
        (b"", "empty"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'["a", "list"]', "expected a mapping"),
    ],
    ids=["broken", "empty", "not-utf8", "not-an-object"],
)
async def test_a_malformed_body_is_a_400(api: httpx.AsyncClient, body: bytes, fragment: str) -> None:
    r = await api.post(JOBS, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, fragment)


async def test_a_body_over_the_limit_is_refused(api: httpx.AsyncClient, down_service: ChatService) -> None:
    body = b'{"description": "' + b"x" * down_service.settings.max_body_bytes + b'"}'
    assert_error(await api.post(JOBS, content=body), 413, "over the limit")


async def test_a_bad_limit_is_a_400(api: httpx.AsyncClient) -> None:
    assert_error(await api.get(JOBS, params={"limit": 0}), 400, "limit")
    assert_error(await api.get(JOBS, params={"limit": "ten"}), 400, "limit")


async def test_an_unknown_job_is_a_404(api: httpx.AsyncClient) -> None:
    assert_error(await api.get(f"{JOBS}/nope"), 404, "nope", "not found")
    assert_error(await api.delete(f"{JOBS}/nope"), 404, "nope")


async def test_cancelling_a_queued_job_and_then_again(api: httpx.AsyncClient, data_dir: Path) -> None:
    job = (await api.post(JOBS, json=stage1(data_dir))).json()
    r = await api.delete(f"{JOBS}/{job['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "CANCELLED" and r.json()["finished"] is not None
    assert (await api.get(f"{JOBS}/{job['id']}")).json()["state"] == "CANCELLED"
    assert_error(await api.delete(f"{JOBS}/{job['id']}"), 409, job["id"], "already finished")


async def test_a_succeeded_job_cannot_be_cancelled(
    api: httpx.AsyncClient, training: TrainingClient, data_dir: Path
) -> None:
    job = (await api.post(JOBS, json=stage1(data_dir))).json()
    record = training.get(job["id"])
    training.store.save(record.model_copy(update={"state": "SUCCEEDED"}))
    r = await api.delete(f"{JOBS}/{job['id']}")
    assert_error(r, 409, "SUCCEEDED")
    assert r.json()["error"]["type"] == "ConflictError"


async def test_redis_down_is_a_503(
    api: httpx.AsyncClient, redis_server: tuple[Process, str], data_dir: Path
) -> None:
    redis_server[0].kill_group()
    # The job store retries for 5 s (a Redis restart) before it gives up.
    assert_error(await api.post(JOBS, json=stage1(data_dir)), 503, "Redis unreachable")


async def test_no_training_client_no_routes(down_service: ChatService) -> None:
    transport = httpx.ASGITransport(app=create_app(down_service))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
        assert (await c.get(JOBS)).status_code == 404


async def test_job_routes_have_their_own_metrics_labels(
    api: httpx.AsyncClient, down_service: ChatService
) -> None:
    await api.get(JOBS)
    await api.get(f"{JOBS}/no-such-job")
    metrics = down_service.metrics.render()[0].decode()
    assert 'route="/v1/training/jobs"' in metrics
    assert 'route="/v1/training/jobs/{id}"' in metrics and "no-such-job" not in metrics
