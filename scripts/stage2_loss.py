#!/usr/bin/env python
"""Stage-2 loss at start and end on the tiny-nextgpt twin: a figure for the closing notes.

Generates the twin and a synthetic t2x set (64 captions with their decoder embeddings) in a
temporary folder, runs the stage-2 job on 2 DeepSpeed ranks (gloo, ZeRO-2, CPU) directly (no
queue; the launcher the trainer uses), and prints the distance, total and LM loss at the first
step and over the last ten. The LM is frozen in stage 2, so its loss is logged, not trained.

Run: .venv/bin/python scripts/stage2_loss.py [STEPS]   (default 64)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.presets import load_preset
from services.models.tiny import ensure_generated
from services.trainer.synth import synthesize
from tests.integration.test_trainer import run_ranks, stage2_job


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    root = Path(tempfile.mkdtemp(prefix="stage2-loss-"))
    preset = load_preset("tiny-nextgpt", cache_dir=root)
    ensure_generated(preset)
    synthesize(root / "data", train=64, heldout=8, seed=7, modalities=["image", "t2x"], output_preset=preset)
    start = time.perf_counter()
    job = stage2_job(root / "data" / "t2x.jsonl", max_steps=steps, micro_batch_size=4)
    done = run_ranks(root, root / "job", job, timeout=900)
    wall = time.perf_counter() - start
    events = [json.loads(line) for line in (root / "job" / "progress.jsonl").read_text().splitlines()]
    rows = [e for e in events if e["event"] == "step"]

    def first_last(key: str) -> str:
        values = [e[key] for e in rows]
        return f"{values[0]:.3f} -> {sum(values[-10:]) / len(values[-10:]):.3f}"

    sys.stdout.write(
        f"tiny-nextgpt stage 2, {len(rows)} steps of 4 captions per rank, 2 ranks:\n"
        f"  distance (step 1 -> mean of the last 10): {first_last('distance')}\n"
        f"  total loss: {first_last('loss')}\n"
        f"  LM loss (frozen LM): {first_last('lm_loss')}\n"
        f"  {done['metrics']['seconds']:.1f} s of training, {wall:.1f} s with start-up\n"
    )


if __name__ == "__main__":
    main()
