"""`modalmesh up`: run the whole stack as separate processes on loopback and supervise them.

Start order: Redis (only if none answers at the configured URL), then the encoder service, the
LLM service and the trainer side by side; once the encoders are ready, the decoder service (only
for presets with `outputs`, e.g. NExT-GPT: it is the second Triton server, started alone so the
two do not load at once); then the gateway once every backend reports ready. Each service runs in
its own process group with its log in a file; the stack is ready when every health check
passes. The Redis it starts keeps its data (an append-only file under <cache-dir>/redis/<port>)
and listens on the configured URL's port, so a restart of Redis or of the stack keeps the
adapter registry, job records and queued jobs.

While the stack runs, a service that exits is restarted (what is left of its process group is
killed first) with the backoff and give-up rule of `modalmesh.supervise.RestartPolicy`; the
others keep serving, and the gateway answers 503 naming the tier that is down. With
`exit_on_failure` the first exit stops the whole stack instead (for CI-like use). The restart
and give-up counters and each service's state are served at `supervisor_port` (`/metrics`,
`/status`). On SIGINT/SIGTERM the services are stopped in reverse order (SIGTERM to the process
group, which drains, then SIGKILL to what is left after a grace period). Starting a process
group, stopping it and waiting for a signal are `services.common.procenv`'s, as for the
trainer's launcher and the Triton services.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from modalmesh.supervise import GIVEN_UP, RUNNING, STARTING, RestartPolicy, StatusServer, Supervision
from services.common.health import grpc_serving, http_ok
from services.common.procenv import StopSignals, group_alive, service_env, start_group, stop_group
from services.common.settings import Settings

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


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
    _log_offset: int = 0  # where this start's output begins in the log file

    def start(self, env: dict[str, str]) -> None:
        log = self.log_path.open("ab")
        self._log = log
        self._log_offset = log.tell()
        self.proc = start_group(self.argv, env=env, log=log)

    def log_since_start(self) -> str:
        """What the current run wrote to the log (a restarted service appends to the same file)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def reap(self) -> int | None:
        """After the leader exited: kill what is left of its process group, close the log;
        the leader's exit code."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if group_alive(self.proc.pid):
            stop_group(self.proc.pid, grace_s=2.0)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        return code

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
            self._log = None
        return code


class Stack:
    """The supervised set of modalmesh processes for one preset.

    Args:
        settings: Addresses, preset and paths; passed to every child as MODALMESH_* variables.
        log_dir: Folder for one log file per service.
        out: Where progress lines go (the terminal for `modalmesh up`).
        exit_on_failure: Stop the whole stack when a service exits (`run_until_signal` returns
            1) instead of restarting it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        log_dir: Path,
        out: Callable[[str], None] = print,
        exit_on_failure: bool = False,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.out = out
        self.exit_on_failure = exit_on_failure
        self.services: list[Service] = []
        self.redis_dir: Path | None = None
        self.started_redis = False
        self.decoder_models: list[str] = []  # the decoder service's Triton models, if it runs
        self.supervision = Supervision(
            RestartPolicy(
                max_restarts=settings.restart_max,
                window_s=settings.restart_window_s,
                backoff_s=settings.restart_backoff_s,
                backoff_max_s=settings.restart_backoff_max_s,
            )
        )
        self.status_server: StatusServer | None = None
        self.env: dict[str, str] = {}

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
        if s.supervisor_port:
            wanted["modalmesh up's /metrics and /status (--supervisor-port, MODALMESH_SUPERVISOR_PORT)"] = (
                s.supervisor_port
            )
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

    def _redis_port(self) -> int:
        """The port for the Redis we start: the URL's when it is on this machine and free (so the
        URL everybody was given works and stays the same across restarts), else a free one."""
        parts = urlsplit(self.settings.redis_url)
        host, port = parts.hostname or "", parts.port or 6379
        if host in (*LOCAL_HOSTS, self.settings.host) and port_is_free(self.settings.host, port):
            return port
        return free_port(self.settings.host)

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
        port = self._redis_port()
        self.redis_dir = Path(self.settings.cache_dir) / "redis" / str(port)
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        parts = urlsplit(url)
        db = parts.path or "/0"
        new_url = urlunsplit(("redis", f"{self.settings.host}:{port}", db, "", ""))
        svc = Service(
            "redis",
            [
                binary,
                "--bind",
                self.settings.host,
                "--port",
                str(port),
                "--dir",
                str(self.redis_dir),
                # Persistent: every write goes to the append-only file (fsync once a second), so
                # a restart keeps the adapter registry, job records and queued jobs. No RDB
                # snapshots: the AOF is the one copy.
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                # Bounded: past the limit Redis evicts the least recently used keys that have a
                # TTL (the feature cache's), never the Celery queue or the adapter registry.
                "--maxmemory",
                f"{self.settings.redis_maxmemory_mb}mb",
                "--maxmemory-policy",
                "volatile-lru",
            ],
            ready=lambda: redis_answers(new_url),
            log_path=self.log_dir / "redis.log",
        )
        svc.start(dict(os.environ))
        self.services.append(svc)
        self.started_redis = True
        self.settings = self.settings.model_copy(update={"redis_url": new_url})
        self._wait([svc], timeout_s=20)
        self.out(f"started redis-server at {new_url} (append-only file in {self.redis_dir})")

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
            if self.settings.supervisor_port:
                self.status_server = StatusServer(
                    self.supervision, self.settings.host, self.settings.supervisor_port
                )
                self.status_server.start()
                self.settings = self.settings.model_copy(update={"supervisor_url": self.status_server.url})
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
                "trainer", "services.trainer", lambda: " ready." in trainer.log_since_start()
            )
            backends.append(trainer)
            gateway = self._python_service(
                "gateway", "gateway", lambda: http_ok(f"http://{s.host}:{s.gateway_http_port}/health")
            )
            env = service_env(os.environ | settings_env(s))
            self.env = env
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
            for svc in self.services:
                self.supervision.add(svc.name, svc.proc.pid if svc.proc else None)
                self.supervision.ready(svc.name)
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
    def supervise_once(self) -> bool:
        """One round over the services: notice exits, restart what is due, mark what turned
        healthy. False when a service exited and `exit_on_failure` is set (the stack must stop)."""
        sup = self.supervision
        for svc in self.services:
            state = sup.state(svc.name)
            if state == GIVEN_UP:
                continue
            if sup.due(svc.name):
                svc.start(self.env)
                assert svc.proc is not None
                sup.restarted(svc.name, svc.proc.pid)
                restarts = sup.services[svc.name].restarts
                self.out(f"restarting {svc.name} (restart {restarts}, pid {svc.proc.pid})")
                continue
            if state not in (STARTING, RUNNING):
                continue
            if not svc.alive():
                code = svc.reap()
                if self.exit_on_failure:
                    self.out(
                        f"{svc.name} exited unexpectedly (exit code {code}); last log lines:\n{svc.log_tail()}"
                    )
                    return False
                delay = sup.exited(svc.name, code)
                if delay is None:
                    self.out(
                        f"GIVING UP on {svc.name}: {sup.services[svc.name].reason}. The rest keeps running; "
                        f"last log lines ({svc.log_path}):\n{svc.log_tail()}"
                    )
                else:
                    self.out(f"{svc.name} exited unexpectedly (exit code {code}); restarting in {delay:.1f}s")
                continue
            if state == STARTING:
                if svc.ready():
                    sup.ready(svc.name)
                    self.out(f"{svc.name} is serving again")
            else:
                sup.stable(svc.name)
        return True

    def stop(self) -> None:
        """Stop every service, newest first, each with the drain time as its grace period."""
        grace = self.settings.drain_seconds + 5.0
        for svc in reversed(self.services):
            if svc.proc is not None:
                code = svc.stop(grace)
                self.out(f"stopped {svc.name} (exit code {code})")
        self.services.clear()
        self.redis_dir = None
        if self.status_server is not None:
            self.status_server.stop()
            self.status_server = None

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
                *(
                    [f"  supervisor     {s.supervisor_url}/status  /metrics  (restarts, give-ups)"]
                    if s.supervisor_url
                    else []
                ),
                f"  logs           {self.log_dir}",
            ]
        )


def run_until_signal(stack: Stack) -> int:
    """Supervise until SIGINT/SIGTERM, then stop all. Exit code 0, or 1 if a service was given
    up on meanwhile or (with `exit_on_failure`) as soon as a service exits."""
    with StopSignals() as signals:
        try:
            while not signals.event.is_set():
                if not stack.supervise_once():
                    return 1
                signals.event.wait(0.25)
            stack.out(f"received {signals.received}, stopping")
            given_up = stack.supervision.given_up()
            if given_up:
                stack.out(f"given up on while running: {', '.join(given_up)}")
                return 1
            return 0
        finally:
            stack.stop()
