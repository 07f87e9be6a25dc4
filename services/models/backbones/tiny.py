"""Random-weight backbone checkpoints for tiny twins, in the formats the loaders read.

`write_tiny_backbone(spec, folder, seed=..., modalities=...)` writes, for the spec's backbone:

- clip_vision: a Hugging Face `CLIPVisionModel` folder plus `preprocessor_config.json`
  (resize the shortest edge to the image size, centre crop, CLIP mean/std); sizes from
  `spec.config` (CLIPVisionConfig kwargs) or the `tiny` preset's defaults (`VISION` here).
- eva_vit: a modalmesh folder (`_checkpoints`) with the whole tower `eva_vit_g(**spec.config)`
  describes (every block of `num_layers`).
- imagebind: a modalmesh folder with the vision and audio towers of
  `build_imagebind(**spec.config)`, and the thermal tower after them when one of `modalities`
  is thermal (its sizes, `thermal_*`, from the same config; the vision and audio weights are
  the same bytes with or without it).

This module is a leaf of the tiny generator: `services.models.tiny` composes it with the other
parts' writers, and nothing here imports that generator back.

The spec's `tokens` and `dim` are checked against what the sizes give, so a preset that does not
fit its generator fails here with expected vs got. The same seed writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from services.common.errors import InvalidArgumentError
from services.common.presets import EncoderSpec
from services.models.media.encode import CLIP_MEAN, CLIP_STD

_Writer = Callable[[EncoderSpec, Path, Sequence[str]], None]

# The `tiny` preset's CLIP vision tower (CONVENTIONS: 2-4 layers, width 32-128, images 28-64 px),
# used when the spec's `config` is empty.
VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def _check(spec: EncoderSpec, tokens: int, dim: int, sizes: dict[str, Any]) -> None:
    if (spec.tokens, spec.dim) != (tokens, dim):
        raise InvalidArgumentError(
            f"tiny {spec.backbone}: the preset expects {spec.tokens} tokens of width {spec.dim} per "
            f"frame (and tap), the sizes {sizes} give {tokens} of width {dim}"
        )


def _write_clip_vision(spec: EncoderSpec, folder: Path, modalities: Sequence[str]) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    sizes = dict(spec.config) if spec.config else dict(VISION)
    config: Any = CLIPVisionConfig(**sizes)
    patches = (config.image_size // config.patch_size) ** 2
    _check(spec, patches + (spec.select_feature == "cls_patch"), config.hidden_size, sizes)
    CLIPVisionModel(config).save_pretrained(folder)
    size = config.image_size
    CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        do_convert_rgb=True,
    ).save_pretrained(folder)


def _write_eva_vit(spec: EncoderSpec, folder: Path, modalities: Sequence[str]) -> None:
    from services.models.backbones.checkpoints import write_backbone_folder
    from services.models.backbones.eva import eva_vit_g

    sizes = dict(spec.config)
    tower = eva_vit_g(**sizes, select_layer=-1, select_feature=spec.select_feature)  # type: ignore[arg-type]
    _check(spec, tower.tokens, tower.dim, sizes)
    state = {k: v for k, v in tower.model.state_dict().items() if not k.startswith("post_layernorm.")}
    write_backbone_folder(folder, "eva_vit", sizes, state)


def _write_imagebind(spec: EncoderSpec, folder: Path, modalities: Sequence[str]) -> None:
    from services.models.backbones.checkpoints import imagebind_towers, write_backbone_folder
    from services.models.backbones.imagebind import DEFAULT_TOWERS, build_imagebind

    sizes = dict(spec.config)
    # Vision and audio always (the folders written before thermal existed), thermal last.
    towers = tuple(dict.fromkeys([*DEFAULT_TOWERS, *imagebind_towers(modalities)]))
    if "thermal" in towers and "thermal_embed_dim" not in sizes:
        raise InvalidArgumentError(
            "tiny imagebind thermal: expected tiny thermal sizes (thermal_embed_dim, "
            "thermal_num_blocks, thermal_num_heads, thermal_image_size, thermal_kernel) in "
            "encoder.config, got none (the defaults are imagebind_huge's 768 x 12 blocks)"
        )
    model = build_imagebind(towers=towers, **sizes)
    head: Any = model.modality_heads["vision"]
    _check(spec, 1, head[2].out_features, sizes)
    write_backbone_folder(folder, "imagebind", sizes, model.state_dict())


_WRITERS: dict[str, _Writer] = {
    "clip_vision": _write_clip_vision,
    "eva_vit": _write_eva_vit,
    "imagebind": _write_imagebind,
}


def write_tiny_backbone(
    spec: EncoderSpec, folder: Path, *, seed: int, modalities: Sequence[str] = ()
) -> None:
    """Write a random-weight checkpoint of `spec.backbone` into `folder` (created if missing).

    Args:
        spec: The modality's encoder spec: its backbone, `config` sizes, tokens and dim.
        folder: Where to write; `spec.checkpoint` usually names it (or a temporary folder that
            is renamed there).
        seed: Seeds the weights; the same seed and spec write the same bytes.
        modalities: The preset's modalities this checkpoint serves; ImageBind adds the thermal
            tower when "thermal" is among them. The other backbones ignore it.

    Raises:
        InvalidArgumentError: The sizes do not give the spec's tokens and dim, bad sizes, or
            a modality the backbone cannot read.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _WRITERS[spec.backbone](spec, folder, modalities)
