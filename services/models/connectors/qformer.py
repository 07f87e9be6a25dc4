"""The Q-Former halves of VideoChat and E.T. Chat: connector parts that run after the frozen EVA.

Both take EVA tokens (from `EvaVisionBackbone`) and own their `ln_vision`, because both seeds
train it (VideoChat silently, E.T. Chat as `qformer_ln` in stages 2-3):

- `QFormerCompressor` (VideoChat): [Global MHRA] -> ln_vision -> BLIP-2 Q-Former
  (`Blip2QFormerModel`, query-only) with 32 pretrained + N zero-initialised extra queries over
  all frames' tokens at once -> Linear (`llama_proj`): (B, 32 + N, out_dim), 96 tokens for
  VideoChat whatever the frame count.
- `InstructQFormerPooler` (E.T. Chat `compress_image_qformer`): per frame, the instruction-aware
  InstructBLIP Q-Former (`InstructBlipQFormerModel`, queries + instruction tokens) reads
  ln_vision(patches); its 32 query outputs go through `qformer_proj` to the EVA width and
  attention-pool the raw patches (`q_proj`, `k_proj`, values are the raw patches), the
  pooled queries plus their embeddings are averaged and projected (`v_proj`): (B, T, out_dim),
  one LLM token per frame.

Frozen pretrained parts (`freeze_qformer=True`) get `requires_grad=False` and stay in eval mode
under `.train()`, as the seeds' `disabled_train` does; stage-specific choices beyond that
(E.T. Chat stage 3 trains only the Q-Former's attention) are the stage config's name regexes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.models.connectors.gmhra import TemporalGMHRA


def _trainable_input(features: torch.Tensor) -> torch.Tensor:
    """Backbones return inference tensors; autograd needs an ordinary copy."""
    return features.clone() if features.is_inference() else features


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` computed in its own weights' dtype, the result cast back to x's dtype.

    With ln_vision kept in float32 in a float16 connector this is BLIP-2's / VideoChat's
    `LayerNorm` subclass (`x.type(float32)`, LayerNorm, `.type(orig_type)`); with one dtype
    throughout it is the plain LayerNorm.
    """
    return norm(x.to(norm.weight.dtype)).to(x.dtype)


