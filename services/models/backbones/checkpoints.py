"""Reading the eva_vit and imagebind checkpoints: modalmesh folders and the published files.

A modalmesh backbone folder holds `config.json` = {"format": "modalmesh-backbone", "backbone":
"eva_vit" | "imagebind", "config": {builder kwargs}} and `model.safetensors`:

- eva_vit: the whole tower (every block of `num_layers`) in transformers' `Blip2VisionModel`
  names (`embeddings.*`, `encoder.layers.{i}.*`); blocks past the selected one are not loaded.
- imagebind: `ImageBindEncoder` names, which are ImageBind's own (`modality_trunks.vision...`),
  for the towers it was written with (vision and audio; thermal too where a preset reads it).

A spec's `config` (the builder kwargs of a tiny twin) must agree with a folder's; where it is
empty the folder's is used. The published files are read with `torch.load(weights_only=True)`
(no code runs): `imagebind_huge.pth` through `load_imagebind_state_dict`, and EVA-ViT-g in
LAVIS layout (`eva_vit_g.pth`; also inside VideoChat's `{'model': ...}` under `visual_encoder.`
and E.T. Chat's under `model.vision_tower.vision_tower.`), mapped as `eva_lavis_to_hf` says.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.presets import EncoderSpec

logger = logging.getLogger(__name__)

FOLDER_FORMAT = "modalmesh-backbone"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_LISTED = 12
# Where the EVA tower sits inside the seeds' files (eva_vit_g.pth itself has no prefix).
EVA_PREFIXES: tuple[str, ...] = ("", "visual_encoder.", "model.vision_tower.vision_tower.", "vision_tower.")
# Keys the spec sets itself rather than `config`.
_EVA_SPEC_KEYS = ("select_layer", "select_feature", "tap_layers", "dtype", "ln_vision")


def write_backbone_folder(
    folder: Path, backbone: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Write a modalmesh backbone folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FOLDER_FORMAT, "backbone": backbone, "config": dict(config)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def read_backbone_folder(folder: Path, backbone: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a modalmesh backbone folder written for `backbone`.

    Raises:
        NotFoundError: No config.json or model.safetensors.
        InvalidArgumentError: The config is not one of ours or names another backbone.
    """
    from safetensors.torch import load_file

    path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not path.is_file() or not weights.is_file():
        raise NotFoundError(
            f"{backbone} checkpoint: expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE} at {folder}"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"{backbone} checkpoint {path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT or meta.get("backbone") != backbone:
        got = (
            {k: meta.get(k) for k in ("format", "backbone")}
            if isinstance(meta, dict)
            else type(meta).__name__
        )
        raise InvalidArgumentError(
            f"{backbone} checkpoint {path}: expected format {FOLDER_FORMAT!r} for backbone {backbone!r}, got {got}"
        )
    return dict(meta.get("config") or {}), load_file(str(weights))


def _merged_config(spec: EncoderSpec, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The folder's builder kwargs, checked against the spec's `config` overrides."""
    differ = {k: (v, stored[k]) for k, v in spec.config.items() if k in stored and stored[k] != v}
    if differ:
        detail = ", ".join(f"{k}: preset {a!r}, checkpoint {b!r}" for k, (a, b) in sorted(differ.items()))
        raise InvalidArgumentError(
            f"{spec.backbone} checkpoint {spec.checkpoint}: the preset's config disagrees with the folder's: {detail}"
        )
    return {**stored, **spec.config}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A published .pth, read without running code (weights_only); a {'model': ...} wrapper is opened."""
    if not path.is_file():
        raise NotFoundError(f"checkpoint: expected a file or a modalmesh folder at {path}, found nothing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for disallowed types, RuntimeError for damaged zips...
        raise InvalidArgumentError(f"checkpoint {path}: not a readable torch state dict: {e}") from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"checkpoint {path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _problems(want: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    out = [f"missing {k} (expected {tuple(v.shape)})" for k, v in want.items() if k not in given]
    out += [
        f"{k}: expected {tuple(want[k].shape)}, got {tuple(v.shape)}"
        for k, v in given.items()
        if k in want and v.shape != want[k].shape
    ]
    return out


def _fail(what: str, problems: list[str]) -> FailedPreconditionError:
    more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return FailedPreconditionError(
        f"{what} ({len(problems)} problems): {'; '.join(problems[:_MAX_LISTED])}{more}"
    )


# --- EVA-ViT-g ------------------------------------------------------------------------------


def resize_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + P, D) -> (1, 1 + num_patches, D): the patch grid bicubic-resized (LAVIS's
    `interpolate_pos_embed`), the CLS position kept."""
    old = pos.shape[1] - 1
    if old == num_patches:
        return pos
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side**2 != old or new_side**2 != num_patches:
        raise InvalidArgumentError(
            f"eva pos_embed: expected square patch grids, got {old} and {num_patches} patches"
        )
    grid = pos[:, 1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()  # (1, D, s, s)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, -1).to(pos.dtype)  # (1, P', D)
    return torch.cat([pos[:, :1], grid], dim=1)


def eva_lavis_to_hf(
    state_dict: Mapping[str, torch.Tensor], *, depth: int, num_patches: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an EVA-ViT-g state dict in LAVIS names to `Blip2VisionModel` names.

    `state_dict` holds the tower's keys without prefix (`cls_token`, `blocks.0.attn.qkv.weight`,
    ...). Blocks >= `depth` are dropped; the position grid is resized to `num_patches`;
    an inflated Conv3d patch weight (D, 3, 1, p, p) loses its time axis; q_bias and v_bias
    become the fused qkv bias (q, 0, v). Returns (mapped, keys that map to nothing).
    """
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    biases: dict[int, dict[str, torch.Tensor]] = {}
    simple = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in state_dict.items():
        if key == "cls_token":
            out["embeddings.class_embedding"] = value
        elif key == "pos_embed":
            out["embeddings.position_embedding"] = resize_pos_embed(value, num_patches)
        elif key.startswith("patch_embed.proj."):
            if key.endswith("weight") and value.ndim == 5:
                if value.shape[2] != 1:
                    raise InvalidArgumentError(
                        f"eva {key}: expected an inflated Conv3d weight with 1 time step, got {tuple(value.shape)}"
                    )
                value = value[:, :, 0]
            out["embeddings.patch_embedding." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            i = int(index)
            if i >= depth:
                continue
            if rest in ("attn.q_bias", "attn.v_bias"):
                biases.setdefault(i, {})[rest[5]] = value
                continue
            name, _, param = rest.rpartition(".")
            if name not in simple:
                ignored.append(key)
                continue
            out[f"encoder.layers.{i}.{simple[name]}.{param}"] = value
        else:
            ignored.append(key)
    for i, qv in biases.items():
        if set(qv) != {"q", "v"}:
            raise InvalidArgumentError(
                f"eva blocks.{i}.attn: expected both q_bias and v_bias, got {sorted(qv)}"
            )
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat(
            [qv["q"], torch.zeros_like(qv["v"]), qv["v"]]
        )
    return out, ignored


def _eva_kwargs(spec: EncoderSpec, config: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(k for k in config if k in _EVA_SPEC_KEYS)
    if clash:
        raise InvalidArgumentError(
            f"eva_vit config: {clash} are set by the preset's encoder fields (select_layer, "
            "select_feature, taps, dtype), not by config"
        )
    if spec.select_feature == "embedding":
        raise InvalidArgumentError(
            "eva_vit select_feature: expected 'patch' or 'cls_patch', got 'embedding' (ImageBind only)"
        )
    return {
        **config,
        "select_layer": spec.select_layer,
        "select_feature": spec.select_feature,
        "tap_layers": max(spec.taps, 1),
    }


def load_eva_vit(spec: EncoderSpec) -> Any:
    """The EVA-ViT-g backbone of `spec` with its weights (a modalmesh folder or a LAVIS .pth).

    Raises:
        NotFoundError: The checkpoint is missing.
        InvalidArgumentError: Unreadable, or config that contradicts the spec or the folder.
        FailedPreconditionError: Missing or mis-shaped tensors, each named (expected vs got).
    """
    from services.models.backbones.eva import eva_vit_g

    path = Path(spec.checkpoint)
    if path.is_dir():
        stored, weights = read_backbone_folder(path, "eva_vit")
        config = _merged_config(spec, stored)
    else:
        weights, config = {}, dict(spec.config)
    try:
        backbone = eva_vit_g(**_eva_kwargs(spec, config), dtype="float32")
    except TypeError as e:
        raise InvalidArgumentError(f"eva_vit config {sorted(config)}: {e}") from None
    vit = backbone.model
    want = {k: v for k, v in vit.state_dict().items() if not k.startswith("post_layernorm.")}
    if path.is_dir():
        given = {
            k: v
            for k, v in weights.items()
            if not k.startswith("post_layernorm.")
            and not (k.startswith("encoder.layers.") and _layer(k) >= backbone.depth)
        }
        stray = sorted(k for k in given if k not in want)
        problems = _problems(want, given) + [f"unexpected {k}" for k in stray]
    else:
        raw = _torch_load(path)
        prefix = next((p for p in EVA_PREFIXES if f"{p}cls_token" in raw), None)
        if prefix is None:
            raise FailedPreconditionError(
                f"eva_vit checkpoint {path}: expected an EVA-ViT-g state dict (a cls_token key, bare or "
                f"under one of {[p for p in EVA_PREFIXES if p]}), got {len(raw)} keys such as {sorted(raw)[:3]}"
            )
        tower = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
        patches = (vit.config.image_size // vit.config.patch_size) ** 2
        given, ignored = eva_lavis_to_hf(tower, depth=backbone.depth, num_patches=patches)
        if ignored:
            logger.info(
                "eva_vit checkpoint %s: %d keys not part of the tower ignored (e.g. %s)",
                path,
                len(ignored),
                ignored[:3],
            )
        problems = _problems(want, given)
    if problems:
        raise _fail(f"eva_vit checkpoint {path} does not fit the preset's tower", problems)
    vit.load_state_dict({k: v.to(torch.float32) for k, v in given.items() if k in want}, strict=False)
    if spec.dtype != "float32":
        from services.models.backbones.base import TORCH_DTYPES

        backbone.to(TORCH_DTYPES[spec.dtype])
    return backbone


def _layer(key: str) -> int:
    return int(key.split(".")[2])


# --- ImageBind ------------------------------------------------------------------------------

_IMAGEBIND_TOWER = {"image": "vision", "video": "vision", "audio": "audio", "thermal": "thermal"}


def imagebind_towers(modalities: Sequence[str]) -> tuple[str, ...]:
    """The ImageBind towers that `modalities` read, in ImageBind's order.

    Raises:
        InvalidArgumentError: A modality no ImageBind tower reads.
    """
    from services.models.backbones.imagebind import TOWERS

    unknown = [m for m in modalities if m not in _IMAGEBIND_TOWER]
    if unknown:
        raise InvalidArgumentError(
            f"imagebind modalities: expected some of {list(_IMAGEBIND_TOWER)}, got {list(modalities)}"
        )
    needed = {_IMAGEBIND_TOWER[m] for m in modalities}
    return tuple(t for t in TOWERS if t in needed)


def load_imagebind(spec: EncoderSpec, modalities: Sequence[str]) -> Any:
    """The ImageBind backbone with the towers `modalities` need (imagebind_huge.pth or a folder).

    Only those towers are built and loaded, strictly: each of their keys must be in the file
    with its shape and none may be missing; the other towers' keys are dropped.

    Raises:
        NotFoundError: The checkpoint is missing.
        InvalidArgumentError: Unreadable, a select_feature other than embedding, or a config
            the preprocessing cannot feed (audio must be 128 x 204, video clips of `frames_per_clip`,
            thermal squares of `thermal_input_size(spec)`).
        FailedPreconditionError: Missing or mis-shaped tensors, each named (expected vs got).
    """
    from services.models.backbones.base import TORCH_DTYPES
    from services.models.backbones.imagebind import (
        ImageBindBackbone,
        build_imagebind,
        load_imagebind_state_dict,
    )
    from services.models.media.audio import IMAGEBIND_FRAMES, IMAGEBIND_MEL_BINS
    from services.models.media.thermal import thermal_input_size

    if spec.select_feature != "embedding":
        raise InvalidArgumentError(
            f"imagebind select_feature: expected 'embedding' (the joint embedding), got {spec.select_feature!r}"
        )
    towers = imagebind_towers(modalities)
    path = Path(spec.checkpoint)
    if path.is_dir():
        stored, weights = read_backbone_folder(path, "imagebind")
        config = _merged_config(spec, stored)
    else:
        config, weights = dict(spec.config), {}
    if "towers" in config:
        raise InvalidArgumentError(
            "imagebind config: towers are chosen by the preset's modalities, not config"
        )
    try:
        model = build_imagebind(towers=towers, **config)
    except TypeError as e:
        raise InvalidArgumentError(f"imagebind config {sorted(config)}: {e}") from None
    audio = model.clip_shapes.get("audio")
    if audio is not None and audio[1:] != (IMAGEBIND_MEL_BINS, IMAGEBIND_FRAMES):
        raise InvalidArgumentError(
            f"imagebind audio: expected ({IMAGEBIND_MEL_BINS}, {IMAGEBIND_FRAMES}) spectrograms "
            f"(ImageBind's preprocessing), got {audio[1:]}"
        )
    thermal = model.clip_shapes.get("thermal")
    if thermal is not None and thermal[-1] != thermal_input_size(spec):
        raise InvalidArgumentError(
            f"imagebind thermal: the checkpoint's tower reads {thermal[-1]} px, the preset's "
            f"preprocessing makes {thermal_input_size(spec)} (encoder.config.thermal_image_size, "
            "default 224); set it to the checkpoint's"
        )
    load_imagebind_state_dict(model, weights if path.is_dir() else _torch_load(path), towers=towers)
    model.to(TORCH_DTYPES[spec.dtype])
    return ImageBindBackbone(model)
