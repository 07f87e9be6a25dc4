"""PandaGPT thermal fixture: ImageBind's thermal preprocessing and tower, and `llama_proj`, as
PandaGPT's `encode_thermal` runs them, by PandaGPT's own code.

    /work/scratch/venv/bin/python scripts/parity/pandagpt_thermal.py --repo /path/to/PandaGPT

Preprocessing: the seed's `load_and_transform_thermal_data` (code/model/ImageBind/data.py:
PIL convert("L"), Resize(224, bicubic), CenterCrop(224), ToTensor) on two files this script
writes: `thermal.png`, a false-colour RGB picture 250 x 263 (resized to 224 x 235, a centre
margin of 11: torchvision's round(5.5) = 6 where a floor gives 5), and `thermal.jpg`, a grey
JPEG 297 x 230 (-> 289 x 224, margin 65: round(32.5) = 32, half to even, where a ceiling gives
33). data.py is imported as `pandagpt_preprocess.load_seed_data` does (its shims: pytorchvideo's
torchvision import, the text tokenizer stub); neither shim is on the thermal path.

Tower: `ImageBindModel` from code/model/ImageBind/models/imagebind_model.py built with small
widths and depths (its constructor arguments; the thermal preprocessor's 224 px and kernel 16
are kept, so no shim), seeded random weights, run as `encode_thermal` runs it:
`visual_encoder({'thermal': x})['thermal']` (`ImageBindModel.forward`: the thermal
postprocessor whole, Normalize then the fixed x10 logit scale), then
`llama_proj(embeds).unsqueeze(1)` with the `nn.Linear(visual_hidden_size, hidden)` of
code/model/openllama.py.

Writes tests/fixtures/parity/pandagpt/thermal.{safetensors,json} and thermal.{png,jpg}:

    weight/<seed key>     modality_*.thermal.* (imagebind_huge.pth's names), llama_proj.*
    input/thermal.levels  uint8 (2, 1, 224, 224): the seed's preprocessed batch x 255, checked
                          here to give the seed's float32 tensor bit for bit when divided by
                          255 in float32 (as ToTensor divides); 4 times smaller than floats
    output/thermal.embedding   (2, out): ImageBindModel.forward's thermal output
    output/thermal.llama_proj  (2, 1, hidden): encode_thermal's LLM inputs

and, with --layout, tests/unit/services/models/backbones/data/imagebind_huge_thermal_keys.json:
the thermal keys and shapes of the seed's `imagebind_huge()` state dict, built on the meta device.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _modules_common import command_line, git_commit, patched, randomize, state, versions
from pandagpt_preprocess import load_seed_data

ROOT = Path(__file__).resolve().parents[2]
PART = "thermal"
PNG_SIZE = (250, 263)  # (W, H), RGB false colour
JPG_SIZE = (297, 230)  # (W, H), grey
LLM_HIDDEN = 40
SIZES: dict[str, Any] = {
    "out_embed_dim": 24,
    "thermal_embed_dim": 24,
    "thermal_num_blocks": 2,
    "thermal_num_heads": 3,
    "thermal_kernel_size": 16,  # imagebind_huge's; the 224 px input is hard-coded in the seed
    "thermal_drop_path": 0.0,
    # towers not read here (not saved); small so that building them is cheap
    "vision_embed_dim": 8,
    "vision_num_blocks": 1,
    "vision_num_heads": 2,
    "audio_embed_dim": 8,
    "audio_num_blocks": 1,
    "audio_num_heads": 2,
    "text_embed_dim": 8,
    "text_num_blocks": 1,
    "text_num_heads": 2,
    "depth_embed_dim": 8,
    "depth_num_blocks": 1,
    "depth_num_heads": 2,
    "imu_embed_dim": 8,
    "imu_num_blocks": 1,
    "imu_num_heads": 2,
}
GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")


def heat(width: int, height: int) -> np.ndarray:
    """A smooth (H, W) float picture in [0, 1] with detail at several scales: two warm blobs,
    a cool gradient and fine ripples, so that a one-pixel shift changes most values."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    blobs = np.exp(-((xx - 0.35 * width) ** 2 + (yy - 0.55 * height) ** 2) / (0.02 * width * height))
    blobs += 0.7 * np.exp(-((xx - 0.7 * width) ** 2 + (yy - 0.3 * height) ** 2) / (0.01 * width * height))
    ripples = 0.08 * np.sin(xx / 2.3) * np.cos(yy / 3.7)
    return np.clip(0.15 + 0.25 * yy / height + 0.6 * blobs + ripples, 0, 1)


def write_inputs(out: Path) -> dict[str, Path]:
    """thermal.png: the heat map through a false-colour ramp (RGB); thermal.jpg: grey."""
    from PIL import Image

    h = heat(*PNG_SIZE)
    rgb = np.stack([np.clip(1.8 * h - 0.3, 0, 1), np.clip(1.5 - 2.2 * np.abs(h - 0.6), 0, 1), 1 - h], -1)
    png, jpg = out / f"{PART}.png", out / f"{PART}.jpg"
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(png, format="PNG", optimize=True)
    grey = np.round(heat(*JPG_SIZE)[:, ::-1] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey)).save(buf, format="JPEG", quality=85)
    jpg.write_bytes(buf.getvalue())
    return {"png": png, "jpg": jpg}


