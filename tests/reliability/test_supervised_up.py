"""`modalmesh up` heals itself: each service is SIGKILLed under a steady trickle of chats, from
outside, as a user (or the OOM killer) would, and comes back without a restart of the rest.

One `modalmesh up --preset tiny-nextgpt` (its own Redis, encoders, LLM, decoders, trainer worker,
gateway) serves the whole module. Two client threads send chats one after another, cycling
through a text chat, a streamed text chat, an image chat (needs the encoders) and a "draw" chat
(needs the decoders). Each reply is counted as served, 503 (the gateway's answer while the tier it
needs is down, naming that tier; for the decoders, the reply's media entry carries the 503),
interrupted (a stream that had started when its tier died and ended with an error event naming
the tier) or failed otherwise, which must never happen. The killed process is the service's
main process (its pid from `modalmesh up`'s /status); the supervisor kills what is left of its
process group (tritonserver, ranks) and starts it again.

Also shown: a training job whose worker is killed mid-run resumes from its checkpoint once the
worker is back (the lease requeue) and ends SUCCEEDED with its version published; the Redis that
`modalmesh up` started comes back on its port with the adapter registry, the job records and a
queued job intact; the gateway's /health names the service being restarted; the restart
counters are on `modalmesh up`'s /metrics. The fault table is printed (`pytest -s`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.media import png_bytes
from tests.helpers.procs import listen_ports, wait_until
from tests.helpers.up import UpProcess

pytestmark = pytest.mark.reliability

PRESET = "tiny-nextgpt"
KINDS = ("text", "stream", "image", "draw")
NEEDS = {"text": {"llm"}, "stream": {"llm"}, "image": {"llm", "encoders"}, "draw": {"llm", "decoders"}}
TIER_WORD = {"llm": "llm service", "encoders": "encoder service", "decoders": "decoder service"}


@dataclass
class Up:
    proc: UpProcess
    base_url: str
    supervisor: str
    redis_url: str
    env: dict[str, str]

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.supervisor}/status", timeout=5).json())

    def service(self, name: str) -> dict[str, Any]:
        return dict(self.status()["services"][name])

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "modalmesh", *args],
            env=self.env | {"MODALMESH_REDIS_URL": self.redis_url},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout


@pytest.fixture(scope="module")
def up(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated

    ensure_generated(load_preset(PRESET, cache_dir=tiny_cache_dir))
    root = tmp_path_factory.mktemp("supervised-up")
    flags = (
        "--gateway-port",
        "--grpc-port",
        "--llm-port",
        "--llm-metrics-port",
        "--encoder-http-port",
        "--encoder-grpc-port",
        "--encoder-metrics-port",
        "--decoder-http-port",
        "--decoder-grpc-port",
        "--decoder-metrics-port",
        "--supervisor-port",
    )
    # Bound minutes from now (the stack starts in order): ports outside the ephemeral range.
    *picked, redis_port = listen_ports(len(flags) + 1)
    ports = dict(zip(flags, picked, strict=True))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"  # nothing listens: `up` starts redis-server there
    args = ["--preset", PRESET, "--cache-dir", str(tiny_cache_dir), "--log-dir", str(root / "logs")]
    args += ["--redis-url", redis_url]
    for flag, port in ports.items():
        args += [flag, str(port)]
    env = dict(os.environ) | {
        "MODALMESH_JOBS_DIR": str(root / "jobs"),
        "MODALMESH_ARTIFACT_DIR": str(root / "adapters"),
        "MODALMESH_TRAINER_LEASE_S": "4",
        "MODALMESH_TRAINER_RECOVER_INTERVAL_S": "1",
        "MODALMESH_DECODER_TIMEOUT_S": "60",
    }
    proc = UpProcess(args, env)
    try:
        proc.wait_for("Press Ctrl-C to stop.", timeout=300)
        out = "\n".join(proc.lines)
        assert f"started redis-server at {redis_url}" in out  # on the URL's own port
        yield Up(
            proc,
            f"http://127.0.0.1:{ports['--gateway-port']}",
            f"http://127.0.0.1:{ports['--supervisor-port']}",
            redis_url,
            env,
        )
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(120) == 0, proc.drain()  # nothing was given up on
    finally:
        proc.kill()


# -- the trickle --------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    result: str  # served, 503, interrupted, other
    tier: str = ""  # the tier a 503/interrupted names
    detail: str = ""


@dataclass
class Trickle:
    base_url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, offset: int) -> None:
        i = offset
        with httpx.Client(base_url=self.base_url, timeout=90) as client:
            while not self.stop.is_set():
                kind = KINDS[i % len(KINDS)]
                i += 1
                start = time.time()
                # A new image each time: a repeated one would be a feature-cache hit that never
                # reaches the encoders.
                image = (
                    "data:image/png;base64," + base64.b64encode(png_bytes(seed=1000 * offset + i)).decode()
                )
                try:
                    outcome = self.one(client, kind, image)
                except httpx.HTTPError as e:
                    outcome = ("other", "", f"{type(e).__name__}: {e}")
                with self.lock:
                    self.outcomes.append(Outcome(kind, start, time.time(), *outcome))
                time.sleep(0.1)

    @staticmethod
    def _named_tier(message: str) -> str:
        return next((tier for tier, word in TIER_WORD.items() if word in message), "")

    def one(self, client: httpx.Client, kind: str, image: str) -> tuple[str, str, str]:
        payload: dict[str, Any] = {"model": PRESET, "max_tokens": 6, "temperature": 0}
        if kind == "image":
            content: Any = [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "What?"},
            ]
        elif kind == "draw":
            content = "draw a red square"
            payload |= {"modalities": ["text", "image"], "image": {"height": 32, "width": 32, "seed": 1}}
        else:
            content = "Say something about the sea."
        payload["messages"] = [{"role": "user", "content": content}]
        if kind == "stream":
            payload |= {"stream": True, "max_tokens": 24}
            with client.stream("POST", "/v1/chat/completions", json=payload) as r:
                if r.status_code != 200:
                    r.read()
                    return self._refused(r)
                events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            errors = [e["error"] for e in events if "error" in e]
            if errors:
                tier = self._named_tier(errors[0].get("message", ""))
                return (
                    "interrupted" if tier and errors[0].get("code") == 503 else "other",
                    tier,
                    str(errors[0]),
                )
            finished = any(c.get("finish_reason") for e in events for c in e.get("choices", []))
            return ("served", "", "") if finished else ("other", "", "stream ended without finish_reason")
        r = client.post("/v1/chat/completions", json=payload)
        if r.status_code != 200:
            return self._refused(r)
        message = r.json()["choices"][0]["message"]
        if kind == "draw":
            (entry,) = message["media"]
            if entry["type"] == "error":
                tier = self._named_tier(entry["error"]["message"])
                ok = entry["error"]["code"] == 503 and tier == "decoders"
                return ("503" if ok else "other", tier, str(entry["error"]))
            if entry["type"] != "image_url":
                return ("other", "", f"unexpected media entry {entry}")
        return ("served", "", "")

    def _refused(self, r: httpx.Response) -> tuple[str, str, str]:
        message = r.json().get("error", {}).get("message", "") if r.content else ""
        tier = self._named_tier(message)
        if r.status_code == 503 and tier:
            return ("503", tier, message)
        return ("other", tier, f"{r.status_code}: {r.text[:300]}")

    def since(self, t: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.end >= t]


@pytest.fixture(scope="module")
def trickle(up: Up) -> Iterator[Trickle]:
    t = Trickle(up.base_url)
    threads = [threading.Thread(target=t.run, args=(k,), daemon=True) for k in (0, 2)]
    for thread in threads:
        thread.start()
    try:
        yield t
    finally:
        t.stop.set()
        for thread in threads:
            thread.join(120)


# -- killing and measuring -------------------------------------------------------------------------
ROWS: list[dict[str, Any]] = []
STATE: dict[str, Any] = {}  # what the trainer test leaves for the Redis test


def kill_main_process(up: Up, name: str) -> float:
    pid = up.service(name)["pid"]
    assert pid, up.status()
    os.kill(pid, signal.SIGKILL)
    return time.time()


def wait_restarted(up: Up, name: str, restarts_before: int, *, timeout: float = 180) -> float:
    """Until the supervisor has restarted `name` and it passed its health check; its ready time."""

    def back() -> float | None:
        s = up.service(name)
        return float(s["ready_at"]) if s["state"] == "running" and s["restarts"] > restarts_before else None

    return float(wait_until(back, timeout=timeout, interval=0.2, what=f"{name} restarted and healthy"))


def first_served_after(trickle: Trickle, tier: str, t: float, *, timeout: float = 60) -> float:
    """When the first chat that needs `tier`, sent after `t`, was served."""

    def served() -> float | None:
        done = [
            o.end for o in trickle.since(t) if o.start >= t and o.result == "served" and tier in NEEDS[o.kind]
        ]
        return min(done) if done else None

    return float(wait_until(served, timeout=timeout, interval=0.2, what=f"a chat needing {tier} served"))


def record_row(trickle: Trickle, name: str, killed: float, healthy: float, served: float) -> dict[str, Any]:
    time.sleep(1.0)  # the chats in flight at `served` finish
    window = [o for o in trickle.since(killed) if o.start <= served]
    counts = Counter(o.result for o in window)
    row = {
        "service": name,
        "kill_to_healthy_s": round(healthy - killed, 1),
        "healthy_to_served_s": round(served - healthy, 1),
        "kill_to_served_s": round(served - killed, 1),
        "sent": len(window),
        "served": counts["served"],
        "503": counts["503"],
        "interrupted": counts["interrupted"],
        "other": counts["other"],
        "tiers_named": sorted({o.tier for o in window if o.result in ("503", "interrupted")}),
        "other_details": [f"{o.kind}: {o.detail}" for o in window if o.result == "other"][:5],
    }
    ROWS.append(row)
    print(f"\nfault row: {row}")
    return row


@pytest.mark.parametrize("name", ["llm", "encoders", "decoders"])
def test_a_killed_serving_tier_is_restarted_and_serves_again(up: Up, trickle: Trickle, name: str) -> None:
    wait_until(lambda: len(trickle.since(time.time() - 3)) >= 2, timeout=60, what="the trickle running")
    before = up.service(name)["restarts"]
    killed = kill_main_process(up, name)
    if name == "llm":  # while it is down, /health is 503 and names the service being restarted
        health = wait_until(
            lambda: (
                (h := httpx.get(f"{up.base_url}/health", timeout=5)).status_code == 503
                and "llm" in h.json().get("supervisor", {})
                and h
            ),
            timeout=30,
            interval=0.1,
            what="/health naming the llm as restarting",
        )
        assert health.json()["supervisor"]["llm"].startswith("restarting"), health.json()
    healthy = wait_restarted(up, name, before)
    served = first_served_after(trickle, name, healthy)
    row = record_row(trickle, name, killed, healthy, served)
    assert row["other"] == 0, row["other_details"]
    assert row["healthy_to_served_s"] < 20, row  # the target is 5 s; this bounds a hung reconnect
    assert set(row["tiers_named"]) <= {name}, row  # a 503 names the tier that is down, no other
    if name != "llm":  # chats that do not need the killed tier kept being served throughout
        others = [o for o in trickle.since(killed) if o.start <= served and name not in NEEDS[o.kind]]
        assert others and all(o.result == "served" for o in others), others[:5]


def _job_spec(data: Path) -> dict[str, Any]:
    return {
        "preset": PRESET,
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": str(data / "captions.json")}],
        "hyperparameters": {"max_steps": 40, "micro_batch_size": 4, "checkpoint_every": 5, "lr": 1e-3},
        "deepspeed": {"world_size": 1, "zero_stage": 2},
    }


def _job(up: Up, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{up.base_url}/v1/training/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_killed_trainer_worker_comes_back_and_its_job_resumes(
    up: Up, trickle: Trickle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from services.trainer.synth import synthesize

    data = tmp_path_factory.mktemp("synth-supervised")
    synthesize(data, train=32, heldout=2, seed=4, modalities=["image"])
    r = httpx.post(f"{up.base_url}/v1/training/jobs", json=_job_spec(data), timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    STATE["data"] = data
    wait_until(
        lambda: _job(up, job_id).get("progress", {}).get("step", 0) >= 12,
        timeout=240,
        interval=0.5,
        what="the job past its second checkpoint",
    )
    before = up.service("trainer")["restarts"]
    killed = kill_main_process(up, "trainer")
    healthy = wait_restarted(up, "trainer", before)
    resumed = wait_until(
        lambda: (j := _job(up, job_id))["attempts"] >= 2 and j["state"] in ("RUNNING", "SUCCEEDED") and j,
        timeout=120,
        interval=0.5,
        what="the job running again on the restarted worker",
    )
    resumed_at = time.time()
    done = wait_until(
        lambda: (j := _job(up, job_id))["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") and j,
        timeout=300,
        interval=0.5,
        what="the job finished",
    )
    assert done["state"] == "SUCCEEDED", done
    assert done["resumed_from_step"] is not None and done["resumed_from_step"] >= 5, done
    assert done["published"] and done["published"]["version"], done
    assert resumed["attempts"] == 2
    row = record_row(trickle, "trainer", killed, healthy, resumed_at)
    row["job"] = {
        "attempts": done["attempts"],
        "resumed_from_step": done["resumed_from_step"],
        "published": done["published"]["version"],
    }
    print(f"trainer: job {job_id} resumed from step {done['resumed_from_step']}, published {row['job']}")
    assert row["other"] == 0 and row["503"] == 0 and row["interrupted"] == 0, row  # chats never need it
    STATE["job_id"] = job_id


def test_a_killed_redis_comes_back_on_its_port_with_its_data(up: Up, trickle: Trickle) -> None:
    import redis

    assert "job_id" in STATE, "runs after the trainer test (it reads that job's record)"
    job_id = STATE["job_id"]
    # A job for a hardware class no worker serves stays queued: the Celery list must survive too.
    spec = _job_spec(STATE["data"])
    spec["deepspeed"]["hardware"] = "nowhere"
    queued = httpx.post(f"{up.base_url}/v1/training/jobs", json=spec, timeout=30)
    assert queued.status_code == 201, queued.text
    queued_id = queued.json()["id"]
    client = redis.Redis.from_url(up.redis_url)
    time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
    adapters_before = up.cli("adapters", "list")
    record_before = _job(up, job_id)
    queue_len = client.llen("train.nowhere")
    assert queue_len == 1
    assert record_before["state"] == "SUCCEEDED" and record_before["published"]["version"] in adapters_before
    before = up.service("redis")["restarts"]
    killed = kill_main_process(up, "redis")
    healthy = wait_restarted(up, "redis", before)
    served = wait_until(
        lambda: (
            httpx.get(f"{up.base_url}/v1/training/jobs/{job_id}", timeout=5).status_code == 200
            and time.time()
        ),
        timeout=60,
        interval=0.2,
        what="the job routes answering again",
    )
    row = record_row(trickle, "redis", killed, float(healthy), float(served))
    assert row["other"] == 0, row["other_details"]  # chats go on without Redis (the cache misses)
    assert row["503"] == 0 and row["interrupted"] == 0, row
    assert up.cli("adapters", "list") == adapters_before
    assert _job(up, job_id) == record_before
    assert _job(up, queued_id)["state"] == "QUEUED"
    assert client.llen("train.nowhere") == queue_len
    assert httpx.delete(f"{up.base_url}/v1/training/jobs/{queued_id}", timeout=10).status_code == 200


def test_the_counters_and_the_table(up: Up) -> None:
    text = httpx.get(f"{up.supervisor}/metrics", timeout=5).text
    for name in ("llm", "encoders", "decoders", "trainer", "redis"):
        assert f'modalmesh_supervisor_restarts_total{{service="{name}"}} 1.0' in text, text
        assert f'modalmesh_supervisor_give_ups_total{{service="{name}"}} 0.0' in text
    assert 'modalmesh_supervisor_restarts_total{service="gateway"} 0.0' in text
    assert up.status()["status"] == "ok"
    print(
        "\n| service killed | kill -> healthy s | healthy -> served s | sent | served | 503 | interrupted | other |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(
            f"| {r['service']} | {r['kill_to_healthy_s']} | {r['healthy_to_served_s']} | {r['sent']} | "
            f"{r['served']} | {r['503']} | {r['interrupted']} | {r['other']} |"
        )
