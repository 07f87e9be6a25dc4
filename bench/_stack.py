"""Starting what the benchmarks need on free loopback ports: Redis, the modalmesh services, the baseline.

Everything runs as separate processes in their own sessions (tests.helpers.procs), logs go to
the run's folder, and `running` stops them newest first whatever happens.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.presets import Preset, load_preset
from services.models.tiny import ensure_generated
from tests.helpers.procs import Process, free_ports, start_process, stop_all, wait_until
from tests.helpers.services import (
    gateway_healthy,
    start_encoders,
    start_gateway,
    start_llm,
    start_redis,
)

STARTUP_TIMEOUT_S = 300.0


@dataclass
class Stack:
    """Addresses of what was started (None: not needed by the selected benchmarks)."""

    preset: Preset
    root: Path
    gateway_url: str | None = None
    baseline_url: str | None = None
    encoder_grpc: str | None = None


def _ok(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


@contextlib.contextmanager
def running(
    preset_name: str, root: Path, *, modalmesh: bool, encoders: bool, baseline: bool
) -> Iterator[Stack]:
    """Start the services asked for (the gateway implies the encoders, LLM and Redis).

    Args:
        preset_name: The preset every process serves.
        root: Cache folder (generated models) and logs.
        modalmesh: Start Redis, the encoder and LLM services and the gateway.
        encoders: Start the encoder service (implied by `modalmesh`).
        baseline: Start the seed-style baseline server.
    """
    preset = load_preset(preset_name, cache_dir=root)
    ensure_generated(preset)
    stack = Stack(preset=preset, root=root)
    procs: list[Process] = []
    ports = free_ports(7)
    env = {
        "MODALMESH_PRESET": preset_name,
        "MODALMESH_CACHE_DIR": str(root),
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{ports[3]}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{ports[1]}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    try:
        if modalmesh:
            redis, env["MODALMESH_REDIS_URL"] = start_redis(root / "redis")
            procs.append(redis)
        if modalmesh or encoders:
            procs.append(
                start_encoders(env, root / "encoders.log", http=ports[0], grpc=ports[1], metrics=ports[2])
            )
            stack.encoder_grpc = env["MODALMESH_ENCODER_ADDRESS"]
        if modalmesh:
            procs.append(start_llm(env, root / "llm.log", port=ports[3]))
            gateway, url, _ = start_gateway(env, root / "gateway.log", ports=(ports[4], ports[5]))
            procs.append(gateway)
            stack.gateway_url = url
        if baseline:
            args = [
                sys.executable,
                "-m",
                "bench.baseline_server",
                "--preset",
                preset_name,
                "--port",
                str(ports[6]),
            ]
            procs.append(start_process(args, log_path=root / "baseline.log", env=env))
            stack.baseline_url = f"http://127.0.0.1:{ports[6]}"
        if stack.gateway_url is not None:
            url = stack.gateway_url
            wait_until(
                lambda: gateway_healthy(url) and _ok(url),
                timeout=STARTUP_TIMEOUT_S,
                what="modalmesh stack ready",
                proc=procs[-2 if baseline else -1],
            )
        if stack.encoder_grpc is not None and not modalmesh:
            wait_until(
                lambda: _triton_ready(stack),
                timeout=STARTUP_TIMEOUT_S,
                what="encoder service ready",
                proc=procs[0],
            )
        if stack.baseline_url is not None:
            base = stack.baseline_url
            wait_until(lambda: _ok(base), timeout=STARTUP_TIMEOUT_S, what="baseline ready", proc=procs[-1])
        yield stack
    finally:
        stop_all(reversed(procs))


def _triton_ready(stack: Stack) -> bool:
    import tritonclient.grpc as grpcclient

    assert stack.encoder_grpc is not None
    client = grpcclient.InferenceServerClient(stack.encoder_grpc)
    try:
        return bool(client.is_model_ready(stack.preset.triton_model("image")))
    finally:
        client.close()
