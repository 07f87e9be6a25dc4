"""`python -m gateway` as a process on its own: it starts without its backends, says so in
/health, still lists the preset, answers 503 for chat, and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.procs import free_port, free_ports, running_process, wait_until

pytestmark = pytest.mark.integration


def test_gateway_alone(tmp_path: Path) -> None:
    http_port, grpc_port = free_ports(2)
    dead_llm, dead_encoder = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "MODALMESH_CACHE_DIR": str(tmp_path / "cache"),
        "MODALMESH_GATEWAY_HTTP_PORT": "1",  # overridden by the flag
        "MODALMESH_REDIS_URL": "redis://127.0.0.1:1/0",
    }  # no Redis: still serves
    args = [
        sys.executable,
        "-m",
        "gateway",
        "--preset",
        "tiny",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--llm-address",
        dead_llm,
        "--encoder-address",
        dead_encoder,
    ]
    base = f"http://127.0.0.1:{http_port}"
    with running_process(args, log_path=tmp_path / "gateway.log", env=env) as proc:
        wait_until(
            lambda: httpx.get(f"{base}/v1/models", timeout=1).status_code == 200,
            timeout=60,
            what="gateway up",
            proc=proc,
        )
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny"]

        health = httpx.get(f"{base}/health")
        assert health.status_code == 503
        assert health.json()["checks"] == {"llm": "down", "encoder": "down"}
        assert f"the llm service at {dead_llm} is not ready" in health.json()["error"]["message"]

        r = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"X-Request-Id": "proc-1"},
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 503 and r.headers["x-request-id"] == "proc-1"
        assert r.json()["error"]["message"].startswith("the llm service is unavailable")

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="modalmesh.v1.Chat"), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        assert proc.terminate(timeout=30) == 0
        lines = [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
        assert {line["service"] for line in lines} == {"gateway"}
        assert any(line.get("request_id") == "proc-1" for line in lines)
        assert lines[-1]["msg"] == "stopped"
