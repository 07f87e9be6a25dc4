"""One tiny-preset stack for the whole reliability tier: Redis (appendonly, restartable on its
port), the encoder service, the LLM service (with /metrics and room for 256 requests) and the
gateway, all real processes on loopback ports.

Tests that kill or restart a service bring it back on the same port before they return
(`Stack.restart`), so the next module finds a healthy stack; `stack` checks that anyway.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.media import png_bytes
from tests.helpers.procs import Process, free_ports, stop_all
from tests.helpers.services import (
    start_encoders,
    start_gateway,
    start_llm,
    start_redis,
    wait_stack_healthy,
)

MAX_QUEUED = 256


@dataclass
class Stack:
    """The running stack; `procs` holds the current process of each service."""

    env: dict[str, str]
    logs: Path
    base_url: str
    grpc_address: str
    encoder_ports: dict[str, int]
    llm_port: int
    llm_metrics_url: str
    redis_dir: Path
    redis_port: int
    procs: dict[str, Process] = field(default_factory=dict)
    starts: int = 0

    def start(self, name: str) -> Process:
        """(Re)start one service on its own ports; returns its process (not yet ready)."""
        self.starts += 1
        log = self.logs / f"{name}-{self.starts}.log"
        if name == "llm":
            proc = start_llm(self.env, log, port=self.llm_port)
        elif name == "encoders":
            proc = start_encoders(self.env, log, **self.encoder_ports)
        elif name == "redis":
            proc, _ = start_redis(self.redis_dir, port=self.redis_port, appendonly=True)
        else:
            raise ValueError(name)
        self.procs[name] = proc
        return proc

    def restart(self, name: str, *, timeout: float = 120) -> None:
        """Start `name` again and wait until the gateway is healthy."""
        self.start(name)
        self.wait_healthy(timeout=timeout)

    def wait_healthy(self, *, timeout: float = 120) -> None:
        wait_stack_healthy(
            self.base_url, list(self.procs.values()), timeout=timeout, what="reliability stack"
        )

    def chat(self, **body: Any) -> httpx.Response:
        """POST /v1/chat/completions (model tiny, small max_tokens unless given)."""
        payload = {"model": "tiny", "max_tokens": 3, **body}
        return httpx.post(f"{self.base_url}/v1/chat/completions", json=payload, timeout=60)

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=5).text

    def llm_metrics(self) -> str:
        return httpx.get(self.llm_metrics_url, timeout=5).text


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def text_messages(text: str = "Hello") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def image_messages(seed: int = 0, text: str = "What is it?") -> list[dict[str, Any]]:
    url = data_url(png_bytes(seed=seed))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="package")
def stack(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("reliability-logs")
    ports = free_ports(9)
    enc_http, enc_grpc, enc_metrics, llm_port, llm_metrics, gw_http, gw_grpc, redis_port, _ = ports
    env = {
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LOG_JSON": "true",
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
        "MODALMESH_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "MODALMESH_LLM_METRICS_PORT": str(llm_metrics),
        "MODALMESH_LLM_MAX_QUEUED": str(MAX_QUEUED),
        "MODALMESH_FETCH_ALLOW": "127.0.0.1",
    }
    state = Stack(
        env=env,
        logs=logs,
        base_url=f"http://127.0.0.1:{gw_http}",
        grpc_address=f"127.0.0.1:{gw_grpc}",
        encoder_ports={"http": enc_http, "grpc": enc_grpc, "metrics": enc_metrics},
        llm_port=llm_port,
        llm_metrics_url=f"http://127.0.0.1:{llm_metrics}/metrics",
        redis_dir=tmp_path_factory.mktemp("reliability-redis"),
        redis_port=redis_port,
    )
    try:
        state.start("redis")
        state.start("encoders")
        state.start("llm")
        gateway, _, _ = start_gateway(env, logs / "gateway.log", ports=(gw_http, gw_grpc))
        state.procs["gateway"] = gateway
        state.wait_healthy(timeout=180)
        yield state
    finally:
        stop_all(state.procs[n] for n in ("gateway", "llm", "encoders", "redis") if n in state.procs)


@pytest.fixture()
def healthy_stack(stack: Stack) -> Stack:
    """The stack, healthy (a test before may have left a service restarting)."""
    stack.wait_healthy(timeout=120)
    return stack
