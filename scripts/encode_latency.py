#!/usr/bin/env python
"""Per-modality encode latency of the tiny twins: decode + preprocess + backbone for one item.

Median of 20 warm `MediaEncoder.encode` calls per case (time.perf_counter), one decode thread,
small generated inputs (64x64 PNG, 8 s 64x48 video at 4 fps, 5 s 16 kHz WAV, 20k events).
A figure for the closing notes, not a target. Run: .venv/bin/python scripts/encode_latency.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.presets import load_preset
from services.models.media.encode import EncoderLimits, MediaEncoder
from services.models.tiny import ensure_generated
from tests.helpers.media import make_audio, make_events, make_video, png_bytes


def main() -> None:
    cache = Path(tempfile.mkdtemp(prefix="encode-latency-"))
    cases = [
        ("tiny", "image", png_bytes(64, 64, seed=1)),
        ("tiny-pandagpt", "image", png_bytes(64, 64, seed=1)),
        ("tiny-pandagpt", "video", make_video(32, 4)),
        ("tiny-pandagpt", "audio", make_audio(5.0, 16000, freq=440.0)),
        ("tiny-videochat", "video", make_video(32, 4)),
        ("tiny-etchat", "video", make_video(32, 4)),
        ("tiny-eventgpt", "event", make_events(20000, 64, 48, seed=0)),
    ]
    for name, modality, data in cases:
        preset = load_preset(name, cache_dir=cache)
        ensure_generated(preset)
        spec = preset.modalities[modality].encoder  # type: ignore[index]
        encoder = MediaEncoder.from_spec(modality, spec, limits=EncoderLimits(), decode_workers=1)
        (first,) = encoder.encode([data])
        assert not isinstance(first, Exception), first
        times = []
        for _ in range(20):
            start = time.perf_counter()
            encoder.encode([data])
            times.append(time.perf_counter() - start)
        encoder.close()
        median_ms = statistics.median(times) * 1000
        sys.stdout.write(
            f"{name:15s} {modality:6s} {len(data):8d} B  features {tuple(first.features.shape)}  "
            f"frames {first.frames}  median {median_ms:.1f} ms\n"
        )


if __name__ == "__main__":
    main()
