"""`modalmesh up`: run the whole stack as separate processes on loopback and supervise them.

Start order: Redis (only if none answers at the configured URL), then the encoder service, the
LLM service and the trainer side by side; once the encoders are ready, the decoder service (only
for presets with `outputs`, e.g. NExT-GPT: it is the second Triton server, started alone so the
two do not load at once); then the gateway once every backend reports ready. Each service runs in
its own process group with its log in a file; the stack is ready when every health check
passes. On SIGINT/SIGTERM the services are stopped in reverse order (SIGTERM to the process
group, which drains, then SIGKILL to what is left after a grace period). If a service dies while
the stack runs, the others are stopped and the supervisor exits non-zero. Starting a process
group, stopping it and waiting for a signal are `services.common.procenv`'s, as for the
trainer's launcher and the Triton services.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.health import grpc_serving, http_ok
from services.common.procenv import StopSignals, service_env, start_group, stop_group
from services.common.settings import Settings


class StackError(RuntimeError):
    """The stack could not start; the message says which part and why."""


def settings_env(settings: Settings) -> dict[str, str]:
    """MODALMESH_* variables that reproduce `settings` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"MODALMESH_{name.upper()}"] = str(value)
    return env


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class Service:
    """One supervised child process."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        log = self.log_path.open("ab")
        self._log = log
        self.proc = start_group(self.argv, env=env, log=log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the process group, SIGKILL what is left of it after `grace_s`; the exit code."""
        if self.proc is None:
            return None
        code = stop_group(self.proc.pid, grace_s=grace_s, wait=self.proc)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
        return code