class QFormerCompressor(nn.Module):
    """VideoChat's visual connector: [Global MHRA] + ln_vision + BLIP-2 Q-Former + extra queries.

    Args:
        qformer: A transformers `Blip2QFormerModel` (no text input) whose
            `encoder_hidden_size` is `vision_width`.
        vision_width: EVA width (1408).
        out_dim: LLM width for the output Linear (`llama_proj`); None returns the Q-Former's
            outputs.
        num_query_tokens: Pretrained BLIP-2 queries (32).
        num_extra_query_tokens: New queries, zero-initialised as VideoChat does (64).
        gmhra: VideoChat's temporal layers; with them the input is the backbone's taps.
        freeze_qformer: Freeze the Q-Former and its pretrained queries (VideoChat: yes).
        freeze_ln_vision: Freeze ln_vision (VideoChat trains it: no).
    """

    def __init__(
        self,
        qformer: nn.Module,
        *,
        vision_width: int,
        out_dim: int | None,
        num_query_tokens: int = 32,
        num_extra_query_tokens: int = 64,
        gmhra: TemporalGMHRA | None = None,
        freeze_qformer: bool = True,
        freeze_ln_vision: bool = False,
    ) -> None:
        super().__init__()
        config: Any = qformer.config
        if config.encoder_hidden_size != vision_width:
            raise InvalidArgumentError(
                f"q-former: expected encoder_hidden_size {vision_width}, got {config.encoder_hidden_size}"
            )
        hidden = int(config.hidden_size)
        self.in_dim, self.out_dim = vision_width, out_dim or hidden
        self.gmhra = gmhra
        self.ln_vision = nn.LayerNorm(vision_width)
        self.qformer = qformer
        self.query_tokens = nn.Parameter(torch.empty(1, num_query_tokens, hidden).normal_(std=0.02))
        self.extra_query_tokens = nn.Parameter(torch.zeros(1, num_extra_query_tokens, hidden))
        self.proj = nn.Linear(hidden, out_dim) if out_dim is not None else None
        self.freeze_qformer = freeze_qformer
        if freeze_qformer:
            self.qformer.requires_grad_(False)
            self.query_tokens.requires_grad_(False)
        if freeze_ln_vision:
            self.ln_vision.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> QFormerCompressor:
        super().train(mode)
        if self.freeze_qformer:
            self.qformer.eval()
        return self

    def num_tokens(self, in_tokens: int) -> int:
        """LLM tokens per item, whatever its frames and tokens: the query count."""
        return self.query_tokens.shape[1] + self.extra_query_tokens.shape[1]

    def _visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone output -> (B, L, D) tokens for the Q-Former to read."""
        if self.gmhra is not None:
            return self.gmhra(features)  # (B, T*N + 1, D)
        if features.ndim == 4:
            features = features.flatten(1, 2)  # (B, T*N, D)
        if features.ndim != 3 or features.shape[-1] != self.in_dim:
            raise InvalidArgumentError(
                f"q-former input: expected (batch, tokens, {self.in_dim}) or "
                f"(batch, frames, tokens, {self.in_dim}), got {tuple(features.shape)}"
            )
        return features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """EVA tokens -> (B, Q, out_dim), Q = 32 + extra.

        Without `gmhra`: (B, N, D) for an image or (B, T, N, D) for T frames, all frames read
        together. With `gmhra`: the backbone's taps (B, T, K, N, D) (`forward_taps`).
        """
        features = _trainable_input(features).to(self.query_tokens.dtype)
        tokens = _layer_norm(self.ln_vision, self._visual_tokens(features))  # (B, L, D)
        queries = torch.cat([self.query_tokens, self.extra_query_tokens], dim=1)  # (1, Q, H)
        queries = queries.expand(tokens.shape[0], -1, -1)  # (B, Q, H)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state  # (B, Q, H)
        return self.proj(out) if self.proj is not None else out  # (B, Q, out_dim)


class InstructQFormerPooler(nn.Module):
    """E.T. Chat's frame compressor: instruction-aware Q-Former + attention pooling, 1 token/frame.

    Args:
        qformer: A transformers `InstructBlipQFormerModel` whose `encoder_hidden_size` is
            `vision_width` (E.T. Chat: BERT-base + `[DEC]`, vocabulary 30523).
        vision_width: EVA width (1408).
        out_dim: LLM width (3072 for Phi-3-mini).
        num_query_tokens: Pretrained InstructBLIP queries (32).
        freeze_qformer: Freeze the Q-Former, its queries and ln_vision (E.T. Chat stage 1).
    """

    def __init__(
        self,
        qformer: nn.Module,
        *,
        vision_width: int,
        out_dim: int,
        num_query_tokens: int = 32,
        freeze_qformer: bool = True,
    ) -> None:
        super().__init__()
        config: Any = qformer.config
        if config.encoder_hidden_size != vision_width:
            raise InvalidArgumentError(
                f"instruct q-former: expected encoder_hidden_size {vision_width}, got {config.encoder_hidden_size}"
            )
        hidden = int(config.hidden_size)
        self.in_dim, self.out_dim = vision_width, out_dim
        self.ln_vision = nn.LayerNorm(vision_width)
        self.qformer = qformer
        self.query_tokens = nn.Parameter(torch.empty(1, num_query_tokens, hidden).normal_(std=0.02))
        self.qformer_proj = nn.Linear(hidden, vision_width)
        self.q_proj = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, vision_width))
        self.k_proj = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, vision_width))
        self.v_proj = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, out_dim))
        self.freeze_qformer = freeze_qformer
        if freeze_qformer:
            for part in (self.qformer, self.ln_vision):
                part.requires_grad_(False)
            self.query_tokens.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> InstructQFormerPooler:
        super().train(mode)
        if self.freeze_qformer:
            self.qformer.eval()
        return self

    def num_tokens(self, in_tokens: int) -> int:
        """LLM tokens per frame: one."""
        return 1

    def _per_frame(self, ids: torch.Tensor, frames: int, name: str) -> torch.Tensor:
        """(B, L) shared by every frame or (B, T, L) per frame -> (B*T, L)."""
        if ids.ndim == 2:
            ids = ids[:, None].expand(-1, frames, -1)  # (B, T, L)
        if ids.ndim != 3 or ids.shape[1] != frames:
            raise InvalidArgumentError(
                f"instruct q-former {name}: expected (batch, length) or (batch, {frames}, length), "
                f"got {tuple(ids.shape)}"
            )
        return ids.flatten(0, 1)  # (B*T, L)

    def forward(
        self,
        frames: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch tokens and the instruction -> one LLM token per frame.

        Args:
            frames: (B, T, N, D) raw EVA patch tokens (CLS dropped), or (B, N, D) for an image.
            input_ids: The instruction in the Q-Former's tokenizer (bert-base-uncased + [DEC],
                left-truncated to 256), (B, L) for all frames or (B, T, L) per frame (E.T.
                Chat's "Current time: {t}s. {query}" variant).
            attention_mask: 1 for real tokens, the shape of `input_ids`; None means all ones.

        Returns:
            (B, T, out_dim).
        """
        frames = _trainable_input(frames).to(self.query_tokens.dtype)
        if frames.ndim == 3:
            frames = frames[:, None]  # (B, 1, N, D)
        if frames.ndim != 4 or frames.shape[-1] != self.in_dim:
            raise InvalidArgumentError(
                f"instruct q-former frames: expected (batch, frames, tokens, {self.in_dim}), "
                f"got {tuple(frames.shape)}"
            )
        batch, count = frames.shape[:2]
        patches = frames.flatten(0, 1)  # (B*T, N, D)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        ids = self._per_frame(input_ids, count, "input_ids")  # (B*T, L)
        mask = self._per_frame(mask, count, "attention_mask")  # (B*T, L)
        queries = self.query_tokens.expand(patches.shape[0], -1, -1)  # (B*T, Q, H)
        mask = torch.cat([mask.new_ones(queries.shape[:2]), mask], dim=1)  # (B*T, Q + L)
        out = self.qformer(
            input_ids=ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=_layer_norm(self.ln_vision, patches),
        ).last_hidden_state  # (B*T, Q + L, H)
        query_embeds = self.qformer_proj(out[:, : queries.shape[1]])  # (B*T, Q, D)
        scores = self.q_proj(query_embeds) @ self.k_proj(patches).transpose(1, 2)  # (B*T, Q, N)
        weights = (scores / patches.shape[-1] ** 0.5).softmax(-1)  # (B*T, Q, N)
        pooled = (weights @ patches + query_embeds).mean(1)  # (B*T, D)
        return self.v_proj(pooled).reshape(batch, count, -1)  # (B, T, out_dim)
