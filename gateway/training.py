"""The training job REST API: submit, list, read and cancel jobs through `TrainingClient`.

    POST   /v1/training/jobs          the job spec as JSON -> 201 with the job record
    GET    /v1/training/jobs?limit=N  {"object": "list", "data": [records, most recent first]}
    GET    /v1/training/jobs/{id}     the record (404 if unknown)
    DELETE /v1/training/jobs/{id}     cancel -> 200 with the record (409 if already finished)

Routes only translate HTTP/JSON to `services.trainer.client.TrainingClient` calls, which are
blocking (redis-py), so they run in a worker thread. Errors are the gateway's OpenAI error
bodies: a malformed or invalid job -> 400 naming the problem, a body over max_body_bytes -> 413
(the gateway middleware), an unknown id -> 404, a finished job -> 409, Redis down -> 503.

Dataset paths in a job sent here must be absolute: the gateway and the workers do not share a
working folder, so a relative path would mean different files to each (the CLI resolves
relative paths against the job file's folder before it submits).

Nothing here imports the trainer at module level (its data path pulls torch); the client is
built by `training_client` and passed in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from services.common.errors import InvalidArgumentError
from services.common.settings import Settings

if TYPE_CHECKING:
    from services.trainer.client import TrainingClient
    from services.trainer.jobs import JobSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
JOBS_PATH = "/v1/training/jobs"
MAX_LIST = 1000


def training_client(settings: Settings) -> TrainingClient | None:
    """The TrainingClient on the settings' Redis, or None when no Redis URL is set.

    Building it connects to nothing; the trainer package is imported only here.
    """
    if not settings.redis_url:
        return None
    from services.trainer.client import TrainingClient

    return TrainingClient(settings)


def _client(request: Request) -> TrainingClient:
    client: TrainingClient = request.app.state.training
    return client


async def _run(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


async def _read_job(request: Request) -> JobSpec:
    """Parse the body as a job spec; every failure is an InvalidArgumentError naming it."""
    from services.trainer.jobs import parse_job

    body = await request.body()
    if not body.strip():
        raise InvalidArgumentError("the request body is empty; expected a training job as a JSON object")
    try:
        payload = json.loads(body.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"the request body is not UTF-8 JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    spec = parse_job(payload, source="job")
    _require_absolute_paths(spec)
    return spec


def _require_absolute_paths(spec: JobSpec) -> None:
    fields: list[tuple[str, Path | None]] = []
    for i, ds in enumerate(spec.datasets):
        fields += [(f"datasets[{i}].path", ds.path), (f"datasets[{i}].media_root", ds.media_root)]
    fields.append(("deepspeed.hostfile", spec.deepspeed.hostfile))
    for name, path in fields:
        if path is not None and not path.is_absolute():
            raise InvalidArgumentError(
                f"job.{name}: expected an absolute path (the gateway and the training workers do not "
                f"share a working folder), got {str(path)!r}",
                param=name,
            )


async def submit_job(request: Request) -> JSONResponse:
    """POST /v1/training/jobs: validate and queue a job; 201 with its record."""
    spec = await _read_job(request)
    record = await _run(_client(request).submit, spec)
    return JSONResponse(record.public(), status_code=201)


async def list_jobs(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100) -> JSONResponse:
    """GET /v1/training/jobs: the most recent jobs first."""
    client = _client(request)
    records = await _run(lambda: client.list(limit=limit))
    return JSONResponse({"object": "list", "data": [r.public() for r in records]})


async def get_job(request: Request, job_id: str) -> JSONResponse:
    """GET /v1/training/jobs/{job_id}."""
    record = await _run(_client(request).get, job_id)
    return JSONResponse(record.public())


async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    """DELETE /v1/training/jobs/{job_id}: cancel; a queued job is CANCELLED at once."""
    record = await _run(_client(request).cancel, job_id)
    logger.info("training job %s: cancel requested (%s)", job_id, record.state)
    return JSONResponse(record.public())


def add_training_routes(app: FastAPI, client: TrainingClient) -> None:
    """Serve the training job API on `app` over `client` (the app does not own it)."""
    app.state.training = client
    app.add_api_route(JOBS_PATH, submit_job, methods=["POST"], status_code=201)
    app.add_api_route(JOBS_PATH, list_jobs, methods=["GET"])
    app.add_api_route(JOBS_PATH + "/{job_id}", get_job, methods=["GET"])
    app.add_api_route(JOBS_PATH + "/{job_id}", cancel_job, methods=["DELETE"])
