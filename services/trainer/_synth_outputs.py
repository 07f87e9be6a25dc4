"""The output side of the synthetic dataset: text-to-X captions and their caption embeddings.

For NExT-GPT-style presets (with `outputs`), `synthesize(..., modalities=[..., "t2x"],
output_preset=preset)` writes, per output modality of the preset, captions drawn from the
same words as the media generators ("a red circle on a white background", "a red circle
moving left", "a high tone") and their embeddings computed by that modality's decoder
(`services.models.decoders.embed`, the function `modalmesh embed-captions` runs), so stage-2 runs
and tests need no download:

- `t2x/<modality>/<name>.npy` and `t2x/<modality>/t2x.jsonl` (the folder's own dataset);
- `t2x.jsonl`: every training record of every output modality, embedding paths relative to
  the output folder (format t2x, stage 2);
- `t2x_heldout.jsonl`: the same for held-out captions.

The words come from the leaf `_synth_scene`, as the media generators' do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from services.common.presets import Preset
from services.models.decoders.embed import CaptionEmbedder, CaptionRecord, embed_captions
from services.trainer._synth_scene import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    HELDOUT_SEED_OFFSET,
    PITCHES,
    SHAPES,
)

FOLDER = "t2x"


def _caption(modality: str, rng: random.Random) -> str:
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if modality == "image":
        return f"a {color} {shape} on a {rng.choice(list(BACKGROUNDS))} background"
    if modality == "video":
        return f"a {color} {shape} moving {rng.choice(DIRECTIONS)}"
    return f"a {rng.choice(list(PITCHES))} tone"


def write_t2x(out_dir: Path, preset: Preset, train: int, heldout: int, seed: int) -> dict[str, Any]:
    """Write the t2x files (see the module docstring); returns what was written for meta.json.

    Raises:
        InvalidArgumentError: The preset has no outputs.
        FailedPreconditionError: A decoder's conditioning is not the preset's.
    """
    from services.common.errors import InvalidArgumentError

    if not preset.outputs:
        raise InvalidArgumentError(f"synth: t2x: preset {preset.name} has no outputs (image/audio/video)")
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    shapes = {}
    for modality in preset.outputs:
        embedder = CaptionEmbedder(preset, str(modality))
        shapes[str(modality)] = list(embedder.shape)
        for split, count, offset in (("train", train, 0), ("heldout", heldout, HELDOUT_SEED_OFFSET)):
            if count == 0:
                continue
            rng = random.Random(f"{seed + offset}:{FOLDER}:{modality}")
            records = [
                CaptionRecord(i + 1, f"{split}_{i:05d}", _caption(str(modality), rng)) for i in range(count)
            ]
            folder = out_dir / FOLDER / str(modality)
            report = embed_captions(embedder, records, folder, dataset_name=f"{split}.jsonl")
            for line in report.dataset.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                row["embedding"] = f"{FOLDER}/{modality}/{row['embedding']}"
                row["id"] = f"{modality}-{row['id']}"
                rows[split].append(row)
    for split, name in (("train", "t2x.jsonl"), ("heldout", "t2x_heldout.jsonl")):
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows[split]), encoding="utf-8")
    return {
        "folder": FOLDER,
        "preset": preset.name,
        "train": len(rows["train"]),
        "heldout": len(rows["heldout"]),
        "files": {"train": "t2x.jsonl", "heldout": "t2x_heldout.jsonl"},
        "embedding_shapes": shapes,
    }
