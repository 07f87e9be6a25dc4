"""Decoder service: images/s at 1 vs 8 concurrent requests, and the seed's load-per-call path.

The decoder service (`python -m services.decoders`) is started for the bench preset when it
has `outputs`, else for `tiny-nextgpt`, in the run's folder. Each image is its own KServe
request through `DecoderClient` (as the gateway sends them), with the decoder's default
parameters and its own seed, so Triton's dynamic batcher can group concurrent ones into one
pipeline call. Two figures, each against a baseline measured in the same run:

- images/s @8: the same service at 8 concurrent requests vs one at a time;
- s/image: one request to the service (pipeline loaded once, at start) vs legacy NExT-GPT's
  `generate_images`, which loads the pipeline from disk on every call (SEEDS_SPEC 2.A), timed
  in this process as `load_decoders` + `decode` + PNG encoding per image, medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator

import numpy as np

from bench._config import BenchConfig
from bench._report import Figure
from bench._stack import STARTUP_TIMEOUT_S, Stack
from services.common.presets import Preset, load_preset
from services.common.settings import Settings
from services.models.tiny import ensure_generated
from tests.helpers.procs import free_ports, stop_all, wait_until
from tests.helpers.services import start_decoders

CONCURRENCY = (1, 8)
FALLBACK_PRESET = "tiny-nextgpt"


def _conditioning(preset: Preset, n: int) -> list[np.ndarray]:
    shape = tuple(preset.outputs["image"].conditioning)
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


@contextlib.contextmanager
def _service(stack: Stack) -> Iterator[tuple[Preset, str]]:
    """The decoder service for the bench preset (or the twin with outputs); yields it and its target."""
    preset = stack.preset
    if "image" not in preset.outputs:
        preset = load_preset(FALLBACK_PRESET, cache_dir=stack.root)
        ensure_generated(preset)
    http, grpc, metrics = free_ports(3)
    env = {"MODALMESH_PRESET": preset.name, "MODALMESH_CACHE_DIR": str(stack.root)}
    proc = start_decoders(env, stack.root / "decoders.log", http=http, grpc=grpc, metrics=metrics)
    target = f"127.0.0.1:{grpc}"
    try:
        wait_until(
            lambda: _ready(target, preset), timeout=STARTUP_TIMEOUT_S, what="decoder service", proc=proc
        )
        yield preset, target
    finally:
        stop_all([proc])


def _ready(target: str, preset: Preset) -> bool:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(target)
        return bool(client.is_model_ready(preset.decoder_model("image")))
    except Exception:
        return False


async def _images_per_s(
    target: str, preset: Preset, concurrency: int, cfg: BenchConfig
) -> tuple[float, float]:
    """(images/s, median seconds per request) at `concurrency`."""
    from services.decoders.client import DecoderClient

    embeds = _conditioning(preset, cfg.decoder_images)
    client = DecoderClient(
        target, timeout_s=300.0, models={"image": preset.decoder_model("image")}, settings=Settings()
    )
    try:
        for e in embeds[: cfg.warmup]:
            await client.decode("image", e, {"seed": 1})
        queue = list(enumerate(embeds))
        latencies: list[float] = []

        async def worker() -> None:
            while queue:
                i, e = queue.pop()
                t = time.perf_counter()
                await client.decode("image", e, {"seed": i})
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(embeds) / (time.perf_counter() - start), statistics.median(latencies)
    finally:
        await client.close()


def _seed_style_seconds(preset: Preset, cfg: BenchConfig) -> float:
    """Median seconds per image when every call loads the pipeline first (legacy NExT-GPT)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from services.decoders.media_out import encode_media
    from services.decoders.server import load_decoders
    from services.models.decoders.pipelines import DecodeParams, decode

    diffusers_logging.disable_progress_bar()
    image_only = preset.model_copy(update={"outputs": {"image": preset.outputs["image"]}})
    embeds = _conditioning(preset, cfg.decoder_seed_calls)
    times = []
    for i, e in enumerate(embeds):
        t = time.perf_counter()
        (bound,) = load_decoders(image_only, device="cpu")
        encode_media(decode(bound.decoder, torch.from_numpy(e), DecodeParams(seed=i)))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decoder_throughput(stack: Stack, cfg: BenchConfig) -> list[Figure]:
    """Images/s at 8 concurrent requests vs 1, and s/image vs loading the pipeline per call."""
    with _service(stack) as (preset, target):
        (one, one_latency), (many, _) = (
            asyncio.run(_images_per_s(target, preset, n, cfg)) for n in CONCURRENCY
        )
    seed = _seed_style_seconds(preset, cfg)
    spec = preset.outputs["image"].decoder
    d = spec.defaults
    size = f"{d.height or 'default'}x{d.width or 'default'} px, {d.steps or 'default'} steps"
    return [
        Figure(
            f"images/s @{CONCURRENCY[1]}", many, one, "images/s", "higher",
            f"{preset.name} image decoder, {cfg.decoder_images} images of {size}, one request each, own seeds; "
            f"max_batch_size {spec.max_batch_size}; baseline = 1 at a time",
        ),
        Figure(
            "s/image, loaded once", one_latency, seed, "s", "lower",
            "one request to the service (median @1) vs the seed's load-the-pipeline-per-call "
            f"(load + decode + PNG in this process, median of {cfg.decoder_seed_calls})",
        ),
    ]  # fmt: skip
