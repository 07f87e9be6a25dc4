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
clips, spectrograms) to (B, 1, dim). `services.models.backbones.build`
picks the builder by `spec.backbone` and checks its output; checkpoint formats are read by
`services.models.backbones.checkpoints`. This module imports no other backbone module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from services.common.errors import InvalidArgumentError, NotFoundError

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
