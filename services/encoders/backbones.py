"""Frozen media backbones, built from a preset's `EncoderSpec` through a registry.

A backbone maps preprocessed pixels (B, 3, H, W) to tokens (B, T, D). Each one is loaded
from a checkpoint folder on disk (never from a hub at run time), frozen, put in eval mode and
run under `torch.inference_mode`. `build_backbone(spec)` picks the builder by
`spec.backbone` and checks that the tokens and width the backbone really returns are the
preset's `tokens` and `dim`, so a mismatched checkpoint fails at load, not on a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import EncoderSpec

logger = logging.getLogger(__name__)

SelectFeature = Literal["patch", "cls_patch"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class Backbone(nn.Module):
    """Base of the backbones: (B, 3, image_size, image_size) -> (B, tokens, dim).

    Backbones are frozen: `train()` leaves them in eval mode, so a trainer that calls
    `.train()` on a model holding one does not switch on its dropout.
    """

    image_size: int
    tokens: int
    dim: int

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)


class ClipVisionBackbone(Backbone):
    """A CLIP vision tower returning one hidden layer's tokens, LLaVA style.

    Args:
        model: A transformers `CLIPVisionModel`.
        select_layer: Index into the hidden states (0 = embeddings, -1 = last layer, -2 = LLaVA's).
        select_feature: "patch" drops the CLS token, "cls_patch" keeps it.
    """

    def __init__(
        self, model: nn.Module, *, select_layer: int = -2, select_feature: SelectFeature = "patch"
    ) -> None:
        super().__init__()
        config: Any = model.config
        n_states = config.num_hidden_layers + 1  # embeddings + every layer
        if not -n_states <= select_layer < n_states:
            raise InvalidArgumentError(
                f"clip_vision select_layer: expected an index into {n_states} hidden states "
                f"({-n_states}..{n_states - 1}), got {select_layer}"
            )
        if select_feature not in ("patch", "cls_patch"):
            raise InvalidArgumentError(
                f"clip_vision select_feature: expected 'patch' or 'cls_patch', got {select_feature!r}"
            )
        self.model = model.eval().requires_grad_(False)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.image_size = int(config.image_size)
        patches = (config.image_size // config.patch_size) ** 2
        self.tokens = patches + (1 if select_feature == "cls_patch" else 0)
        self.dim = int(config.hidden_size)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        select_layer: int = -2,
        select_feature: SelectFeature = "patch",
        dtype: str = "float32",
    ) -> ClipVisionBackbone:
        """Load the vision tower of a CLIP checkpoint folder (a CLIPVisionModel or a full CLIPModel).

        Raises:
            NotFoundError: The folder does not exist.
            InvalidArgumentError: The folder's weights do not fill the vision tower.
        """
        from transformers import CLIPVisionModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise NotFoundError(
                f"clip_vision checkpoint: expected a model folder at {folder}, found no config.json there"
            )
        loaded: Any = CLIPVisionModel.from_pretrained(
            folder, dtype=TORCH_DTYPES[dtype], output_loading_info=True
        )
        model, info = loaded
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise InvalidArgumentError(
                f"clip_vision checkpoint {folder}: expected weights for the whole vision tower, "
                f"{len(missing)} are missing (e.g. {missing[:3]})"
            )
        return cls(model, select_layer=select_layer, select_feature=select_feature)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights run in."""
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, T, D) tokens of the selected layer.

        The result is an inference tensor; `.clone()` it outside inference mode before using it
        in autograd (the trainer).
        """
        with torch.inference_mode():
            pixel_values = pixel_values.to(self.dtype)  # (B, 3, H, W)
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            hidden = out.hidden_states[self.select_layer]  # (B, 1 + P, D)
            if self.select_feature == "patch":
                hidden = hidden[:, 1:]  # (B, P, D)
            return hidden


def _build_clip_vision(spec: EncoderSpec) -> Backbone:
    return ClipVisionBackbone.from_pretrained(
        spec.checkpoint,
        select_layer=spec.select_layer,
        select_feature=spec.select_feature,
        dtype=spec.dtype,
    )


BACKBONES: dict[str, Callable[[EncoderSpec], Backbone]] = {
    "clip_vision": _build_clip_vision,
}


def check_output(backbone: Backbone, spec: EncoderSpec, *, image_size: int) -> None:
    """Run one zero image through `backbone` and compare its (tokens, dim) with the preset's.

    Raises:
        InvalidArgumentError: The backbone returns another shape than the preset declares.
    """
    pixels = torch.zeros(1, 3, image_size, image_size)  # (1, 3, H, W)
    got = tuple(backbone(pixels).shape[1:])  # (T, D)
    if got != (spec.tokens, spec.dim):
        raise InvalidArgumentError(
            f"{spec.backbone} encoder at {spec.checkpoint}: the preset expects {spec.tokens} tokens "
            f"of width {spec.dim}, the backbone returns {got[0]} tokens of width {got[1]} "
            f"(select_layer={spec.select_layer}, select_feature={spec.select_feature})"
        )


def build_backbone(spec: EncoderSpec) -> Backbone:
    """Build, freeze and check the backbone an `EncoderSpec` names.

    Args:
        spec: The modality's encoder spec; `spec.backbone` picks the builder in `BACKBONES`.

    Returns:
        A frozen module mapping (B, 3, H, W) pixels to (B, spec.tokens, spec.dim) tokens.

    Raises:
        InvalidArgumentError: Unknown backbone, or its output does not match the spec.
        NotFoundError: The checkpoint folder is missing.
    """
    try:
        builder = BACKBONES[spec.backbone]
    except KeyError:
        raise InvalidArgumentError(
            f"encoder backbone: expected one of {sorted(BACKBONES)}, got {spec.backbone!r}"
        ) from None
    backbone = builder(spec)
    check_output(backbone, spec, image_size=backbone.image_size)
    logger.info(
        "loaded %s from %s: %d tokens x %d, %s",
        spec.backbone,
        spec.checkpoint,
        spec.tokens,
        spec.dim,
        spec.dtype,
    )
    return backbone
