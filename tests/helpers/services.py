"""Start the real modalmesh services as test processes (encoders, LLM, gateway) on given ports."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tests.helpers.procs import Process, free_ports, start_process


def start_encoders(env: dict[str, str], log_path: Path, *, http: int, grpc: int, metrics: int) -> Process:
    """`python -m services.encoders` on the given Triton ports."""
    args = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    return start_process([sys.executable, "-m", "services.encoders", *args], log_path=log_path, env=env)


def start_llm(env: dict[str, str], log_path: Path, *, port: int) -> Process:
    """`python -m services.llm` on the given port."""
    return start_process(
        [sys.executable, "-m", "services.llm", "--port", str(port)], log_path=log_path, env=env
    )


def start_gateway(env: dict[str, str], log_path: Path) -> tuple[Process, str, str]:
    """`python -m gateway` on free ports; returns the process, its base URL and its gRPC address."""
    http_port, grpc_port = free_ports(2)
    args = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    proc = start_process([sys.executable, "-m", "gateway", *args], log_path=log_path, env=env)
    return proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


def gateway_healthy(base_url: str) -> bool:
    """Whether the gateway's /health says every dependency is ready."""
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
