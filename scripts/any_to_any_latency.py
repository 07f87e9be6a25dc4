#!/usr/bin/env python
"""Seconds per generated item on the tiny-nextgpt twin, through the whole stack.

Starts Redis (a private one), the encoder, LLM and decoder services and the gateway on free
ports, then times POST /v1/chat/completions (max_tokens 8, greedy, the decoders' defaults:
4 steps, image 64x64, audio 1 s, video 8 frames of 32x32) with `modalities` ["text"] and
["text", <m>] for each output modality: median of 7 warm requests each (time.perf_counter).
The per-item figure is the median with the item minus the median of text alone, and the
gateway's own decode-stage histogram (modalmesh_gateway_stage_latency_seconds, decode_<m>)
gives the decoder's share. A figure for the closing notes, not a target.

Run: .venv/bin/python scripts/any_to_any_latency.py
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.presets import load_preset
from services.models.tiny import ensure_generated
from tests.helpers.procs import free_ports, wait_until
from tests.helpers.services import (
    gateway_healthy,
    start_decoders,
    start_encoders,
    start_gateway,
    start_llm,
    start_redis,
)

PRESET = "tiny-nextgpt"
RUNS = 7


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="any-to-any-"))
    ensure_generated(load_preset(PRESET, cache_dir=root))
    redis, redis_url = start_redis(root / "redis")
    ports = free_ports(9)
    env = {
        "MODALMESH_PRESET": PRESET,
        "MODALMESH_CACHE_DIR": str(root),
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{ports[6]}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{ports[1]}",
        "MODALMESH_DECODER_ADDRESS": f"127.0.0.1:{ports[4]}",
        "MODALMESH_REDIS_URL": redis_url,
    }
    procs = [
        start_encoders(env, root / "encoders.log", http=ports[0], grpc=ports[1], metrics=ports[2]),
        start_decoders(env, root / "decoders.log", http=ports[3], grpc=ports[4], metrics=ports[5]),
        start_llm(env, root / "llm.log", port=ports[6]),
    ]
    gateway, base, _ = start_gateway(env, root / "gateway.log", ports=(ports[7], ports[8]))
    procs.append(gateway)
    try:
        wait_until(
            lambda: gateway_healthy(base) and httpx.get(f"{base}/health").json()["status"] == "ok",
            timeout=300,
            what="stack ready",
            proc=gateway,
        )

        def chat(modalities: list[str]) -> float:
            body = {
                "model": PRESET,
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": "draw, play or show me a cat"}],
                "modalities": modalities,
            }
            start = time.perf_counter()
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
            took = time.perf_counter() - start
            assert r.status_code == 200, r.text
            media = r.json()["choices"][0]["message"].get("media", [])
            assert all(m["type"] != "error" for m in media), media
            return took

        rows = []
        for modalities in (["text"], ["text", "image"], ["text", "audio"], ["text", "video"]):
            chat(modalities)  # warm
            rows.append((modalities[-1], statistics.median(chat(modalities) for _ in range(RUNS))))
        metrics = httpx.get(f"{base}/metrics").text
        text_alone = rows[0][1]
        sys.stdout.write(f"tiny-nextgpt through the gateway, median of {RUNS} warm requests (max_tokens 8):\n")
        sys.stdout.write(f"  text only: {text_alone:.3f} s\n")
        for modality, seconds in rows[1:]:
            decode = _mean(metrics, f"decode_{modality}")
            sys.stdout.write(
                f"  text + {modality:5s}: {seconds:.3f} s  -> {seconds - text_alone:.3f} s per {modality} "
                f"(decoder service call, mean: {decode:.3f} s)\n"
            )
    finally:
        for proc in reversed(procs):
            proc.terminate(timeout=30)
        redis.terminate(timeout=10)


def _mean(metrics: str, stage: str) -> float:
    total = re.search(
        rf'modalmesh_gateway_stage_latency_seconds_sum{{stage="{stage}"}} ([0-9.e+-]+)', metrics
    )
    count = re.search(
        rf'modalmesh_gateway_stage_latency_seconds_count{{stage="{stage}"}} ([0-9.e+-]+)', metrics
    )
    if not total or not count or float(count.group(1)) == 0:
        return float("nan")
    return float(total.group(1)) / float(count.group(1))


if __name__ == "__main__":
    main()
