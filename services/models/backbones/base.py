"""Frozen media backbones, built from a preset's `EncoderSpec` through a registry.

Three backbones, each frozen, in eval mode and run under `torch.inference_mode`:

- clip_vision (`ClipVisionBackbone`): a Hugging Face CLIP vision tower, one hidden layer's
  tokens per frame (LLaVA's penultimate without CLS; EventGPT's last with CLS).
- eva_vit (`services.models.backbones.eva.EvaVisionBackbone`): EVA-ViT-g cut after the selected
  block; with `taps` the outputs of that many blocks ending at it, flattened per frame.
- imagebind (`ImageBindBackbone`): ImageBind's vision/audio/thermal towers; one joint-embedding
  vector per item (its clips averaged).

Every backbone answers `encode(modality, inputs)` with (B, rows, dim): frame backbones map
(frames, 3, S, S) pixels to (frames, tokens_per_frame, dim); ImageBind maps B items (images,
clips, spectrograms) to (B, 1, dim). `build_backbone(spec)` picks the builder by `spec.backbone`
and checks, per modality, that the rows and width the backbone really returns are the preset's
`tokens_per_frame()` and `dim`, so a mismatched checkpoint fails at load, not on a request.
Checkpoint formats are read by `services.models.backbones.checkpoints`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from services.common.devices import default_device
from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import BACKBONE_MODALITIES, EncoderSpec

logger = logging.getLogger(__name__)

SelectFeature = Literal["patch", "cls_patch"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class Backbone(nn.Module):
    """Base of the backbones.

    Frame backbones (`joint_embedding` False) map (N, 3, image_size, image_size) frames to
    (N, tokens_per_frame, dim); ImageBind (`joint_embedding` True) maps B items to (B, 1, dim).
    Backbones are frozen: `train()` leaves them in eval mode, so a trainer that calls
    `.train()` on a model holding one does not switch on its dropout.
    """

    image_size: int
    tokens: int
    dim: int
    joint_embedding: bool = False

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)

    @property
    def tokens_per_frame(self) -> int:
        """Rows one frame (a joint-embedding backbone: one item) contributes."""
        return self.tokens

    @property
    def device(self) -> torch.device:
        """Where the weights live; inputs are moved there."""
        return next(self.parameters()).device

    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Preprocessed inputs of one modality -> (B, rows, dim) float features (inference tensor).

        Frame backbones read (frames, 3, S, S) for every modality (an image is one frame).
        """
        with torch.inference_mode():
            return self(inputs.to(self.device))

    def dummy_input(self, modality: str) -> torch.Tensor:
        """A zero input of one item (one frame) of `modality`, for load-time checks."""
        return torch.zeros(1, 3, self.image_size, self.image_size)


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
            pixel_values = pixel_values.to(self.device, self.dtype)  # (B, 3, H, W)
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            hidden = out.hidden_states[self.select_layer]  # (B, 1 + P, D)
            if self.select_feature == "patch":
                hidden = hidden[:, 1:]  # (B, P, D)
            return hidden


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
    from services.models.backbones.checkpoints import load_eva_vit

    return load_eva_vit(spec)


def _build_imagebind(spec: EncoderSpec, modalities: Sequence[str]) -> Backbone:
    from services.models.backbones.checkpoints import load_imagebind

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