class Stack:
    """The supervised set of modalmesh processes for one preset.

    Args:
        settings: Addresses, preset and paths; passed to every child as MODALMESH_* variables.
        log_dir: Folder for one log file per service.
        out: Where progress lines go (the terminal for `modalmesh up`).
    """

    def __init__(self, settings: Settings, *, log_dir: Path, out: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.out = out
        self.services: list[Service] = []
        self.redis_dir: tempfile.TemporaryDirectory[str] | None = None
        self.started_redis = False
        self.decoder_models: list[str] = []  # the decoder service's Triton models, if it runs

    # -- start -------------------------------------------------------------------------
    def _check_ports(self, *, decoders: bool = False) -> None:
        """Raise StackError naming every port that is taken (the decoder's only if it will run)."""
        s = self.settings
        wanted = {
            "gateway HTTP (--gateway-port, MODALMESH_GATEWAY_HTTP_PORT)": s.gateway_http_port,
            "gateway gRPC (--grpc-port, MODALMESH_GATEWAY_GRPC_PORT)": s.gateway_grpc_port,
            "LLM (--llm-port, MODALMESH_LLM_PORT)": s.llm_port,
            "encoder HTTP (--encoder-http-port, MODALMESH_ENCODER_HTTP_PORT)": s.encoder_http_port,
            "encoder gRPC (--encoder-grpc-port, MODALMESH_ENCODER_GRPC_PORT)": s.encoder_grpc_port,
            "encoder metrics (--encoder-metrics-port, MODALMESH_ENCODER_METRICS_PORT)": s.encoder_metrics_port,
        }
        if s.llm_metrics_port:
            wanted["LLM metrics (--llm-metrics-port, MODALMESH_LLM_METRICS_PORT)"] = s.llm_metrics_port
        if decoders:
            wanted |= {
                "decoder HTTP (--decoder-http-port, MODALMESH_DECODER_HTTP_PORT)": s.decoder_http_port,
                "decoder gRPC (--decoder-grpc-port, MODALMESH_DECODER_GRPC_PORT)": s.decoder_grpc_port,
                "decoder metrics (--decoder-metrics-port, MODALMESH_DECODER_METRICS_PORT)": s.decoder_metrics_port,
            }
        taken = [f"{port} for {what}" for what, port in wanted.items() if not port_is_free(s.host, port)]
        if taken:
            raise StackError("ports already in use on " + s.host + ": " + "; ".join(taken))

    def _ensure_redis(self) -> None:
        url = self.settings.redis_url
        if redis_answers(url):
            self.out(f"using the Redis server at {url}")
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(
                f"no Redis answers at {url} and redis-server is not installed "
                "(Debian: apt-get install redis-server), or pass --redis-url"
            )
        port = free_port(self.settings.host)
        self.redis_dir = tempfile.TemporaryDirectory(prefix="modalmesh-redis-")
        svc = Service(
            "redis",
            [
                binary,
                "--bind",
                self.settings.host,
                "--port",
                str(port),
                "--dir",
                self.redis_dir.name,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                # Bounded: past the limit Redis evicts the least recently used keys that have a
                # TTL (the feature cache's), never the Celery queue or the adapter registry.
                "--maxmemory",
                f"{self.settings.redis_maxmemory_mb}mb",
                "--maxmemory-policy",
                "volatile-lru",
            ],
            ready=lambda: redis_answers(f"redis://{self.settings.host}:{port}/0"),
            log_path=self.log_dir / "redis.log",
        )
        svc.start(dict(os.environ))
        self.services.append(svc)
        self.started_redis = True
        self.settings = self.settings.model_copy(
            update={"redis_url": f"redis://{self.settings.host}:{port}/0"}
        )
        self._wait([svc], timeout_s=20)
        self.out(f"started redis-server at {self.settings.redis_url} (data in {self.redis_dir.name})")

    def _python_service(self, name: str, module: str, ready: Callable[[], bool]) -> Service:
        return Service(
            name, [sys.executable, "-m", module], ready=ready, log_path=self.log_dir / f"{name}.log"
        )

    def _wait(self, services: list[Service], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(services)
        while pending:
            for svc in list(pending):
                if not svc.alive():
                    raise StackError(f"{svc.name} exited during start-up; last log lines:\n{svc.log_tail()}")
                if svc.ready():
                    pending.remove(svc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                tails = "\n".join(f"--- {s.name} ({s.log_path}):\n{s.log_tail()}" for s in pending)
                raise StackError(f"not ready after {timeout_s:.0f}s: {names}\n{tails}")
            if pending:
                time.sleep(0.25)

    def start(self, timeout_s: float = 300.0) -> None:
        """Start every service and wait until all are healthy; on failure stop what started."""
        from services.common.presets import load_preset
        from services.models.tiny import ensure_generated

        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            preset = load_preset(
                self.settings.preset, cache_dir=self.settings.cache_dir, presets_dir=self.settings.presets_dir
            )
            self._check_ports(decoders=bool(preset.outputs))
            if ensure_generated(preset):
                self.out(f"generated the {preset.name} preset's models under {preset.llm.checkpoint.parent}")
            self._ensure_redis()
            s = self.settings
            encoder_ready_urls = [
                f"http://{s.host}:{s.encoder_http_port}/v2/models/{preset.triton_model(m)}/ready"
                for m in preset.modalities
            ]
            encoders = self._python_service(
                "encoders",
                "services.encoders",
                lambda: all(http_ok(u) for u in encoder_ready_urls),
            )
            backends = [
                encoders,
                self._python_service(
                    "llm", "services.llm", lambda: grpc_serving(s.llm_target(), "modalmesh.v1.LLM")
                ),
            ]
            trainer = self._python_service(
                "trainer", "services.trainer", lambda: " ready." in trainer.log_tail(200)
            )
            backends.append(trainer)
            gateway = self._python_service(
                "gateway", "gateway", lambda: http_ok(f"http://{s.host}:{s.gateway_http_port}/health")
            )
            env = service_env(os.environ | settings_env(s))
            for svc in backends:
                svc.start(env)
                self.services.append(svc)
            if preset.outputs:
                self.decoder_models = [preset.decoder_model(m) for m in preset.outputs]
                self._wait([encoders], timeout_s)
                backends.append(self._start_decoders(env))
            self._wait(backends, timeout_s)
            gateway.start(env)
            self.services.append(gateway)
            self._wait([gateway], timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_decoders(self, env: dict[str, str]) -> Service:
        """Start the decoder service; it is ready when every decoder model is."""
        s = self.settings
        urls = [f"http://{s.host}:{s.decoder_http_port}/v2/models/{m}/ready" for m in self.decoder_models]
        svc = self._python_service("decoders", "services.decoders", lambda: all(http_ok(u) for u in urls))
        svc.start(env)
        self.services.append(svc)
        return svc

    # -- run and stop ------------------------------------------------------------------
    def dead(self) -> Service | None:
        """The first service that has exited, if any."""
        return next((s for s in self.services if not s.alive()), None)

    def stop(self) -> None:
        """Stop every service, newest first, each with the drain time as its grace period."""
        grace = self.settings.drain_seconds + 5.0
        for svc in reversed(self.services):
            if svc.proc is not None:
                code = svc.stop(grace)
                self.out(f"stopped {svc.name} (exit code {code})")
        self.services.clear()
        if self.redis_dir is not None:
            self.redis_dir.cleanup()
            self.redis_dir = None

    def describe(self) -> str:
        s = self.settings
        redis_note = "started by modalmesh" if self.started_redis else "existing server"
        return "\n".join(
            [
                f"  OpenAI API     http://{s.host}:{s.gateway_http_port}/v1  (POST /v1/chat/completions)",
                f"  health/metrics http://{s.host}:{s.gateway_http_port}/health  /metrics",
                f"  gRPC Chat      {s.host}:{s.gateway_grpc_port}  (modalmesh.v1.Chat)",
                f"  LLM service    {s.llm_target()}  (modalmesh.v1.LLM)"
                + (f"  metrics http://{s.host}:{s.llm_metrics_port}/metrics" if s.llm_metrics_port else ""),
                f"  encoders       grpc {s.encoder_target()}  http {s.host}:{s.encoder_http_port}  "
                f"metrics {s.host}:{s.encoder_metrics_port}  (KServe v2 / Triton)",
                *(
                    [
                        f"  decoders       grpc {s.decoder_target()}  http {s.host}:{s.decoder_http_port}  "
                        f"metrics {s.host}:{s.decoder_metrics_port}  ({', '.join(self.decoder_models)})"
                    ]
                    if self.decoder_models
                    else []
                ),
                f"  training jobs  http://{s.host}:{s.gateway_http_port}/v1/training/jobs  "
                f"(Celery queue train.{s.trainer_hardware}; job folders in {s.jobs_root()})",
                f"  adapters       {s.artifact_root()}  (modalmesh adapters list)",
                f"  Redis          {s.redis_url}  ({redis_note})",
                f"  logs           {self.log_dir}",
            ]
        )


def run_until_signal(stack: Stack) -> int:
    """Block until SIGINT/SIGTERM (exit 0) or until a service dies (exit 1); then stop all."""
    with StopSignals() as signals:
        try:
            if signals.watch(lambda: stack.dead() is None, poll_s=0.25):
                stack.out(f"received {signals.received}, stopping")
                return 0
            dead = stack.dead()
            if dead is not None:  # always: that is why the watch ended
                stack.out(f"{dead.name} exited unexpectedly; last log lines:\n{dead.log_tail()}")
            return 1
        finally:
            stack.stop()
