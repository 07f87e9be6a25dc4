"""Chat benchmarks through the OpenAI API: modalmesh's gateway vs the seed-style baseline.

- `throughput`: aggregate output tokens/s and p50/p99 latency at 1, 4 and 16 concurrent image
  chats (closed loop: each client sends its next chat when the last one ends; a fresh random
  image per chat, so the feature cache never hits).
- `ttft_under_load`: time to first token of a new image chat sent while 8 long generations
  stream.
- `feature_cache`: modalmesh alone, chat latency with the image's features in Redis (the same
  bytes again) vs a fresh random image every time.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import time

import httpx
import numpy as np
from PIL import Image

from bench._client import ChatTiming, chat_body, timed_chat
from bench._config import BenchConfig
from bench._report import Figure, median, percentile
from bench._stack import Stack

IMAGE_SIZE = 64
LOAD_STREAMS = 8
_seeds = itertools.count(1000)


def fresh_png() -> bytes:
    """A random-pixel PNG never sent before in this run (distinct bytes: a feature-cache miss)."""
    pixels = np.random.default_rng(next(_seeds)).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64))


async def _warm(client: httpx.AsyncClient, url: str, model: str, cfg: BenchConfig) -> None:
    for _ in range(cfg.warmup):
        await timed_chat(client, url, chat_body(model, fresh_png(), cfg.max_tokens))


async def _closed_loop(url: str, model: str, concurrency: int, cfg: BenchConfig) -> tuple[float, list[float]]:
    """(aggregate completion tokens/s, per-chat latencies) of `concurrency` clients."""
    images = [[fresh_png() for _ in range(cfg.requests_per_client)] for _ in range(concurrency)]
    async with _client() as client:
        await _warm(client, url, model, cfg)

        async def one_client(pngs: list[bytes]) -> list[ChatTiming]:
            return [await timed_chat(client, url, chat_body(model, p, cfg.max_tokens)) for p in pngs]

        start = time.perf_counter()
        runs = await asyncio.gather(*(one_client(pngs) for pngs in images))
        wall = time.perf_counter() - start
    timings = [t for run in runs for t in run]
    return sum(t.completion_tokens for t in timings) / wall, [t.latency for t in timings]


def throughput(stack: Stack, cfg: BenchConfig) -> list[Figure]:
    """Aggregate tokens/s and p50/p99 chat latency per concurrency, modalmesh vs baseline.

    Each concurrency runs `cfg.rounds` rounds, modalmesh and the baseline alternating, so drift
    on a shared machine hits both alike; tokens/s is the median over rounds, latency
    percentiles pool every chat.
    """
    assert stack.gateway_url is not None and stack.baseline_url is not None
    model = stack.preset.name
    figures = []
    for n in cfg.concurrency:
        tps: dict[str, list[float]] = {"mm": [], "bl": []}
        lat: dict[str, list[float]] = {"mm": [], "bl": []}
        for _ in range(cfg.rounds):
            for key, url in (("mm", stack.gateway_url), ("bl", stack.baseline_url)):
                rate, latencies = asyncio.run(_closed_loop(url, model, n, cfg))
                tps[key].append(rate)
                lat[key] += latencies
        note = f"{n} concurrent image chats, {cfg.max_tokens} tokens each, {len(lat['mm'])} chats"
        mm, bl = lat["mm"], lat["bl"]
        figures += [
            Figure(f"tokens/s @{n}", median(tps["mm"]), median(tps["bl"]), "tokens/s", "higher", note),
            Figure(f"latency p50 @{n}", percentile(mm, 50), percentile(bl, 50), "s", "lower", note),
            Figure(f"latency p99 @{n}", percentile(mm, 99), percentile(bl, 99), "s", "lower", note),
        ]
    return figures


async def _ttft_under_load(url: str, model: str, cfg: BenchConfig) -> list[float]:
    """TTFT of one new chat per round, sent once all 8 long generations have streamed a token."""
    ttfts = []
    async with _client() as client:
        await _warm(client, url, model, cfg)
        for _ in range(cfg.ttft_probes):
            started = asyncio.Semaphore(0)

            async def long_one(started: asyncio.Semaphore = started) -> None:
                body = chat_body(model, fresh_png(), cfg.long_tokens)
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    first = True
                    async for _line in r.aiter_lines():
                        if first:
                            started.release()
                            first = False

            longs = [asyncio.create_task(long_one()) for _ in range(LOAD_STREAMS)]
            # Load is on once the first long one streams (the rest are running or queued behind
            # it: the seed server runs 5 at once, a one-at-a-time engine runs one).
            await started.acquire()
            probe = await timed_chat(client, url, chat_body(model, fresh_png(), 8))
            ttfts.append(probe.ttft)
            await asyncio.gather(*longs)
    return ttfts


def ttft_under_load(stack: Stack, cfg: BenchConfig) -> list[Figure]:
    """Time to first token of a new chat while 8 long generations run, modalmesh vs baseline."""
    assert stack.gateway_url is not None and stack.baseline_url is not None
    model = stack.preset.name
    mm: list[float] = []
    bl: list[float] = []
    for _ in range(cfg.rounds):
        mm += asyncio.run(_ttft_under_load(stack.gateway_url, model, cfg))
        bl += asyncio.run(_ttft_under_load(stack.baseline_url, model, cfg))
    note = f"new chat during {LOAD_STREAMS} streams of {cfg.long_tokens} tokens; median of {len(mm)}"
    return [Figure("ttft under load", median(mm), median(bl), "s", "lower", note)]


async def _cache(url: str, model: str, cfg: BenchConfig) -> tuple[list[float], list[float]]:
    cached_png = fresh_png()
    cached, fresh = [], []
    async with _client() as client:
        await _warm(client, url, model, cfg)
        await timed_chat(client, url, chat_body(model, cached_png, cfg.max_tokens))  # fills the cache
        for _ in range(cfg.cache_requests):  # interleaved, so drift hits both alike
            t = await timed_chat(client, url, chat_body(model, cached_png, cfg.max_tokens))
            cached.append(t.latency)
            t = await timed_chat(client, url, chat_body(model, fresh_png(), cfg.max_tokens))
            fresh.append(t.latency)
    return cached, fresh


def _encode_stage(base_url: str) -> tuple[float, float]:
    """(sum, count) of the gateway's encode-stage histogram (seconds per encoded item)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values = []
    for part in ("sum", "count"):
        m = re.search(rf'modalmesh_gateway_stage_latency_seconds_{part}{{stage="encode"}} ([0-9.e+-]+)', text)
        values.append(float(m.group(1)) if m else 0.0)
    return values[0], values[1]


