"""Two encoder replicas on loopback behind one `EncoderClient`; one is SIGKILLed mid-trickle.

Both replicas are real `python -m services.encoders` processes on the tiny preset. The client is
given both addresses (`a,b`, as MODALMESH_ENCODER_ADDRESS would be). A trickle of encode calls
(4 at a time, one image each) runs; after a share of them, replica b's process group is SIGKILLed
(as a container dies) while calls are in flight. Counted: calls sent, served, failed. Checked:
before the kill both replicas served (their Triton metrics count inferences), and no call failed
(the in-flight ones on b and the ones sent to it before it is marked down are retried on a).
The figures are printed for the report.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.presets import load_preset
from services.common.settings import Settings
from services.encoders.client import EncoderClient
from tests.helpers.media import png_bytes
from tests.helpers.procs import Process, free_ports, stop_all, wait_until
from tests.helpers.services import start_encoders

pytestmark = pytest.mark.integration

SENT_BEFORE_KILL = 24
TOTAL = 64
CONCURRENCY = 4


@dataclass
class Replicas:
    model: str
    grpc: list[int]
    metrics: list[int]
    procs: list[Process]

    def target(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.grpc)

    def inferences(self, index: int) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[index]}/metrics", timeout=5).read()
        pattern = rf'^nv_inference_request_success\{{model="{self.model}",version="1"\}} (\S+)$'
        return sum(float(m.group(1)) for line in text.decode().splitlines() if (m := re.match(pattern, line)))


@pytest.fixture(scope="module")
def replicas(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    logs = tmp_path_factory.mktemp("encoder-replicas")
    env = {"MODALMESH_CACHE_DIR": str(tiny_cache_dir), "HF_HUB_OFFLINE": "1"}
    ports = free_ports(6)
    procs = [
        start_encoders(
            env,
            logs / f"encoders-{i}.log",
            http=ports[3 * i],
            grpc=ports[3 * i + 1],
            metrics=ports[3 * i + 2],
        )
        for i in range(2)
    ]
    state = Replicas(
        load_preset("tiny", cache_dir=tiny_cache_dir).triton_model("image"),
        [ports[1], ports[4]],
        [ports[2], ports[5]],
        procs,
    )

    async def ready(port: int) -> bool:
        async with EncoderClient(f"127.0.0.1:{port}", settings=Settings()) as client:
            return await client.ready(state.model, timeout_s=2)

    try:
        for port, proc in zip(state.grpc, procs, strict=True):
            wait_until(
                lambda p=port: asyncio.run(ready(p)),
                timeout=180,
                interval=0.5,
                what="encoder replica ready",
                proc=proc,
            )
        yield state
    finally:
        stop_all(reversed(procs))


def test_requests_spread_and_survive_a_killed_replica(replicas: Replicas) -> None:
    image = png_bytes()
    counts = {"sent": 0, "served": 0, "failed": 0}
    errors: list[str] = []
    spread: list[float] = []
    marked_down: list[int] = []

    async def trickle() -> None:
        async with EncoderClient(replicas.target(), settings=Settings(), down_s=2.0) as client:
            killed = asyncio.Event()

            async def worker() -> None:
                while counts["sent"] < TOTAL:
                    counts["sent"] += 1
                    if counts["sent"] == SENT_BEFORE_KILL:
                        spread.extend(
                            await asyncio.to_thread(lambda: [replicas.inferences(i) for i in (0, 1)])
                        )
                        await asyncio.to_thread(replicas.procs[1].kill_group)
                        killed.set()
                    try:
                        items = await client.encode(replicas.model, [image], timeout_s=30)
                        assert items[0].features.shape[0] > 0
                        counts["served"] += 1
                    except Exception as e:  # every failure is counted and reported
                        counts["failed"] += 1
                        errors.append(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            assert killed.is_set()
            marked_down.append(client.replicas.replicas[1].failures)

    asyncio.run(trickle())
    print(
        f"encoder replicas: sent {counts['sent']}, served {counts['served']}, failed {counts['failed']}; "
        f"inferences per replica before the kill {spread}; "
        f"b marked down {marked_down[0]} time(s)"
    )
    assert spread[0] > 0 and spread[1] > 0, f"requests did not spread over both replicas: {spread}"
    assert counts["sent"] == TOTAL
    assert counts["failed"] == 0, errors
    assert counts["served"] == TOTAL
    assert marked_down[0] >= 1  # calls did reach the dead replica, and were retried on the other
    assert replicas.procs[1].popen.poll() is not None  # b really is dead
