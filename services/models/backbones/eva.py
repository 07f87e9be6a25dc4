"""EVA-ViT-g as a frozen backbone: the seeds' block choice, per-frame video, optional taps.

Built on transformers' `Blip2VisionModel` (the EVA-ViT-g of BLIP-2: q/v-only qkv bias,
pre-norm blocks, exact GELU, LayerNorm eps 1e-6) and run block by block, so that only the
blocks up to the selected one exist and intermediate blocks can be tapped for VideoChat's
temporal layers. See `services.models.connectors.eva_qformer` for the checkpoint key layout.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.models.backbones.base import TORCH_DTYPES, Backbone

EvaFeature = Literal["patch", "cls_patch"]


def eva_depth(select_layer: int, num_layers: int = 40) -> int:
    """How many blocks run to give block `select_layer`'s output, by the seeds' rule.

    E.T. Chat `vision_encoder/eva_vit.py`: `depth = idx + 1 if idx >= 0 else 40 + idx + 1`;
    VideoChat and BLIP-2 hard-code `depth=39`, the same as idx = -2. `select_layer` is a
    block index (0 = the first block's output, -1 = the last block's, -2 = the penultimate),
    so the features are `hidden_states[depth]` of the full tower (hidden_states[0] being the
    embeddings). For negative indices that is also `hidden_states[select_layer]`, LLaVA's
    convention; for non-negative ones the two conventions differ by one.

    Raises:
        InvalidArgumentError: The index is outside the tower's blocks.
    """
    if not -num_layers <= select_layer < num_layers:
        raise InvalidArgumentError(
            f"eva select_layer: expected a block index in {-num_layers}..{num_layers - 1} "
            f"for a {num_layers}-block tower, got {select_layer}"
        )
    return select_layer + 1 if select_layer >= 0 else num_layers + select_layer + 1


class EvaVisionBackbone(Backbone):
    """EVA-ViT-g cut after the selected block; images and videos (frames run independently).

    Args:
        model: A transformers `Blip2VisionModel` with at least `eva_depth(select_layer,
            num_layers)` layers; extra layers are dropped. Its `post_layernorm` is not used.
        select_layer: Block index by the seeds' rule (see `eva_depth`); -2 for both seeds.
        num_layers: Blocks of the full pretrained tower the index refers to (40 for EVA-g).
        select_feature: "cls_patch" keeps the CLS token (VideoChat, BLIP-2: 257 tokens),
            "patch" drops it (E.T. Chat: 256 tokens).
        ln_vision: Apply BLIP-2's `ln_vision` (a LayerNorm in fp32, eps 1e-5) to the output,
            as a frozen BLIP-2 does. Off for both seeds: VideoChat trains its ln_vision and
            applies it after the temporal layers, E.T. Chat's `qformer_ln` feeds only the
            Q-Former while its pooling reads the raw features; their ln_vision lives in the
            connector (`services.models.connectors.qformer`).
        tap_layers: How many consecutive blocks, ending at the selected one,
            `forward_taps` returns (8 for VideoChat's Global MHRA: blocks 31..38).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        select_layer: int = -2,
        num_layers: int = 40,
        select_feature: EvaFeature = "cls_patch",
        ln_vision: bool = False,
        tap_layers: int = 1,
    ) -> None:
        super().__init__()
        vit: Any = model
        config = vit.config
        depth = eva_depth(select_layer, num_layers)
        have = len(vit.encoder.layers)
        if have < depth:
            raise InvalidArgumentError(
                f"eva model: select_layer {select_layer} of {num_layers} needs {depth} blocks, "
                f"the model has {have}"
            )
        if select_feature not in ("patch", "cls_patch"):
            raise InvalidArgumentError(
                f"eva select_feature: expected 'patch' or 'cls_patch', got {select_feature!r}"
            )
        if not 1 <= tap_layers <= depth:
            raise InvalidArgumentError(
                f"eva tap_layers: expected 1..{depth} (the blocks that run), got {tap_layers}"
            )
        vit.encoder.layers = vit.encoder.layers[:depth]
        config.num_hidden_layers = depth
        self.model: Any = vit
        self.select_layer, self.depth = select_layer, depth
        self.select_feature = select_feature
        self.tap_layers = tap_layers
        self.ln_vision = nn.LayerNorm(config.hidden_size) if ln_vision else None
        self.image_size = int(config.image_size)
        patches = (config.image_size // config.patch_size) ** 2
        self.tokens = patches + (1 if select_feature == "cls_patch" else 0)
        self.dim = int(config.hidden_size)
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights run in."""
        return self.model.embeddings.patch_embedding.weight.dtype

    def _frames(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, 3, H, W) or (B, T, 3, H, W) -> (B*T, 3, H, W) and the leading dims to restore."""
        size = self.image_size
        if pixel_values.ndim not in (4, 5) or tuple(pixel_values.shape[-3:]) != (3, size, size):
            raise InvalidArgumentError(
                f"eva pixels: expected (batch, 3, {size}, {size}) or (batch, frames, 3, {size}, {size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        lead = tuple(pixel_values.shape[:-3])
        return pixel_values.reshape(-1, 3, size, size).to(self.dtype), lead

    def _run(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Run the blocks; return the outputs of the last `tap_layers` of them, in order."""
        hidden = self.model.embeddings(frames)  # (F, 1 + P, D)
        taps = []
        first_tap = self.depth - self.tap_layers
        for i, layer in enumerate(self.model.encoder.layers):
            hidden = layer(hidden)  # (F, 1 + P, D)
            if i >= first_tap:
                taps.append(hidden[:, 1:] if self.select_feature == "patch" else hidden)
        return taps

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> the selected block's tokens, per frame.

        (B, 3, H, W) -> (B, tokens, D); (B, T, 3, H, W) -> (B, T, tokens, D). The result is an
        inference tensor; `.clone()` it outside inference mode before using it in autograd.
        """
        with torch.inference_mode():
            frames, lead = self._frames(pixel_values)  # (B*T, 3, H, W)
            hidden = self._run(frames)[-1]  # (B*T, N, D)
            if self.ln_vision is not None:
                hidden = self.ln_vision(hidden.float()).to(hidden.dtype)  # LAVIS LayerNorm in fp32
            return hidden.reshape(*lead, *hidden.shape[1:])

    @property
    def tokens_per_frame(self) -> int:
        """Rows per frame that `encode` returns: tokens of each tapped block (1 without taps)."""
        return self.tokens * self.tap_layers

    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) frames -> (N, tap_layers * tokens, D): per frame, the tapped blocks' tokens
        one block after the other (the selected block last); without taps the selected block's."""
        inputs = inputs.to(self.device)
        if self.tap_layers == 1:
            return self(inputs)  # (N, T, D)
        taps = self.forward_taps(inputs)  # (N, 1, K, T, D)
        return taps.reshape(taps.shape[0], -1, taps.shape[-1])  # (N, K * T, D)

    def forward_taps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> the raw tokens of the last `tap_layers` blocks (for Global MHRA).

        (B, T, 3, H, W) -> (B, T, K, tokens, D), K = tap_layers, the last entry being the
        selected block (without ln_vision); an image (B, 3, H, W) is one frame.
        """
        with torch.inference_mode():
            if pixel_values.ndim == 4:
                pixel_values = pixel_values[:, None]  # (B, 1, 3, H, W)
            frames, lead = self._frames(pixel_values)  # (B*T, 3, H, W)
            taps = torch.stack(self._run(frames), dim=1)  # (B*T, K, N, D)
            return taps.reshape(*lead, *taps.shape[1:])


def eva_vit_g(
    *,
    select_layer: int = -2,
    num_layers: int = 40,
    width: int = 1408,
    heads: int = 16,
    mlp_dim: int = 6144,
    image_size: int = 224,
    patch_size: int = 14,
    select_feature: EvaFeature = "cls_patch",
    ln_vision: bool = False,
    tap_layers: int = 1,
    dtype: str = "float32",
) -> EvaVisionBackbone:
    """Build an (untrained) EVA-ViT-g backbone with only the blocks the selection needs.

    Defaults are the seeds' EVA-ViT-g: 40 blocks of width 1408, 16 heads of 88, MLP 6144
    (`int(1408 * 4.3637)`), 224 px, patch 14, block -2, so 39 blocks (~0.99 B parameters) are
    built. Weights come later from an importer (see `services.models.connectors.eva_qformer`).
    """
    from transformers import Blip2VisionConfig, Blip2VisionModel

    config = Blip2VisionConfig(
        hidden_size=width,
        intermediate_size=mlp_dim,
        num_hidden_layers=eva_depth(select_layer, num_layers),
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        initializer_range=0.02,
    )
    model: Any = Blip2VisionModel(config)
    model.to(TORCH_DTYPES[dtype])
    return EvaVisionBackbone(
        model,
        select_layer=select_layer,
        num_layers=num_layers,
        select_feature=select_feature,
        ln_vision=ln_vision,
        tap_layers=tap_layers,
    )
