"""Encoder service throughput: images/s at 1 vs 32 concurrent requests, through tritonclient.

Each image is its own KServe request (as the gateway sends them), over one
`EncoderClient` (tritonclient's grpc.aio); concurrency lets Triton's dynamic batcher group
them. The baseline is the same service at one request at a time.
"""

from __future__ import annotations

import asyncio
import time

from bench._config import BenchConfig
from bench._report import Figure
from bench._stack import Stack
from bench.chat import IMAGE_SIZE, fresh_png
from services.common.settings import Settings
from services.encoders.client import EncoderClient

CONCURRENCY = (1, 32)


async def _images_per_s(target: str, model: str, concurrency: int, cfg: BenchConfig) -> float:
    pngs = [fresh_png() for _ in range(cfg.encoder_images)]
    client = EncoderClient(target, settings=Settings())
    try:
        for png in pngs[: cfg.warmup]:
            await client.encode(model, [png])
        queue = list(reversed(pngs))

        async def worker() -> None:
            while queue:
                await client.encode(model, [queue.pop()])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(pngs) / (time.perf_counter() - start)
    finally:
        await client.close()


def encoder_throughput(stack: Stack, cfg: BenchConfig) -> list[Figure]:
    """Images/s at 32 concurrent requests vs at 1."""
    assert stack.encoder_grpc is not None
    model = stack.preset.triton_model("image")
    one, many = (asyncio.run(_images_per_s(stack.encoder_grpc, model, n, cfg)) for n in CONCURRENCY)
    spec = stack.preset.modalities["image"].encoder
    note = (
        f"{cfg.encoder_images} {IMAGE_SIZE}px PNGs, one request each; max_batch_size {spec.max_batch_size}, "
        f"batch delay {spec.batch_delay_us} us; baseline = 1 at a time"
    )
    return [Figure(f"images/s @{CONCURRENCY[1]}", many, one, "images/s", "higher", note)]
