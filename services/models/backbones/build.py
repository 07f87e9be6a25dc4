"""The backbone registry: `build_backbone(spec)` picks the builder by `spec.backbone` (clip_vision,
eva_vit, imagebind), loads its checkpoint (`services.models.backbones.checkpoints`) and checks,
per modality, that the rows and width the backbone really returns are the preset's
`tokens_per_frame()` and `dim`, so a mismatched checkpoint fails at load, not on a request.

The modules import one way: `base` (the Backbone interface, CLIP's tower) <- `eva`, `imagebind`
(the towers) <- `checkpoints` (their loaders) <- `build` (this registry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from services.common.devices import default_device
from services.common.errors import InvalidArgumentError
from services.common.presets import BACKBONE_MODALITIES, EncoderSpec
from services.models.backbones.base import Backbone, ClipVisionBackbone
from services.models.backbones.checkpoints import load_eva_vit, load_imagebind

logger = logging.getLogger(__name__)


def _build_clip_vision(spec: EncoderSpec, modalities: Sequence[str]) -> Backbone:
    if spec.select_feature == "embedding":
        raise InvalidArgumentError(
            "clip_vision select_feature: expected 'patch' or 'cls_patch', got 'embedding' (ImageBind only)"
        )
    backbone = ClipVisionBackbone.from_pretrained(
        spec.checkpoint,
        select_layer=spec.select_layer,
        select_feature=spec.select_feature,
        dtype=spec.dtype,
    )
    config = backbone.model.config
    differ = {
        k: (v, getattr(config, k, None)) for k, v in spec.config.items() if getattr(config, k, None) != v
    }
    if differ:
        detail = ", ".join(f"{k}: preset {a!r}, checkpoint {b!r}" for k, (a, b) in sorted(differ.items()))
        raise InvalidArgumentError(
            f"clip_vision checkpoint {spec.checkpoint}: the preset's config disagrees with its config.json: {detail}"
        )
    return backbone


def _build_eva_vit(spec: EncoderSpec, modalities: Sequence[str]) -> Backbone:
    return load_eva_vit(spec)


def _build_imagebind(spec: EncoderSpec, modalities: Sequence[str]) -> Backbone:
    return load_imagebind(spec, modalities)


# name -> builder(spec, modalities the built backbone must read)
BACKBONES: dict[str, Callable[[EncoderSpec, Sequence[str]], Backbone]] = {
    "clip_vision": _build_clip_vision,
    "eva_vit": _build_eva_vit,
    "imagebind": _build_imagebind,
}


def check_output(backbone: Backbone, spec: EncoderSpec, *, modality: str = "image") -> None:
    """Run one zero item of `modality` through `backbone`; compare its (rows, dim) with the preset's.

    Raises:
        InvalidArgumentError: The backbone returns another shape than the preset declares.
    """
    got = tuple(backbone.encode(modality, backbone.dummy_input(modality)).shape[1:])  # (rows, D)
    want = (spec.tokens_per_frame(), spec.dim)
    if got != want:
        taps = f", taps={spec.taps}" if spec.taps else ""
        raise InvalidArgumentError(
            f"{spec.backbone} encoder at {spec.checkpoint} ({modality}): the preset expects "
            f"{want[0]} tokens of width {want[1]} per frame, the backbone returns {got[0]} tokens "
            f"of width {got[1]} (select_layer={spec.select_layer}, "
            f"select_feature={spec.select_feature}{taps})"
        )


def build_backbone(
    spec: EncoderSpec,
    *,
    modalities: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> Backbone:
    """Build, freeze, place and check the backbone an `EncoderSpec` names.

    Args:
        spec: The modality's encoder spec; `spec.backbone` picks the builder in `BACKBONES`.
        modalities: The modalities the backbone will read (ImageBind builds only the towers
            they need); default every modality the backbone can read.
        device: Where to run it; default `default_device()`.

    Returns:
        A frozen module whose `encode(modality, inputs)` gives (B, spec.tokens_per_frame(),
        spec.dim) features.

    Raises:
        InvalidArgumentError: Unknown backbone, a modality it cannot read, or its output does
            not match the spec.
        NotFoundError: The checkpoint is missing.
    """
    try:
        builder = BACKBONES[spec.backbone]
    except KeyError:
        raise InvalidArgumentError(
            f"encoder backbone: expected one of {sorted(BACKBONES)}, got {spec.backbone!r}"
        ) from None
    readable = BACKBONE_MODALITIES[spec.backbone]
    chosen = tuple(readable if modalities is None else modalities)
    unreadable = [m for m in chosen if m not in readable]
    if unreadable or not chosen:
        raise InvalidArgumentError(
            f"{spec.backbone} modalities: expected a non-empty subset of {list(readable)}, got {list(chosen)}"
        )
    backbone = builder(spec, chosen)
    backbone.to(device if device is not None else default_device())
    for modality in chosen:
        check_output(backbone, spec, modality=modality)
    logger.info(
        "loaded %s from %s for %s: %d tokens x %d per frame, %s on %s",
        spec.backbone,
        spec.checkpoint,
        "/".join(chosen),
        spec.tokens_per_frame(),
        spec.dim,
        spec.dtype,
        backbone.device,
    )
    return backbone
