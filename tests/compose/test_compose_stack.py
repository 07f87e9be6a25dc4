"""`docker compose up`, for real: the production compose files built and run on this machine.

The stack is `docker compose -f docker-compose.yml -f docker-compose.cpu.yml` with the tiny
preset, API keys on, stand-in base images (tests/compose/harness.py says why and how). Every
image is built with the project's Dockerfiles, then built again to show the cache holds, and
the stack is brought up with `up -d --wait`. Then, from the host through the published ports:
an image chat with the official `openai` client, the same chat streamed, `/metrics`, Flower,
a training job through the queue whose published version the LLM container swaps to, a
SIGKILLed LLM container that Docker restarts, a gateway that cannot start (shown unhealthy
with its first error line) and `down -v` leaving nothing behind.

Run by `make compose-test` (its own step of .ci/run); the timings, image sizes and disk use go
to <work>/report.json and stderr. The tests share one stack and run in file order.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.compose.harness import (
    API_KEY,
    GATEWAY,
    PROJECT,
    SERVICE_IMAGES,
    HarnessError,
    Stack,
    build_standins,
    docker_ready,
    log,
    run,
)
from tests.helpers.media import png_bytes
from tests.helpers.procs import wait_until

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPORT: dict[str, Any] = {}
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if (missing := docker_ready()) is not None:
        pytest.fail(f"{missing} (make compose-test runs it first)")
    start = time.monotonic()
    standins = build_standins()
    REPORT["standins_s"] = round(time.monotonic() - start, 1)
    s = Stack(standins)
    s.write_settings()
    s.down()  # whatever an interrupted run left
    try:
        REPORT["build_output_first"] = s.build("build_s")
        REPORT["build_output_second"] = s.build("rebuild_s")
        s.up()
        yield s
    finally:
        with_leftovers = s.leftovers()
        if any(with_leftovers.values()):
            s.down()
        REPORT.update({k: round(v, 1) for k, v in s.timings.items()})
        report = {k: v for k, v in REPORT.items() if not k.startswith("build_output")}
        (s.work / "report.json").write_text(json.dumps(report, indent=2))
        log("report: " + json.dumps(report))


def openai_client() -> Any:
    import openai

    return openai.OpenAI(base_url=f"{GATEWAY}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def image_messages(seed: int = 0) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(seed=seed)).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def chat(model: str = "tiny", **kwargs: Any) -> Any:
    return openai_client().chat.completions.create(
        model=model, messages=image_messages(), max_tokens=8, temperature=0, seed=1, **kwargs
    )


def test_images_build_from_the_projects_dockerfiles_and_rebuild_from_cache(stack: Stack) -> None:
    second = REPORT["build_output_second"]
    # The classic builder prints "Running in <container>" for every step it runs: none may run.
    assert "Running in" not in second, second[-3000:]
    assert second.count("Using cache") >= len(SERVICE_IMAGES), second[-3000:]
    sizes = stack.image_sizes()
    REPORT["image_mb"] = {name: round(size / 1e6) for name, size in sizes.items()}
    log(f"image sizes (MB): {REPORT['image_mb']}")
    probe = run(
        ["docker", "run", "--rm", "--entrypoint", "python", "modalmesh/gateway:0.1.0", "-c", "import torch"],
        check=False,
    )
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr
    assert sizes["gateway"] < sizes["llm"] / 2


def test_every_service_is_healthy_and_the_api_needs_a_key(stack: Stack) -> None:
    rows = {row["Service"]: row for row in stack.ps()}
    assert set(rows) == {"redis", "encoders", "llm", "gateway", "trainer", "flower"}, rows
    assert all(row["State"] == "running" and row["Health"] == "healthy" for row in rows.values()), rows
    assert httpx.get(f"{GATEWAY}/health", timeout=10).json()["status"] == "ok"
    refused = httpx.get(f"{GATEWAY}/v1/models", timeout=10)
    assert refused.status_code == 401, refused.text
    wrong = httpx.get(f"{GATEWAY}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401, wrong.text
    ids = [m["id"] for m in httpx.get(f"{GATEWAY}/v1/models", headers=AUTH, timeout=10).json()["data"]]
    assert ids == ["tiny", "tiny@1"], ids


def test_compose_config_names_a_missing_api_key_file(stack: Stack) -> None:
    empty_env = stack.work / "empty.env"
    empty_env.write_text("")
    args = [
        a if a != str(stack.env_file) else str(empty_env) for a in stack.compose_args("config", "--quiet")
    ]
    proc = run(args, env=stack.env(), check=False)
    assert proc.returncode != 0
    assert "required variable API_KEYS_FILE is missing a value: set API_KEYS_FILE in .env" in proc.stderr, (
        proc.stderr
    )


def test_an_image_chat_with_the_openai_client(stack: Stack) -> None:
    import openai

    start = time.monotonic()
    reply = chat()
    REPORT["image_chat_s"] = round(time.monotonic() - start, 2)
    text_only = openai_client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is in this picture?"}], max_tokens=1
    )
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")
    # The image's 16 feature tokens stand in for its placeholder.
    assert reply.usage.prompt_tokens >= text_only.usage.prompt_tokens + 15, (reply.usage, text_only.usage)
    assert reply.system_fingerprint == "tiny@1"
    STATE["greedy"] = reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{GATEWAY}/v1", api_key="wrong", max_retries=0).models.list()


def test_the_same_chat_streamed(stack: Stack) -> None:
    stream = chat(stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(chunks) >= 2 and finishes in (["stop"], ["length"]), chunks
    assert text == STATE["greedy"]  # greedy: the streamed reply is the same text


def test_metrics_and_flower(stack: Stack) -> None:
    metrics = httpx.get(f"{GATEWAY}/metrics", timeout=10)  # open, as /health
    assert metrics.status_code == 200
    assert 'route="/v1/chat/completions"' in metrics.text, metrics.text[:2000]
    llm = httpx.get("http://127.0.0.1:8120/metrics", timeout=10).text
    assert "modalmesh_llm_" in llm, llm[:2000]
    encoders = httpx.get("http://127.0.0.1:8102/metrics", timeout=10).text
    assert "nv_inference_request_success" in encoders, encoders[:2000]
    assert httpx.get("http://127.0.0.1:5555/healthcheck", timeout=10).text == "OK"
    # Flower's own Prometheus metrics (its REST API is off without authentication) see the worker.
    online = (
        f'flower_worker_online{{worker="trainer@{stack.inspect("trainer", "{{.Config.Hostname}}")}"}} 1.0'
    )
    wait_until(
        lambda: online in httpx.get("http://127.0.0.1:5555/metrics", timeout=30).text,
        timeout=60,
        what=f"Flower's /metrics showing {online}",
    )


def job(job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{GATEWAY}/v1/training/jobs/{job_id}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_training_job_through_the_queue_is_published_and_swapped_in(stack: Stack) -> None:
    spec = {
        "preset": "tiny",
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": "/data/captions.json"}],  # DATA_DIR, mounted
        "hyperparameters": {"max_steps": 6, "micro_batch_size": 4, "checkpoint_every": 3, "lr": 1e-3},
        "deepspeed": {"world_size": 1, "zero_stage": 2},
    }
    start = time.monotonic()
    r = httpx.post(f"{GATEWAY}/v1/training/jobs", json=spec, headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["queue"] == "train.cpu"
    job_id = r.json()["id"]
    done = wait_until(
        lambda: (j := job(job_id))["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") and j,
        timeout=900,
        interval=1,
        what="the training job finished",
    )
    REPORT["job_s"] = round(time.monotonic() - start, 1)
    assert done["state"] == "SUCCEEDED", {k: done[k] for k in ("state", "error", "message", "progress")}
    version = done["published"]["version"]
    assert version == "2", done["published"]

    def swapped() -> bool:
        ids = [m["id"] for m in httpx.get(f"{GATEWAY}/v1/models", headers=AUTH, timeout=10).json()["data"]]
        return "tiny@2" in ids and chat().system_fingerprint == "tiny@2"

    wait_until(swapped, timeout=120, interval=1, what="the LLM container serving tiny@2")
    REPORT["job_to_serving_s"] = round(time.monotonic() - start, 1)
    log(f"job {job_id}: published tiny@{version}, served {REPORT['job_to_serving_s']} s after submission")
    assert chat(model="tiny@1").system_fingerprint == "tiny@1"  # the old version stays pinnable


def test_a_sigkilled_llm_container_is_restarted_and_serves_again(stack: Stack) -> None:
    before = int(stack.inspect("llm", "{{.RestartCount}}"))
    pid = int(stack.inspect("llm", "{{.State.Pid}}"))
    assert pid > 0
    os.kill(pid, signal.SIGKILL)  # from the host: not a manual stop, so the restart policy applies
    killed = time.monotonic()
    wait_until(
        lambda: int(stack.inspect("llm", "{{.RestartCount}}")) > before,
        timeout=60,
        what="Docker restarting the LLM container",
    )
    wait_until(
        lambda: chat().choices[0].message.content is not None,
        timeout=300,
        interval=1,
        what="chats served again",
    )
    REPORT["llm_kill_to_served_s"] = round(time.monotonic() - killed, 1)
    assert chat().system_fingerprint == "tiny@2"  # the current version, read back from the registry
    wait_until(
        lambda: stack.inspect("llm", "{{.State.Health.Status}}") == "healthy",
        timeout=120,
        interval=2,
        what="the LLM container healthy again",
    )
    log(f"llm: SIGKILL to served again in {REPORT['llm_kill_to_served_s']} s")


def test_a_gateway_that_cannot_start_shows_unhealthy_with_its_first_error(stack: Stack) -> None:
    empty = stack.work / "no_keys.txt"
    empty.write_text("# no key here\n")
    env_file = stack.env_file.read_text()
    try:
        stack.env_file.write_text(
            env_file.replace(f"API_KEYS_FILE={stack.work / 'api_keys.txt'}", f"API_KEYS_FILE={empty}")
        )
        with pytest.raises(HarnessError) as failed:
            stack.up(timeout=60, services=("gateway",))
        message = str(failed.value)
        log(f"as expected: {message.splitlines()[-1]}")
        assert "gateway is " in message and "api_keys_file: expected at least one key" in message, message
    finally:
        stack.env_file.write_text(env_file)
    stack.up(services=("gateway",))
    assert chat().system_fingerprint == "tiny@2"


def test_down_removes_every_container_and_volume(stack: Stack) -> None:
    stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
    df = run(["docker", "system", "df", "--format", "{{json .}}"], quiet=True).stdout
    images = next(json.loads(line) for line in df.splitlines() if json.loads(line)["Type"] == "Images")
    REPORT["images_disk"] = images["Size"]
    log(f"images kept as the build cache: {images['Size']} (docker image prune -a; project {PROJECT})")
