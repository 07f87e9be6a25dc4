"""Shared by the `scripts/parity/*_modules.py` scripts: seeded weights, shims, the fixture writer.

Each `<seed>_modules.py` builds the seed's own modules (its classes and builders, imported from
the checkout given by `--repo`) at reduced sizes, gives every parameter seeded random values,
runs fixed inputs through them and writes `tests/fixtures/parity/<seed>/modules.safetensors`
and `modules.json`:

    weight/<seed key>   the weights, named as the seed's own state dict names them
    input/<name>        the inputs
    output/<name>       what the seed's modules returned (float32)

The JSON records the command line, the seed commit, the package versions, the sizes and, per
output, what produced it (the seed file and function). Where a seed hard-codes a size (EVA's
1408 width, TextFcLayer's 512), a shim in the script changes only that number around the
seed's own builder, and the JSON says which.

Run only in the scratch environment (torch, transformers as the seed needs); nothing here is
imported by the project.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
PART = "modules"


def parse_args(seed: str, doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of the seed repository")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "tests" / "fixtures" / "parity" / seed,
        help="folder for modules.safetensors + modules.json",
    )
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the weights and inputs")
    args = parser.parse_args()
    args.repo = args.repo.resolve()
    if not args.repo.is_dir():
        parser.error(f"--repo {args.repo}: not a folder")
    return args


def git_commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def versions(*names: str) -> dict[str, str]:
    """Python and the named packages' versions, as imported (overlays included)."""
    import importlib

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:
            out[name] = "not installed"
    return out


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every floating parameter seeded random values of a sensible scale.

    The seeds initialise many tensors to zeros or ones (extra queries, GMHRA's output layers,
    q/v biases, LayerNorms); random values make a swapped or dropped tensor visible.
    Matrices get N(0, 1/fan_in) (fan_in = all but the first axis), token-like tensors with a
    leading axis of 1 N(0, 0.5), LayerNorm-like weights 1 + N(0, 0.2), biases N(0, 0.2).
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2 and p.shape[0] > 1:
                fan_in = math.prod(p.shape[1:])
                value = noise / math.sqrt(fan_in)
            elif p.ndim >= 2:
                value = noise * 0.5
            elif name.endswith("weight"):
                value = 1.0 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(value.to(p.dtype))


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set `obj.name` to `value` for the block (a shim around a seed's hard-coded size)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def bert_vocab(folder: Path, words: list[str]) -> Path:
    """A tiny bert-base-uncased-style vocab.txt (the seeds load bert-base-uncased from the hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return folder


def state(module: torch.nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`module.state_dict()` under `prefix`, without keys starting with `skip`, detached float32 copies
    (integer buffers kept as they are)."""
    out = {}
    for k, v in module.state_dict().items():
        if k.startswith(skip):
            continue
        v = v.detach().cpu()
        out[prefix + k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


def command_line(repo: str) -> str:
    """This run's command line (with PYTHONPATH where set), the checkout path a placeholder."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    argv = list(sys.argv[1:])
    for i, a in enumerate(argv):
        if a.startswith("--repo="):
            argv[i] = f"--repo=<{repo} checkout>"
        elif a == "--repo" and i + 1 < len(argv):
            argv[i + 1] = f"<{repo} checkout>"
    env = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    return " ".join([*env, "/work/scratch/venv/bin/python", str(script), *argv])


def write_fixture(
    args: argparse.Namespace,
    *,
    weights: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
    record: dict[str, Any],
) -> None:
    """Write `modules.safetensors` + `modules.json` into `args.out`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for group, items in (("weight", weights), ("input", inputs), ("output", outputs)):
        for k, v in items.items():
            t = v.detach().cpu()
            tensors[f"{group}/{k}"] = (t.float() if t.is_floating_point() else t).contiguous()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / f"{PART}.safetensors"), metadata={"format": "pt"})
    meta = {
        "command": command_line(record.get("repo", "seed")),
        "seed_commit": git_commit(args.repo),
        "rng_seed": args.seed,
        **record,
        "outputs": {
            k: {"shape": list(outputs[k].shape), **record.get("outputs", {}).get(k, {})} for k in outputs
        },
    }
    (args.out / f"{PART}.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    size = (args.out / f"{PART}.safetensors").stat().st_size
    sys.stdout.write(
        f"wrote {args.out / PART}.safetensors ({size / 1024:.0f} KiB, {len(tensors)} tensors) and .json\n"
    )


# --- ImageBind (PandaGPT and NExT-GPT ship the same models/ code) ------------------------------

IMAGEBIND_IMAGE = 42  # px; ImageBind's 224 (patch 14 kept: a 3 x 3 grid)
IMAGEBIND_SIZES: dict[str, Any] = {
    "video_frames": 2,
    "kernel_size": [2, 14, 14],
    "out_embed_dim": 24,
    "vision_embed_dim": 32,
    "vision_num_blocks": 2,
    "vision_num_heads": 4,
    "audio_embed_dim": 32,
    "audio_num_blocks": 2,
    "audio_num_heads": 4,
    "audio_num_mel_bins": 128,  # ImageBind's fbank size: our loader checks it
    "audio_target_len": 204,
    "audio_kernel_size": 16,
    "audio_stride": 10,
    # towers the seeds do not read (not saved); small so that building them is cheap
    "text_embed_dim": 8,
    "text_num_blocks": 1,
    "text_num_heads": 2,
    "depth_embed_dim": 8,
    "depth_num_blocks": 1,
    "depth_num_heads": 2,
    "thermal_embed_dim": 8,
    "thermal_num_blocks": 1,
    "thermal_num_heads": 2,
    "imu_embed_dim": 8,
    "imu_num_blocks": 1,
    "imu_num_heads": 2,
}
IMAGEBIND_SHIM = (
    "imagebind_model.RGBDTPreprocessor wrapped while ImageBindModel is built: the vision "
    "preprocessor's img_size [3, T, 224, 224] (imagebind_model.py:172) becomes "
    f"[3, T, {IMAGEBIND_IMAGE}, {IMAGEBIND_IMAGE}]"
)


def imagebind_case(
    imagebind_dir: Path,
    gen: torch.Generator,
    *,
    llm_hidden: int,
    batch: int,
    video_clips: int,
    audio_clips: int,
    where: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """ImageBind's vision + audio towers and `llama_proj` of a seed's copy at `imagebind_dir`.

    `ImageBindModel` is built with IMAGEBIND_SIZES (its own constructor arguments); only the
    vision preprocessor's hard-coded 224 px is changed to IMAGEBIND_IMAGE. `llama_proj` is the
    `nn.Linear(visual_hidden_size, hidden_size)` the seed model builds, applied as its
    `encode_image/video/audio` do: `llama_proj(embeddings[m]).unsqueeze(1)`.

    Returns (weights, inputs, outputs, notes per output).
    """
    sys.path.insert(0, str(imagebind_dir))
    import models.imagebind_model as ib

    original = ib.RGBDTPreprocessor

    def rgbdt(*, img_size, rgbt_stem, depth_stem, **kw):  # type: ignore[no-untyped-def]
        if rgbt_stem is not None and len(img_size) == 4:  # the vision tower: [3, T, 224, 224]
            img_size = [img_size[0], img_size[1], IMAGEBIND_IMAGE, IMAGEBIND_IMAGE]
        return original(img_size=img_size, rgbt_stem=rgbt_stem, depth_stem=depth_stem, **kw)

    with patched(ib, "RGBDTPreprocessor", rgbdt):
        model = ib.ImageBindModel(**{**IMAGEBIND_SIZES, "kernel_size": tuple(IMAGEBIND_SIZES["kernel_size"])})
    model.eval()
    randomize(model, gen)
    llama_proj = torch.nn.Linear(IMAGEBIND_SIZES["out_embed_dim"], llm_hidden)
    randomize(llama_proj, gen)

    frames = IMAGEBIND_SIZES["video_frames"]
    mel, target = IMAGEBIND_SIZES["audio_num_mel_bins"], IMAGEBIND_SIZES["audio_target_len"]
    side = IMAGEBIND_IMAGE
    inputs = {
        "image": randn(gen, batch, 3, side, side),
        "video": randn(gen, batch, video_clips, 3, frames, side, side),
        "audio": randn(gen, batch, audio_clips, 1, mel, target),
    }
    vision, audio = ib.ModalityType.VISION, ib.ModalityType.AUDIO
    outputs: dict[str, torch.Tensor] = {}
    notes: dict[str, Any] = {}
    with torch.no_grad():
        for name, key in (("image", vision), ("video", vision), ("audio", audio)):
            embedding = model({key: inputs[name]})[key]  # (B, out), as encode_<m> reads it
            outputs[f"{name}.embedding"] = embedding
            outputs[f"{name}.llama_proj"] = llama_proj(embedding).unsqueeze(1)  # (B, 1, hidden)
            notes[f"{name}.embedding"] = {
                "from": "ImageBind/models/imagebind_model.py ImageBindModel.forward"
                + ("" if name == "image" else " (clips averaged after Normalize)")
            }
            notes[f"{name}.llama_proj"] = {"from": f"{where} encode_{name}: llama_proj(embeds).unsqueeze(1)"}
    groups = ("modality_preprocessors.", "modality_trunks.", "modality_heads.", "modality_postprocessors.")
    kept = tuple(f"{g}{t}." for g in groups for t in (vision, audio))
    weights = {k: v for k, v in state(model).items() if k.startswith(kept)}
    weights.update(state(llama_proj, "llama_proj."))
    return weights, inputs, outputs, notes
