"""Reading the module parity fixtures (`scripts/parity/<seed>_modules.py`) and comparing with them.

A fixture is `tests/fixtures/parity/<seed>/modules.safetensors` (tensors grouped as
`weight/<seed key>`, `input/<name>`, `output/<name>`) beside `modules.json` (how it was made,
the sizes, what produced each output). Tests write the weights back into the file forms the
seeds release (`save_seed_file`), read them through our checkpoint readers and key maps, build
our modules at the fixture's sizes and compare with `assert_matches` (fp32, max abs diff 1e-5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ModuleFixture:
    """One seed's module fixture: its weights (seed names), inputs, outputs and record."""

    seed: str
    weights: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def weights_under(self, prefix: str, *, strip: bool = False) -> dict[str, torch.Tensor]:
        """The weights whose seed key starts with `prefix` (without it when `strip`)."""
        return {
            (k[len(prefix) :] if strip else k): v.clone()
            for k, v in self.weights.items()
            if k.startswith(prefix)
        }


@cache
def load_fixture(seed: str) -> ModuleFixture:
    """The module fixture of `seed` (a folder name under tests/fixtures/parity)."""
    from safetensors.torch import load_file

    folder = FIXTURES / seed
    tensors = load_file(str(folder / "modules.safetensors"))
    groups: dict[str, dict[str, torch.Tensor]] = {"weight": {}, "input": {}, "output": {}}
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        groups[group][name] = value
    meta = json.loads((folder / "modules.json").read_text())
    return ModuleFixture(seed, groups["weight"], groups["input"], groups["output"], meta)


def max_abs_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.detach().float().cpu() - theirs.float()).abs().max())


def assert_matches(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOLERANCE) -> float:
    """Assert `ours` has the seed output's shape and lies within `tol` of it; return the max diff."""
    assert tuple(ours.shape) == tuple(theirs.shape), (
        f"{name}: expected the seed's shape {tuple(theirs.shape)}, got {tuple(ours.shape)}"
    )
    diff = max_abs_diff(ours, theirs)
    print(f"parity {name}: max abs diff {diff:.2e}")
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} against the seed's output exceeds {tol:g}"
    # A fixture whose output is all zeros would pass anything close to zero.
    assert float(theirs.abs().max()) > 100 * tol, (
        f"{name}: the seed's output is ~0; the fixture tests nothing"
    )
    return diff


def save_seed_file(path: Path, state: Mapping[str, torch.Tensor], *, wrap: str | None = None) -> Path:
    """Write `state` as the seeds' torch.save files do (optionally inside {wrap: state})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj: Any = dict(state) if wrap is None else {wrap: dict(state)}
    torch.save(obj, path)
    return path


def shipped_preset_dict(name: str) -> dict[str, Any]:
    """The shipped preset `name` as its YAML mapping (${VAR}s unexpanded), to edit sizes in."""
    from importlib import resources

    import yaml

    text = resources.files("presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def preset_from_dict(raw: Mapping[str, Any], tmp_path: Path) -> Any:
    """Validate an edited preset mapping (MODALMESH_MODELS_DIR under `tmp_path`)."""
    import yaml

    from services.common.presets import parse_preset

    return parse_preset(yaml.safe_dump(dict(raw)), cache_dir=tmp_path, source="<parity test preset>")


# --- ImageBind (PandaGPT and NExT-GPT) ---------------------------------------------------------


def imagebind_builder_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """`build_imagebind` keyword arguments (an encoder spec's `config`) at a fixture's sizes."""
    s = meta["sizes"]
    kernel = s["kernel_size"]
    assert kernel[1] == kernel[2] and kernel[0] == s["video_frames"], kernel
    return {
        "out_embed_dim": s["out_embed_dim"],
        "vision_embed_dim": s["vision_embed_dim"],
        "vision_num_blocks": s["vision_num_blocks"],
        "vision_num_heads": s["vision_num_heads"],
        "image_size": s["image_size"],
        "patch": kernel[1],
        "video_frames": s["video_frames"],
        "audio_embed_dim": s["audio_embed_dim"],
        "audio_num_blocks": s["audio_num_blocks"],
        "audio_num_heads": s["audio_num_heads"],
        "audio_mel_bins": s["audio_num_mel_bins"],
        "audio_frames": s["audio_target_len"],
        "audio_kernel": s["audio_kernel_size"],
        "audio_stride": s["audio_stride"],
    }


def imagebind_preset(name: str, fix: ModuleFixture, tmp_path: Path) -> Any:
    """The shipped preset `name` (PandaGPT, NExT-GPT) with its ImageBind encoders at the fixture's
    sizes, reading `imagebind_huge.pth` written from the fixture's weights into `tmp_path`."""
    raw = shipped_preset_dict(name)
    checkpoint = save_seed_file(
        tmp_path / "imagebind_huge.pth", fix.weights_under("modality_")
    )  # as facebookresearch/ImageBind publishes it: ImageBindModel.state_dict()
    config = imagebind_builder_config(fix.meta)
    for spec in raw["modalities"].values():
        spec["encoder"] = {
            **spec["encoder"],
            "checkpoint": str(checkpoint),
            "config": config,
            "dim": config["out_embed_dim"],
            "dtype": "float32",
        }
    return preset_from_dict(raw, tmp_path)
