"""Two decoder replicas on loopback behind one `DecoderClient`; one is SIGKILLed mid-trickle.

Both replicas are real `python -m services.decoders` processes on the tiny NExT-GPT twin
(`tiny-nextgpt`, generated once into the session's cache). The client is given both addresses
(`a,b`, as MODALMESH_DECODER_ADDRESS would be). A trickle of image decodes (3 at a time, 2
steps, 32x32 px, a seed each) runs; after a share of them, at a moment when a decode is in
flight on replica b, b's process group is SIGKILLed (as a container dies).

Every attempt the client makes is recorded by wrapping each replica's tritonclient (the real
client is called; the wrapper only notes the call, address, start, end and gRPC status).
What happens, and is checked:

- before the kill both replicas served (their Triton metrics count inferences);
- the decodes in flight on b when it dies end UNAVAILABLE (gRPC reports the cut connection
  so), and the client's rule retries a decode only on UNAVAILABLE: each is decoded again on a
  and served. A decode that failed would be "interrupted" only if it had an attempt in flight
  on b at the kill (at most one per worker); none does;
- b is marked down; no attempt goes to it while it is; each attempt after its down window ran
  out (a probe) fails as UNAVAILABLE, connection refused, and that decode is served by a;
- every decode is served with the image asked for (PNG, size, seed).

The figures are printed for the report.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.common.replicas import Replica
from services.decoders.client import DecoderClient
from tests.helpers.procs import Process, free_ports, stop_all, wait_until
from tests.helpers.services import start_decoders

pytestmark = pytest.mark.integration

PRESET = "tiny-nextgpt"
MODEL = "image_decoder"
SHAPE = (77, 32)  # the tiny twin's image conditioning (rows, width)
PARAMS = {"steps": 2, "height": 32, "width": 32}
SENT_BEFORE_KILL = 10
TOTAL = 24
CONCURRENCY = 3
DOWN_S = 0.5  # short, so that b's down window runs out during the trickle and b is tried again


@dataclass
class Replicas:
    grpc: list[int]
    metrics: list[int]
    procs: list[Process]

    def address(self, index: int) -> str:
        return f"127.0.0.1:{self.grpc[index]}"

    def target(self) -> str:
        return ",".join(self.address(i) for i in range(len(self.grpc)))

    def inferences(self, index: int) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[index]}/metrics", timeout=5).read()
        pattern = rf'^nv_inference_request_success\{{model="{MODEL}",version="1"\}} (\S+)$'
        return sum(float(m.group(1)) for line in text.decode().splitlines() if (m := re.match(pattern, line)))


@pytest.fixture(scope="module")
def replicas(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated

    ensure_generated(load_preset(PRESET, cache_dir=tiny_cache_dir))
    logs = tmp_path_factory.mktemp("decoder-replicas")
    env = {"MODALMESH_PRESET": PRESET, "MODALMESH_CACHE_DIR": str(tiny_cache_dir), "HF_HUB_OFFLINE": "1"}
    ports = free_ports(6)
    procs = [
        start_decoders(
            env,
            logs / f"decoders-{i}.log",
            http=ports[3 * i],
            grpc=ports[3 * i + 1],
            metrics=ports[3 * i + 2],
        )
        for i in range(2)
    ]
    state = Replicas([ports[1], ports[4]], [ports[2], ports[5]], procs)

    async def ready(index: int) -> bool:
        async with DecoderClient(state.address(index), timeout_s=10) as client:
            return await client.ready(MODEL, timeout_s=2)

    try:
        for index, proc in enumerate(procs):
            wait_until(
                lambda i=index: asyncio.run(ready(i)),
                timeout=240,
                interval=0.5,
                what="decoder replica ready",
                proc=proc,
            )
        yield state
    finally:
        stop_all(reversed(procs))


@dataclass
class Attempt:
    call: int
    address: str
    start: float
    end: float = float("inf")
    code: str = ""  # "" when it succeeded, else the gRPC status, e.g. "StatusCode.UNAVAILABLE"
    message: str = ""


@dataclass
class Recorder:
    """Wraps one replica's tritonclient: `infer` goes to the real client and is noted."""

    inner: Any
    address: str
    replica: Replica[Any]
    attempts: list[Attempt]
    sent_while_down: list[Attempt] = field(default_factory=list)
    current: dict[int, int] = field(default_factory=dict)

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        attempt = Attempt(self.current.get(id(task), -1), self.address, time.monotonic())
        if not self.replica.up(attempt.start):
            self.sent_while_down.append(attempt)
        self.attempts.append(attempt)
        try:
            return await self.inner.infer(*args, **kwargs)
        except Exception as e:
            attempt.code = str(getattr(e, "status", lambda: None)() or type(e).__name__)
            attempt.message = str(e)
            raise
        finally:
            attempt.end = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_decodes_spread_and_survive_a_killed_replica(replicas: Replicas) -> None:
    counts = {"sent": 0, "served": 0, "interrupted": 0, "failed otherwise": 0}
    errors: list[str] = []
    failed_calls: list[int] = []
    spread: list[float] = []
    kill: dict[str, float] = {}
    attempts: list[Attempt] = []
    recorders: list[Recorder] = []
    a, b = replicas.address(0), replicas.address(1)

    async def trickle() -> None:
        async with DecoderClient(
            replicas.target(), timeout_s=60, models={"image": MODEL}, down_s=DOWN_S
        ) as client:
            current: dict[int, int] = {}
            for replica in client.replicas.replicas:
                recorder = Recorder(replica.client, replica.address, replica, attempts, current=current)
                replica.client = recorder
                recorders.append(recorder)

            async def worker() -> None:
                while counts["sent"] < TOTAL:
                    counts["sent"] += 1
                    call = counts["sent"]
                    current[id(asyncio.current_task())] = call
                    conditioning = np.random.default_rng(call).standard_normal(SHAPE).astype(np.float32)
                    try:
                        media = await client.decode("image", conditioning, {**PARAMS, "seed": call})
                        image = Image.open(io.BytesIO(media.data))
                        assert (media.mime_type, media.seed, image.size) == ("image/png", call, (32, 32))
                        counts["served"] += 1
                    except Exception as e:  # every failure is counted and reported
                        failed_calls.append(call)
                        errors.append(f"call {call}: {type(e).__name__}: {e}")
                    await asyncio.sleep(0.02)

            async def killer() -> None:
                # After SENT_BEFORE_KILL calls, kill b at a moment when a decode is in flight on it.
                while counts["sent"] < SENT_BEFORE_KILL:
                    await asyncio.sleep(0.005)
                spread.extend(await asyncio.to_thread(lambda: [replicas.inferences(i) for i in (0, 1)]))
                while not any(
                    t.address == b and t.end == float("inf") and t.start < time.monotonic() - 0.03
                    for t in attempts
                ):
                    assert counts["sent"] < TOTAL, "no decode was in flight on b before the trickle ended"
                    await asyncio.sleep(0.002)
                kill["start"] = time.monotonic()
                os.killpg(replicas.procs[1].pid, signal.SIGKILL)  # at once, not from a thread
                await asyncio.to_thread(replicas.procs[1].kill_group)  # reaps it

            await asyncio.gather(killer(), *(worker() for _ in range(CONCURRENCY)))

    asyncio.run(trickle())

    killed_at = kill["start"]
    at_kill = [t for t in attempts if t.address == b and t.start < killed_at < t.end]
    in_flight_on_b = {t.call for t in at_kill}
    for call in failed_calls:
        counts["interrupted" if call in in_flight_on_b else "failed otherwise"] += 1
    on_b_after = [t for t in attempts if t.address == b and t.start >= killed_at]
    served_by = {
        addr: sum(1 for t in attempts if t.address == addr and not t.code and t.end <= killed_at)
        for addr in (a, b)
    }
    ok = ("", "StatusCode.UNAVAILABLE")  # the ends of an attempt that leave its decode servable
    print(
        f"decoder replicas: sent {counts['sent']}, served {counts['served']}, "
        f"interrupted {counts['interrupted']}, failed otherwise {counts['failed otherwise']}; "
        f"inferences per replica before the kill {spread} (client-side {list(served_by.values())}); "
        f"in flight on b at the kill {len(at_kill)}, ended {[(t.code or 'ok', t.message) for t in at_kill]}; "
        f"attempts on b after the kill {len(on_b_after)}, ended {[(t.code, t.message) for t in on_b_after]}; "
        f"b marked down {recorders[1].replica.failures} time(s); errors {errors}"
    )
    assert replicas.procs[1].popen.poll() is not None  # b really is dead
    assert counts["sent"] == TOTAL
    assert spread[0] > 0 and spread[1] > 0, f"decodes did not spread over both replicas: {spread}"
    assert served_by[a] > 0 and served_by[b] > 0
    # A decode may fail only if it was in flight on b at the kill: at most one per worker.
    assert counts["failed otherwise"] == 0, errors
    assert counts["interrupted"] <= CONCURRENCY
    assert counts["served"] + counts["interrupted"] == TOTAL
    # What really happens to those: the cut calls end UNAVAILABLE and are retried on a.
    assert at_kill, "no decode was in flight on b at the kill"
    assert all(t.code in ok for t in at_kill), at_kill
    assert counts["interrupted"] == 0, errors
    for call in in_flight_on_b:
        assert any(t.call == call and t.address == a and not t.code for t in attempts), call
    # No attempt went to b while it was marked down; each one after the kill (a probe once its
    # down window ran out) failed as UNAVAILABLE and its decode was served by a.
    assert recorders[1].replica.failures >= 1
    assert not recorders[1].sent_while_down, recorders[1].sent_while_down
    assert not recorders[0].sent_while_down, recorders[0].sent_while_down
    assert all(t.code == "StatusCode.UNAVAILABLE" for t in on_b_after), on_b_after
    for call in {t.call for t in on_b_after}:
        assert any(t.call == call and t.address == a and not t.code for t in attempts), call
