"""Hot-swapping adapter versions in a running LLM service, driven through Redis.

A private redis-server, a real `python -m services.llm` process (tiny preset, at most 3
versions loaded) and a gateway. A bundle with new connectors and a LoRA is published with
`publish_bundle` while long generations stream: they finish on the version they started with,
new requests get the new one, `model: "tiny@1"` still pins the old one, a rollback moves the
pointer back, and bundles the service must refuse (another base model, a damaged file) leave
it serving what it served. The seconds from publish to the first request served by the new
version are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modalmesh.v1 import llm_pb2, llm_pb2_grpc
from services.common.adapter_registry import AdapterRegistry, VersionInfo
from services.common.presets import Preset
from services.common.tensor_codec import array_to_tensor
from services.models.checkpoints.bundle import base_fingerprint, stamp_manifest
from services.trainer.publisher import publish_bundle, rollback
from tests.helpers.bundles import make_bundle
from tests.helpers.procs import Process, free_port, stop_all, wait_until
from tests.helpers.services import start_gateway, start_llm, start_redis

pytestmark = pytest.mark.integration


@dataclass
class Swap:
    target: str
    base_url: str
    llm: Process
    registry: AdapterRegistry
    store: Path
    bundles: Path
    fingerprint: str


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="modalmesh.v1.LLM")
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def swap(
    tiny_cache_dir: Path, tiny_preset: Preset, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swap]:
    root = tmp_path_factory.mktemp("swap")
    redis_proc, url = start_redis(root / "redis")
    port = free_port()
    env = {
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_REDIS_URL": url,
        "MODALMESH_MAX_LOADED_ADAPTERS": "3",
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{free_port()}",  # text-only chats: never called
    }
    procs = [redis_proc, start_llm(env, root / "llm.log", port=port)]
    try:
        wait_until(lambda: _serving(f"127.0.0.1:{port}"), timeout=120, what="LLM SERVING", proc=procs[1])
        gateway, base_url, _ = start_gateway(env, root / "gateway.log")
        procs.append(gateway)
        wait_until(lambda: httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200, timeout=60,
                   what="gateway answers", proc=gateway)  # fmt: skip
        yield Swap(
            target=f"127.0.0.1:{port}",
            base_url=base_url,
            llm=procs[1],
            registry=AdapterRegistry.from_url(url),
            store=root / "store",
            bundles=root / "bundles",
            fingerprint=base_fingerprint(tiny_preset.llm.checkpoint),
        )
    finally:
        stop_all(reversed(procs))


def request(adapter: str = "", max_tokens: int = 20) -> llm_pb2.GenerateRequest:
    array = np.random.default_rng(0).standard_normal((16, 64)).astype("<f4")
    return llm_pb2.GenerateRequest(
        turns=[
            llm_pb2.Turn(
                role="user",
                parts=[
                    llm_pb2.TurnPart(
                        media=llm_pb2.MediaFeatures(modality="image", features=array_to_tensor(array))
                    ),
                    llm_pb2.TurnPart(text="Hi?"),
                ],
            )
        ],
        sampling=llm_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        adapter=adapter,
    )


@dataclass
class Reply:
    adapter: str
    text: str
    tokens: int
    finished_at: float


async def generate(target: str, req: llm_pb2.GenerateRequest, started: asyncio.Event | None = None) -> Reply:
    """Run one generation; `started` is set when its first chunk arrives."""
    chunks = []
    async with grpc.aio.insecure_channel(target) as channel:
        async for chunk in llm_pb2_grpc.LLMStub(channel).Generate(req):
            chunks.append(chunk)
            if started is not None:
                started.set()
    assert chunks[-1].finish_reason != llm_pb2.FINISH_REASON_UNSPECIFIED
    return Reply(
        chunks[0].adapter,
        "".join(c.text for c in chunks),
        chunks[-1].usage.completion_tokens,
        time.monotonic(),
    )


def same(a: Reply, b: Reply) -> bool:
    """The same adapter and the same (greedy) output."""
    return (a.adapter, a.text, a.tokens) == (b.adapter, b.text, b.tokens)


async def info(target: str) -> llm_pb2.ModelInfo:
    async with grpc.aio.insecure_channel(target) as channel:
        return await llm_pb2_grpc.LLMStub(channel).GetModelInfo(llm_pb2.ModelInfoRequest())


async def wait_current(target: str, ref: str, timeout: float = 30.0) -> float:
    """Poll GetModelInfo until `ref` is current; returns time.monotonic() then."""
    deadline = time.monotonic() + timeout
    while (await info(target)).adapter != ref:
        assert time.monotonic() < deadline, f"{ref} did not become current in {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic()


def publish(swap: Swap, bundle: Path, **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("base_fingerprint", swap.fingerprint)
    return publish_bundle(bundle, registry=swap.registry, artifact_dir=swap.store, name="tiny", **kw)  # type: ignore[arg-type]


async def test_publish_swaps_while_requests_stream_then_pin_and_rollback(
    swap: Swap, tiny_preset: Preset
) -> None:
    v1 = await generate(swap.target, request())
    assert v1.adapter == "tiny@1" and swap.registry.current("tiny") == "1"  # seeded by the service
    long_v1 = await generate(swap.target, request(max_tokens=900))
    assert long_v1.tokens > 500  # greedy and deterministic: each long stream decodes this many tokens
    bundle = make_bundle(swap.bundles / "v2", tiny_preset, seed=2, lora=True)

    # Two long generations: one decoding, one queued behind it; both prepared on v1.
    decoding = asyncio.Event()
    streams = [asyncio.create_task(generate(swap.target, request(max_tokens=900), decoding))]
    streams.append(asyncio.create_task(generate(swap.target, request(max_tokens=900))))
    await asyncio.wait_for(decoding.wait(), timeout=60)
    await asyncio.sleep(0.2)  # the second one was sent with the first: it is queued by now
    published_at = time.monotonic()
    out = await asyncio.to_thread(publish, swap, bundle, job_id="it-job")
    assert (out.version, out.path) == ("2", swap.store / "tiny" / "2")
    swapped_at = await wait_current(swap.target, "tiny@2")
    newest = await generate(swap.target, request())
    first_served = time.monotonic()
    in_flight = await asyncio.gather(*streams)
    assert any(r.finished_at > swapped_at for r in in_flight), "a stream should still run at the swap"
    assert all(same(reply, long_v1) for reply in in_flight) and long_v1.adapter == "tiny@1"
    assert newest.adapter == "tiny@2" and newest.text != v1.text
    print(
        f"\npublish -> tiny@2 current: {swapped_at - published_at:.2f}s; "
        f"-> first request served by it (queued behind 2 long streams): {first_served - published_at:.2f}s"
    )

    model_info = await info(swap.target)
    assert (model_info.adapter, list(model_info.adapters)) == ("tiny@2", ["tiny@1", "tiny@2"])
    assert same(await generate(swap.target, request("tiny@1")), v1)
    # Through the gateway: both versions listed, a pin served, an unknown version a 404.
    ids = [m["id"] for m in httpx.get(f"{swap.base_url}/v1/models", timeout=10).json()["data"]]
    assert ids == ["tiny", "tiny@2", "tiny@1"]
    chat = {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{swap.base_url}/v1/chat/completions", json={**chat, "model": "tiny@1"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny@1"
    r = httpx.post(f"{swap.base_url}/v1/chat/completions", json={**chat, "model": "tiny@99"}, timeout=60)
    assert r.status_code == 404
    assert (
        "'tiny@99' is not loaded; loaded: ['tiny@1', 'tiny@2']; known versions: ['1', '2']"
        in (r.json()["error"]["message"])
    )

    rollback(swap.registry, "tiny", "1")
    await wait_current(swap.target, "tiny@1")
    assert same(await generate(swap.target, request()), v1)
    assert (await generate(swap.target, request("tiny@2"))).text == newest.text


async def test_bad_bundles_are_refused_and_the_old_version_keeps_serving(
    swap: Swap, tiny_preset: Preset
) -> None:
    before = (await info(swap.target)).adapter
    served = await generate(swap.target, request())
    # Built for another base model: the publisher was told so, the replica knows better.
    other = make_bundle(swap.bundles / "other-base", tiny_preset, seed=3, fingerprint="0" * 64)
    wrong = await asyncio.to_thread(publish, swap, other, base_fingerprint="0" * 64)
    # A file damaged after publishing (disk, a bad copy): recorded and made current by hand.
    good = await asyncio.to_thread(
        publish, swap, make_bundle(swap.bundles / "v4", tiny_preset, seed=4), make_current=False
    )
    damaged = swap.store / "tiny" / swap.registry.allocate_version("tiny", swap.store)
    shutil.copytree(good.path, damaged)
    stamp_manifest(damaged, version=damaged.name)
    with (damaged / "connectors.safetensors").open("ab") as f:
        f.write(b"\0")
    swap.registry.record("tiny", damaged.name, VersionInfo(path=str(damaged), stage="stage3", preset="tiny"))
    swap.registry.set_current("tiny", damaged.name)

    def refused(version: str, why: str) -> bool:
        return any(
            f"refused adapter tiny@{version}:" in line and why in line
            for line in swap.llm.log_text().splitlines()
        )

    wait_until(
        lambda: refused(wrong.version, "built for base model 000000000000"),
        timeout=30,
        what="refused",
        proc=swap.llm,
    )
    wait_until(
        lambda: refused(damaged.name, "connectors.safetensors sha256 expected"),
        timeout=30,
        what="refused",
        proc=swap.llm,
    )
    assert (await info(swap.target)).adapter == before
    assert same(await generate(swap.target, request()), served) and served.adapter == before
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await generate(
            swap.target, request(f"tiny@{wrong.version}")
        )  # pinned: loaded on demand, refused again
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "built for base model" in (
        e.value.details() or ""
    )


async def test_publish_to_first_request_on_an_idle_service(swap: Swap, tiny_preset: Preset) -> None:
    bundle = make_bundle(swap.bundles / "idle", tiny_preset, seed=7, lora=True)
    started = time.monotonic()
    out = await asyncio.to_thread(publish, swap, bundle)
    published = time.monotonic()
    while (reply := await generate(swap.target, request(max_tokens=1))).adapter != f"tiny@{out.version}":
        assert time.monotonic() - started < 30
    seconds = time.monotonic() - started
    print(
        f"\npublish_bundle took {published - started:.2f}s; publish -> first request served by "
        f"tiny@{out.version}: {seconds:.2f}s"
    )
    assert reply.tokens == 1
    loaded = list((await info(swap.target)).adapters)
    assert len(loaded) <= 3 and f"tiny@{out.version}" in loaded  # at most 3 kept
    assert (
        await generate(swap.target, request("tiny@2"))
    ).adapter == "tiny@2"  # loaded again on demand if evicted