def build_seed_model(imagebind_dir: Path, gen: torch.Generator) -> tuple[Any, Any]:
    """PandaGPT's ImageBindModel at SIZES with seeded random weights, and its module."""
    sys.path.insert(0, str(imagebind_dir))
    import models.imagebind_model as ib

    model = ib.ImageBindModel(**{k: v for k, v in SIZES.items()}).eval()
    randomize(model, gen)
    return model, ib


def huge_thermal_layout(ib: Any, commit: str) -> dict[str, Any]:
    """The thermal keys and shapes of the seed's imagebind_huge() state dict (meta device; its
    drop-path schedule, `torch.linspace(...).item()` in transformer.py, is computed on the CPU)."""
    linspace = torch.linspace
    with torch.device("meta"), patched(torch, "linspace", lambda *a, **k: linspace(*a, **k, device="cpu")):
        model, _ = ib.imagebind_huge(pretrained=False)
    full = model.state_dict()
    keys = {k: list(v.shape) for k, v in full.items() if k.split(".")[1:2] == ["thermal"]}
    return {
        "source": f"yxuansu/PandaGPT @ {commit}: code/model/ImageBind/models/imagebind_model.py "
        "imagebind_huge(pretrained=False).state_dict(), built on the meta device (torch.linspace "
        "of the drop-path rates on the CPU)",
        "command": command_line("PandaGPT"),
        "towers": ["thermal"],
        "entries_in_full_state_dict": len(full),
        "keys": keys,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a PandaGPT checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/parity/pandagpt")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the weights")
    parser.add_argument(
        "--layout", action="store_true", help="also write imagebind_huge's thermal key layout"
    )
    args = parser.parse_args()
    repo = args.repo.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    files = write_inputs(args.out)

    data, data_rel = load_seed_data(repo, "seed_imagebind_thermal")
    with torch.no_grad():
        x = data.load_and_transform_thermal_data(
            [str(files["png"]), str(files["jpg"])], "cpu"
        )  # (2, 1, 224, 224)
    levels = torch.round(x * 255).to(torch.uint8)
    if not torch.equal(levels.float() / 255, x):
        raise SystemExit("the seed's thermal tensor is not uint8 levels / 255 in float32")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model, ib = build_seed_model(repo / "code/model/ImageBind", gen)
    llama_proj = torch.nn.Linear(SIZES["out_embed_dim"], LLM_HIDDEN)
    randomize(llama_proj, gen)
    with torch.no_grad():
        embedding = model({ib.ModalityType.THERMAL: x})["thermal"]  # (2, out), as encode_thermal reads it
        projected = llama_proj(embedding).unsqueeze(1)  # (2, 1, hidden)
    kept = tuple(f"{g}.thermal." for g in GROUPS)
    weights = {k: v for k, v in state(model).items() if k.startswith(kept)}
    weights.update(state(llama_proj, "llama_proj."))

    from safetensors.torch import save_file

    tensors = {f"weight/{k}": v for k, v in weights.items()}
    tensors["input/thermal.levels"] = levels.contiguous()
    tensors["output/thermal.embedding"] = embedding.float().contiguous()
    tensors["output/thermal.llama_proj"] = projected.float().contiguous()
    save_file(tensors, str(args.out / f"{PART}.safetensors"), metadata={"format": "pt"})
    commit = git_commit(repo)
    record = {
        "command": command_line("PandaGPT"),
        "seed_commit": commit,
        "rng_seed": args.seed,
        "seed": "PandaGPT",
        "repo": "yxuansu/PandaGPT",
        "versions": versions("torch", "torchvision", "timm", "PIL", "numpy"),
        "sizes": {**SIZES, "thermal_image_size": int(x.shape[-1]), "llm_hidden": LLM_HIDDEN},
        "shims": [],
        "inputs": {
            "thermal.png": {"size": list(PNG_SIZE), "mode": "RGB", "resized": [224, 235], "crop_top": 6},
            "thermal.jpg": {"size": list(JPG_SIZE), "mode": "L", "resized": [289, 224], "crop_left": 32},
        },
        "weight_files": {
            "imagebind_huge.pth": "modality_*.thermal.* (the thermal tower only)",
            "pytorch_model.pt": "llama_proj.*",
        },
        "outputs": {
            "thermal.levels": {
                "shape": list(levels.shape),
                "from": f"{data_rel} load_and_transform_thermal_data([png, jpg], 'cpu') * 255 (exact)",
            },
            "thermal.embedding": {
                "shape": list(embedding.shape),
                "from": "ImageBind/models/imagebind_model.py ImageBindModel.forward "
                "(thermal postprocessor whole: Normalize, then x10)",
            },
            "thermal.llama_proj": {
                "shape": list(projected.shape),
                "from": "code/model/openllama.py encode_thermal: llama_proj(embeds).unsqueeze(1)",
            },
        },
    }
    (args.out / f"{PART}.json").write_text(json.dumps(record, indent=2) + "\n")
    size = (args.out / f"{PART}.safetensors").stat().st_size
    sys.stdout.write(
        f"wrote {args.out}/{PART}.* ({size / 1024:.0f} KiB of tensors, {len(tensors)} tensors)\n"
    )
    if args.layout:
        target = ROOT / "tests/unit/services/models/backbones/data/imagebind_huge_thermal_keys.json"
        layout = huge_thermal_layout(ib, commit)
        keys = layout.pop("keys")
        head = json.dumps(layout, indent=1)[:-2]  # without the closing brace
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        target.write_text(f'{head},\n "keys": {{\n{rows}\n }}\n}}\n')
        sys.stdout.write(f"wrote {target}\n")


if __name__ == "__main__":
    main()
