"""VideoChat's temporal layers: UniFormerV2-style Global MHRA over EVA's last blocks (trainable).

VideoChat (`video_chat/models/eva_vit.py`, `gmhra_layers=8`, `no_lmhra=True`) runs EVA per
frame and, after each of the blocks 31..38, updates one learned video token by
cross-attending to all T x 257 tokens of that block. Before the attention the tokens are
normalised (`ln_3`) and a depthwise 3x3x3 Conv3d over (T, H, W) of the patch tokens is added
to them as a position encoding (`dpe`). The attention's output projection and the MLP's last
layer start at zero, so a new stack leaves the video token at `cls_token` (zeros).
The output is `cat(last block's tokens of every frame, video token)`: (B, T*N + 1, D).

Submodule names follow the seed (`dpe`, `attn` as `nn.MultiheadAttention`, `ln_1..3`,
`mlp.c_fc`/`mlp.c_proj`), so `visual_encoder.gmhra.{j}.*` maps to `layers.{j}.*` and
`visual_encoder.gmhra_cls_token` to `cls_token`. Drop path is left out (0 in every
VideoChat config).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from services.common.errors import InvalidArgumentError


class GlobalMHRA(nn.Module):
    """One Global MHRA layer: (B, 1, D) video token x (B, T, N, D) block tokens -> (B, 1, D)."""

    def __init__(self, width: int, heads: int, *, mlp_ratio: float = 4.3637, dropout: float = 0.5) -> None:
        super().__init__()
        self.dpe = nn.Conv3d(width, width, kernel_size=3, stride=1, padding=1, bias=True, groups=width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        hidden = round(mlp_ratio * width)
        c_fc, c_proj = nn.Linear(width, hidden), nn.Linear(hidden, width)
        nn.init.xavier_uniform_(c_fc.weight)
        nn.init.zeros_(c_proj.weight)
        nn.init.zeros_(c_proj.bias)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", c_fc), ("gelu", nn.GELU()), ("dropout", nn.Dropout(dropout)), ("c_proj", c_proj)]
            )
        )
        self.ln_2 = nn.LayerNorm(width)
        self.ln_3 = nn.LayerNorm(width)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        nn.init.zeros_(self.attn.out_proj.weight)
        for bias in (self.dpe.bias, self.attn.out_proj.bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def _attend(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, frames, n, width = tokens.shape
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise InvalidArgumentError(
                f"global MHRA tokens: expected CLS + a square grid of patches per frame, got {n} tokens"
            )
        patches = tokens[:, :, 1:].permute(0, 3, 1, 2).reshape(batch, width, frames, side, side)
        pos = self.dpe(patches).flatten(3).permute(0, 2, 3, 1)  # (B, T, P, D)
        keys = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + pos], dim=2)  # (B, T, N, D)
        keys = keys.reshape(batch, frames * n, width)  # (B, T*N, D)
        out, _ = self.attn(query, keys, keys, need_weights=False)  # (B, 1, D)
        return out

    def forward(self, video_token: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        video_token = video_token + self._attend(self.ln_1(video_token), self.ln_3(tokens))  # (B, 1, D)
        return video_token + self.mlp(self.ln_2(video_token))  # (B, 1, D)


class TemporalGMHRA(nn.Module):
    """A stack of Global MHRA layers, one per tapped EVA block.

    Args:
        width: EVA width (1408).
        heads: Attention heads (16).
        num_layers: Layers, i.e. tapped blocks (8: blocks 31..38 of a 39-block EVA).
        mlp_ratio: MLP width over `width` (EVA's 4.3637 -> 6144).
        dropout: Dropout inside the MLP (0.5).
    """

    def __init__(
        self, width: int, heads: int, *, num_layers: int = 8, mlp_ratio: float = 4.3637, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.width = width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.layers = nn.ModuleList(
            GlobalMHRA(width, heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(num_layers)
        )

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """(B, T, K, N, D) outputs of the K tapped blocks, per frame -> (B, T*N + 1, D).

        Layer j reads tap j (taps in block order); the last tap is the selected block, whose
        tokens (all frames, frame-major) are returned followed by the video token.
        """
        if taps.ndim != 5 or taps.shape[2] != len(self.layers) or taps.shape[-1] != self.width:
            raise InvalidArgumentError(
                f"global MHRA input: expected (batch, frames, {len(self.layers)}, tokens, {self.width}), "
                f"got {tuple(taps.shape)}"
            )
        batch, frames, _, n, width = taps.shape
        video_token = self.cls_token.expand(batch, -1, -1)  # (B, 1, D)
        for j, layer in enumerate(self.layers):
            video_token = layer(video_token, taps[:, :, j])  # (B, 1, D)
        last = taps[:, :, -1].reshape(batch, frames * n, width)  # (B, T*N, D)
        return torch.cat([last, video_token], dim=1)  # (B, T*N + 1, D)
