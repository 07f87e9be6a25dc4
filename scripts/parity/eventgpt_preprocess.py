"""Parity fixture: EventGPT's event frames, from its own `common/common.py`.

Runs `process_event_data(npy, CLIPImageProcessor, 'cpu')` of EventGPT (np.load of the pickled
dict, the 100 ms check, `get_event_images_list(events, 5)`: 5 chunks of equal event count
drawn white / blue where p == 0 / red otherwise, each through the CLIP image processor, then
cast to bfloat16) with transformers 4.29's `CLIPImageProcessor` configured as
openai/clip-vit-large-patch14-336's `preprocessor_config.json` (shortest edge 336, centre crop
336, bicubic, CLIP mean/std; written into the JSON so the test can load the same config).
Two event files this script writes: polarity 0/1 as EventGPT's samples store it (x, y, t
uint16, p uint8) and the same events with polarity -1/1 (int8), which EventGPT draws all red.
Stores, per file, the float32 frames (the processor's output before the cast, from the same
seed functions) and the bfloat16 frames `process_event_data` returns, as digests, plus the
frames' canvas sizes, in tests/fixtures/parity/eventgpt/preprocess.{safetensors,json} and
preprocess_events_{01,pm1}.npy; tests/unit/parity/test_eventgpt_preprocess.py checks
modalmesh's encoder-side preprocessing.

Usage (scratch environment, never the project's venv):
    /work/scratch/venv/bin/python scripts/parity/eventgpt_preprocess.py --repo /work/seeds/EventGPT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _preprocess_common import digest, git_commit, versions, write_fixture

ROOT = Path(__file__).resolve().parents[2]
PART = "preprocess"
SENSOR = (64, 48)  # (width, height); every chunk is upscaled to 336
EVENTS = 3003  # 5 chunks of 600, the last 603
NUM_FRAMES = 5  # process_event_data's get_event_images_list(event_npy, 5)
# openai/clip-vit-large-patch14-336 preprocessor_config.json
CLIP_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


def write_events(path: Path, *, signed: bool) -> None:
    """EventGPT's .npy: np.save of a dict of x, y, t (uint16, t in us, < 100 ms), p."""
    rng = np.random.default_rng(11)
    width, height = SENSOR
    x = rng.integers(0, width, EVENTS).astype(np.uint16)
    y = rng.integers(0, height, EVENTS).astype(np.uint16)
    x[-1], y[-1] = width - 1, height - 1  # the last chunk spans the sensor
    # The second chunk stays in a 41 x 30 corner: its canvas is 30 x 41, resized to 336 x 459,
    # a centre-crop margin of 123 (odd).
    chunk = slice(EVENTS // NUM_FRAMES, 2 * (EVENTS // NUM_FRAMES))
    x[chunk], y[chunk] = x[chunk] % 41, y[chunk] % 30
    x[chunk.start], y[chunk.start] = 40, 29
    t = np.sort(rng.integers(0, 60_000, EVENTS)).astype(np.uint16)
    p = rng.integers(0, 2, EVENTS).astype(np.uint8)
    polarity = (p.astype(np.int8) * 2 - 1) if signed else p
    np.save(path, {"x": x, "y": y, "t": t, "p": polarity}, allow_pickle=True)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="EventGPT checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/parity/eventgpt")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "events_01": args.out / f"{PART}_events_01.npy",
        "events_pm1": args.out / f"{PART}_events_pm1.npy",
    }
    write_events(files["events_01"], signed=False)
    write_events(files["events_pm1"], signed=True)

    sys.path.insert(0, str(args.repo))
    import torch
    from common.common import get_event_images_list, process_event_data  # the seed's common/common.py
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(**CLIP_336)
    outputs: dict[str, Any] = {}
    canvases: dict[str, list[list[int]]] = {}
    with torch.no_grad():
        for key, path in files.items():
            _, bf16 = process_event_data(str(path), processor, "cpu")  # 5 x (3, 336, 336) bfloat16
            events = np.array(np.load(path, allow_pickle=True)).item()
            pictures = get_event_images_list(events, NUM_FRAMES)
            fp32 = [processor(p, return_tensors="pt")["pixel_values"][0] for p in pictures]
            outputs[f"{key}_float32"] = torch.stack(fp32)  # (5, 3, 336, 336)
            outputs[f"{key}_bfloat16"] = torch.stack(bf16).float()
            canvases[key] = [list(p.shape[:2]) for p in pictures]

    record: dict[str, Any] = {
        "seed": {"repo": "XduSyL/EventGPT", "commit": git_commit(args.repo), "file": "common/common.py"},
        "versions": versions("torch", "transformers", "pillow", "numpy"),
        "inputs": {
            "events_01": {
                "file": files["events_01"].name,
                "events": EVENTS,
                "sensor": list(SENSOR),
                "p": "0/1 uint8",
            },
            "events_pm1": {
                "file": files["events_pm1"].name,
                "events": EVENTS,
                "sensor": list(SENSOR),
                "p": "-1/1 int8",
            },
        },
        "preprocessor_config": processor.to_dict(),
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "calls": {
            "<key>_bfloat16": "process_event_data(npy, CLIPImageProcessor(**clip-vit-large-patch14-336), 'cpu')[1]",
            "<key>_float32": "processor(frame)['pixel_values'][0] for frame in get_event_images_list(events, 5)",
        },
        "canvas_sizes": canvases,
    }
    tensors: dict[str, np.ndarray] = {}
    for key, value in outputs.items():
        tensors.update(digest(key, value))
    write_fixture(args.out, PART, tensors, record)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    sys.stdout.write(f"wrote {args.out}/{PART}.* ({shapes})\n")


if __name__ == "__main__":
    main()