def feature_cache(stack: Stack, cfg: BenchConfig) -> list[Figure]:
    """modalmesh chat latency with the image's features cached vs a fresh image (baseline).

    Also the latency the cache saves (p50 fresh - p50 cached) against the mean encode stage
    the gateway measured for the misses of this benchmark (its Prometheus histogram): a ratio
    of at least 1 means a hit saves at least the encoder's share.
    """
    assert stack.gateway_url is not None
    sum0, count0 = _encode_stage(stack.gateway_url)
    cached, fresh = asyncio.run(_cache(stack.gateway_url, stack.preset.name, cfg))
    sum1, count1 = _encode_stage(stack.gateway_url)
    encode = (sum1 - sum0) / (count1 - count0) if count1 > count0 else float("nan")
    note = f"one chat at a time, {cfg.max_tokens} tokens; baseline = fresh image each time"
    saved = percentile(fresh, 50) - percentile(cached, 50)
    return [
        Figure("latency p50 cached", percentile(cached, 50), percentile(fresh, 50), "s", "lower", note),
        Figure("latency p99 cached", percentile(cached, 99), percentile(fresh, 99), "s", "lower", note),
        Figure(
            "saved vs encode stage",
            saved,
            encode,
            "s",
            "higher",
            "p50 fresh - p50 cached; baseline = mean gateway encode stage of the misses",
        ),
    ]
