"""How `modalmesh up` keeps its services running: the restart policy, each service's state, and
the supervisor's own HTTP endpoint (`/metrics` for Prometheus, `/status` as JSON).

The policy is the one Docker's restart policy and supervisord's `autorestart` apply, with
systemd's start limit: a service that exits while the stack runs (any exit code: we did not ask
it to stop) is started again after a delay that doubles from `backoff_s` up to `backoff_max_s`,
and resets once the service has stayed healthy for `reset_after_s`. A service that had to be
restarted `max_restarts` times within `window_s` is given up on: it stays down, its log tail is
printed, `/status` (and through it the gateway's `/health`) names it, and the rest of the stack
keeps running.

Why not supervisord or circus: both run as their own daemon configured from a file and start
processes without knowing our readiness checks (a Triton model's `/ready`, the LLM's gRPC health,
the trainer's "ready." line) or our start order (decoders after encoders, the gateway last), and
they would take over process groups that `services.common.procenv` already manages for the
trainer's launcher and the Triton services. What `modalmesh up` needs on top of that is the
state machine below, about a hundred lines.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STARTING, RUNNING, BACKOFF, GIVEN_UP = "starting", "running", "backoff", "given-up"


@dataclass(frozen=True)
class RestartPolicy:
    """When to start a service that exited again, and when to stop trying.

    Args:
        max_restarts: Restarts allowed within `window_s`; one more crash and the service is
            given up on. 0: never restart (the first exit gives up).
        window_s: The window the restarts are counted in.
        backoff_s: The delay before the first restart; it doubles with each crash in a row.
        backoff_max_s: The largest delay.
        reset_after_s: A service healthy this long is stable again: the next crash waits
            `backoff_s` only.
    """

    max_restarts: int = 5
    window_s: float = 300.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    reset_after_s: float = 10.0

    def delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before restart number `crashes_in_a_row` (1 = the first) of a run."""
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, crashes_in_a_row - 1)))


@dataclass
class ServiceState:
    """What the supervisor knows about one service."""

    name: str
    state: str = STARTING
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None  # wall-clock time of the last unexpected exit
    healthy_since: float | None = None  # monotonic; None while not (yet) healthy again
    ready_at: float | None = None  # wall-clock time it last turned healthy
    next_start_at: float | None = None  # monotonic, in BACKOFF
    crashes_in_a_row: int = 0
    restart_times: list[float] = field(default_factory=list)  # monotonic, within the window
    reason: str = ""  # why it was given up on

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "last_exit_at": self.last_exit_at,
            "ready_at": self.ready_at,
            **({"reason": self.reason} if self.reason else {}),
        }


class Supervision:
    """The restart bookkeeping of every service, its Prometheus counters and the status view.

    Thread-safe: the supervising loop writes, the HTTP endpoint reads.
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.services: dict[str, ServiceState] = {}
        self.lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.restarts_total = Counter(
            "modalmesh_supervisor_restarts_total",
            "Services started again by `modalmesh up` after they exited unexpectedly.",
            ["service"],
            registry=self.registry,
        )
        self.give_ups_total = Counter(
            "modalmesh_supervisor_give_ups_total",
            "Services `modalmesh up` stopped restarting (too many restarts within the window).",
            ["service"],
            registry=self.registry,
        )
        self.service_up = Gauge(
            "modalmesh_supervisor_service_up",
            "1 while the service runs and passed its health check since its last start, else 0.",
            ["service"],
            registry=self.registry,
        )

    def add(self, name: str, pid: int | None) -> None:
        with self.lock:
            self.services[name] = ServiceState(name, pid=pid)
            self.restarts_total.labels(name)
            self.give_ups_total.labels(name)
            self.service_up.labels(name).set(0)

    def ready(self, name: str) -> None:
        with self.lock:
            s = self.services[name]
            s.state = RUNNING
            s.healthy_since = time.monotonic()
            s.ready_at = time.time()
            self.service_up.labels(name).set(1)

    def stable(self, name: str) -> None:
        """Forget the crash streak of a service that has been healthy for `reset_after_s`."""
        with self.lock:
            s = self.services[name]
            healthy_for = time.monotonic() - s.healthy_since if s.healthy_since is not None else 0.0
            if s.crashes_in_a_row and healthy_for >= self.policy.reset_after_s:
                s.crashes_in_a_row = 0

    def exited(self, name: str, code: int | None) -> float | None:
        """Record an unexpected exit; the delay before its restart, or None if given up on."""
        now = time.monotonic()
        with self.lock:
            s = self.services[name]
            s.last_exit_code = code
            s.last_exit_at = time.time()
            s.healthy_since = None
            s.pid = None
            self.service_up.labels(name).set(0)
            s.restart_times = [t for t in s.restart_times if now - t < self.policy.window_s]
            if len(s.restart_times) >= self.policy.max_restarts:
                s.state = GIVEN_UP
                s.reason = (
                    f"exited (code {code}) after {len(s.restart_times)} restarts within "
                    f"{self.policy.window_s:.0f}s; not restarted again"
                )
                self.give_ups_total.labels(name).inc()
                return None
            s.crashes_in_a_row += 1
            delay = self.policy.delay(s.crashes_in_a_row)
            s.state = BACKOFF
            s.next_start_at = now + delay
            return delay

    def due(self, name: str) -> bool:
        with self.lock:
            s = self.services[name]
            return s.state == BACKOFF and s.next_start_at is not None and time.monotonic() >= s.next_start_at

    def restarted(self, name: str, pid: int) -> None:
        with self.lock:
            s = self.services[name]
            s.state = STARTING
            s.pid = pid
            s.restarts += 1
            s.next_start_at = None
            s.restart_times.append(time.monotonic())
            self.restarts_total.labels(name).inc()

    def state(self, name: str) -> str:
        with self.lock:
            return self.services[name].state

    def given_up(self) -> list[str]:
        with self.lock:
            return [n for n, s in self.services.items() if s.state == GIVEN_UP]

    def status(self) -> dict[str, Any]:
        with self.lock:
            services = {n: s.to_json() for n, s in self.services.items()}
        given_up = [n for n, s in services.items() if s["state"] == GIVEN_UP]
        healthy = all(s["state"] == RUNNING for s in services.values())
        return {
            "status": "ok" if healthy else ("failed" if given_up else "recovering"),
            "given_up": given_up,
            "services": services,
        }


class StatusServer:
    """`GET /metrics` (Prometheus text) and `GET /status` (JSON) of a `Supervision`, on a thread."""

    def __init__(self, supervision: Supervision, host: str, port: int) -> None:
        sup = supervision

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    body, ctype = generate_latest(sup.registry), CONTENT_TYPE_LATEST
                elif self.path.split("?")[0] in ("/status", "/"):
                    body, ctype = json.dumps(sup.status()).encode(), "application/json"
                else:
                    self.send_error(404, "GET /status or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="supervisor-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
