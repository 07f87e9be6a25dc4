"""Start the real modalmesh services as test processes (encoders, decoders, LLM, gateway) on given ports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from tests.helpers.procs import Process, free_ports, start_process


def start_encoders(env: dict[str, str], log_path: Path, *, http: int, grpc: int, metrics: int) -> Process:
    """`python -m services.encoders` on the given Triton ports."""
    args = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    return start_process([sys.executable, "-m", "services.encoders", *args], log_path=log_path, env=env)


def start_decoders(env: dict[str, str], log_path: Path, *, http: int, grpc: int, metrics: int) -> Process:
    """`python -m services.decoders` on the given Triton ports."""
    args = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    return start_process([sys.executable, "-m", "services.decoders", *args], log_path=log_path, env=env)


def start_llm(env: dict[str, str], log_path: Path, *, port: int) -> Process:
    """`python -m services.llm` on the given port (its /metrics off unless `env` sets a port:
    several replicas run at once in some tests)."""
    env = {"MODALMESH_LLM_METRICS_PORT": "0", **env}
    return start_process(
        [sys.executable, "-m", "services.llm", "--port", str(port)], log_path=log_path, env=env
    )


def start_gateway(
    env: dict[str, str], log_path: Path, *, ports: tuple[int, int] | None = None
) -> tuple[Process, str, str]:
    """`python -m gateway` on free ports; returns the process, its base URL and its gRPC address.

    Pass `ports` (http, grpc) picked together with the other services' ports: ports picked
    later can collide with a port another service picked but has not bound yet. Media fetches
    from 127.0.0.1 are allowed (MODALMESH_FETCH_ALLOW) unless `env` or the environment says
    otherwise: tests serve media from loopback, which the gateway refuses by default.
    """
    if "MODALMESH_FETCH_ALLOW" not in env and "MODALMESH_FETCH_ALLOW" not in os.environ:
        env = {**env, "MODALMESH_FETCH_ALLOW": "127.0.0.1"}
    http_port, grpc_port = ports or free_ports(2)
    args = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    proc = start_process([sys.executable, "-m", "gateway", *args], log_path=log_path, env=env)
    return proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


def gateway_healthy(base_url: str) -> bool:
    """Whether the gateway's /health says every dependency is ready."""
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_stack_healthy(base_url: str, procs: list[Process], *, timeout: float, what: str) -> None:
    """Wait until the gateway at `base_url` is healthy and every process in `procs` runs.

    Raises:
        AssertionError: A process exited, or the stack was not healthy after `timeout` seconds;
            the message carries the last /health body and the log tail of every process, so a
            failure in CI names the service that was not ready.
    """
    import time

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{what}: {proc.popen.args!r} exited first; log:\n{proc.log_tail()}")
        try:
            r = httpx.get(f"{base_url}/health", timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text}"
        except httpx.HTTPError as e:
            last = repr(e)
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {proc.popen.args!r}:\n{proc.log_tail(30)}" for proc in procs)
            raise AssertionError(f"{what}: not healthy after {timeout}s; last /health: {last}\n{logs}")
        time.sleep(0.2)


def start_redis(data_dir: Path, *, port: int | None = None, appendonly: bool = False) -> tuple[Process, str]:
    """A private `redis-server` on a free loopback port; returns the process and its URL.

    With `appendonly`, it persists to `data_dir` (fsync every write), so a restart on the same
    port and folder comes back with the data: used by the tests that restart Redis mid-job.
    """
    import shutil

    from tests.helpers.procs import wait_until

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or free_ports(1)[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    args += ["--maxmemory-policy", "noeviction"]
    proc = start_process(args, log_path=data_dir / f"redis-{port}.log")
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    wait_until(answers, timeout=15, what=f"redis-server on port {port}")
    return proc, url
