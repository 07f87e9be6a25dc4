"""The health probes (`python -m services.common.health`) against real servers on port 0: an
HTTP server answering 200 or 503, and a gRPC server with the standard health service."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.health import grpc_serving, http_ok, main

ROOT = Path(__file__).resolve().parents[4]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def grpc_target() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_http_is_healthy_on_2xx_only(http_url: str) -> None:
    assert http_ok(f"{http_url}/ready")
    assert not http_ok(f"{http_url}/starting")
    assert main(["http", f"{http_url}/ready"]) == 0
    assert main(["http", f"{http_url}/starting", "--timeout", "1"]) == 1
    assert not http_ok("http://127.0.0.1:9/nothing-listens", timeout=0.5)


def test_grpc_is_healthy_when_the_service_is_serving(grpc_target: tuple[str, health.HealthServicer]) -> None:
    target, servicer = grpc_target
    servicer.set("modalmesh.v1.LLM", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not grpc_serving(target, "modalmesh.v1.LLM")
    assert main(["grpc", target, "modalmesh.v1.LLM"]) == 1
    servicer.set("modalmesh.v1.LLM", health_pb2.HealthCheckResponse.SERVING)
    assert grpc_serving(target, "modalmesh.v1.LLM")
    assert main(["grpc", target, "modalmesh.v1.LLM"]) == 0
    assert not grpc_serving(target, "modalmesh.v1.Unknown")


def test_the_module_runs_as_a_health_check_command(http_url: str) -> None:
    """As compose runs it: a fresh interpreter, `python -m`, the exit code."""
    ok = subprocess.run(
        [sys.executable, "-m", "services.common.health", "http", f"{http_url}/ready"], timeout=60
    )
    bad = subprocess.run(
        [sys.executable, "-m", "services.common.health", "http", f"{http_url}/x"], timeout=60
    )
    assert (ok.returncode, bad.returncode) == (0, 1)
