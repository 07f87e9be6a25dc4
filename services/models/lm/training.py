"""The model being trained: `MultimodalLM` (connectors + the LLM, optionally with LoRA) plus
the training losses: E.T. Chat's timestamp heads and NExT-GPT's output projectors.

Frozen encoders are not part of it: their features are computed once before training (they
are frozen and deterministic) and arrive in the batch. `TrainingModel.forward` embeds the batch
as serving embeds a prompt (`MultimodalLM.embed_batch`: each item through its modality's
connector, modalities may share one, PandaGPT's `llama_proj`; the outputs written at the items'
spans, items of one span, `media_combine: sum`, summed there) and returns the LM's loss, plus
E.T. Chat's frame-matching loss when it has timestamp heads (`services.models.lm.timestamps`):
each time token's embedding gets the frame it names added (its true frame, teacher-forced), and
the heads learn to match the replies' time tokens. Items of the `bidirectional` modalities
attend bidirectionally within their span (E.T. Chat's stage-3 `bi_attention`): the LM then gets
a 4D mask built per row from the padding mask and that row's spans
(`services.models.lm.attention`), as serving's prefill does.

A trainable connector that no item of this rank's batch uses still takes part through a
zero-weighted dummy forward (`embed_batch(keep_unused=True)`): ZeRO needs every rank to
produce a gradient for every trainable parameter, or the ranks' reduce buckets disagree (a
crash on gloo, a hang on NCCL). The heads likewise add 0 x their parameters when the batch has
nothing to match. The output projectors (NExT-GPT, `services.models.lm.training_outputs`) add
their distance loss to the LM loss, with a zero-weighted dummy forward for a projector the
batch does not use.

What trains is chosen in `services.models.lm.training_params`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from services.models.connectors.connector import Connector
from services.models.lm.attention import (
    bidirectional_spans,
    check_attention_implementation,
    sliding_window,
    span_attention_mask,
)
from services.models.lm.model import FeatureLayout, MediaInBatch, MultimodalLM
from services.models.lm.timestamps import (
    TimestampHeads,
    add_source_frames,
    capture_norm_input,
    frame_at,
    frame_matching_loss,
)
from services.models.lm.training_outputs import OutputHeads, SignalInBatch


@dataclass(frozen=True)
class TimeInBatch:
    """One time token ("<vid>") of a batch.

    Attributes:
        row: Its row.
        position: Its position in the row.
        media: The item (index into the batch's media) whose frames it names.
        frame: The true frame position (fractional; clamped to the item's frames).
        supervised: Whether it is in a reply (its predicting position is matched, as E.T. Chat
            matches the `tgt` times) rather than a question.
    """

    row: int
    position: int
    media: int
    frame: float
    supervised: bool


class TrainingModel(MultimodalLM):
    """The serving model (`MultimodalLM`: connectors by name + a causal LM) with the training
    losses [+ timestamp heads] [+ output projectors].

    Args:
        lm: A Hugging Face causal LM, possibly wrapped by PEFT.
        connectors: Per connector name, encoder features -> LLM embeddings.
        layouts: Per modality, its features' layout and its connector's name.
        heads: E.T. Chat's timestamp heads, trained with the frame-matching loss.
        alpha: The soft-target base of that loss.
        outputs: NExT-GPT's output projectors, trained with the signal distance loss.
        bidirectional: Modalities whose items' spans attend bidirectionally (the preset's
            `attention`; E.T. Chat's stage 3), the rest of every row causal.

    Attributes:
        parts: After each forward, the loss parts worth logging (`part_names`), as floats:
            "lm_loss" and "distance" (the weighted distance term) when there are outputs.
    """

    def __init__(
        self,
        lm: nn.Module,
        connectors: Mapping[str, Connector],
        layouts: Mapping[str, FeatureLayout],
        *,
        heads: TimestampHeads | None = None,
        alpha: float = 2.0,
        outputs: OutputHeads | None = None,
        bidirectional: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(lm, connectors, layouts)
        self.heads = heads
        self.alpha = alpha
        self.outputs = outputs
        check_attention_implementation(lm, bidirectional, preset="being trained")
        self.bidirectional = bidirectional
        self.part_names: tuple[str, ...] = ("lm_loss", "distance") if outputs is not None else ()
        self.parts: dict[str, float] = {}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        media: Sequence[MediaInBatch] = (),
        times: Sequence[TimeInBatch] = (),
        signals: Sequence[SignalInBatch] = (),
    ) -> torch.Tensor:
        """The mean token loss over supervised positions (labels != -100) [+ the matching loss]
        [+ the weighted signal distances]."""
        embeds, projected = self.embed_batch(input_ids, media, keep_unused=True)  # (B, L, D)
        if times:
            embeds = self._add_frames(embeds, media, projected, times)
        attention_mask = self._attention_mask(attention_mask, media, embeds.dtype)
        if self.outputs is not None:
            return self._with_outputs(input_ids, embeds, attention_mask, labels, signals)
        if self.heads is None:
            out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
            return out.loss
        with capture_norm_input(self.lm) as norm_in:
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                labels=labels,
                use_cache=False,
                output_hidden_states=True,
            )
        assert norm_in.value is not None
        return out.loss + self._matching_loss(norm_in.value, out.hidden_states[-2], media, times)

    def _with_outputs(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        signals: Sequence[SignalInBatch],
    ) -> torch.Tensor:
        assert self.outputs is not None
        if self.heads is not None:
            raise ValueError("a preset with both timestamp heads and outputs is not trained yet")
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            use_cache=False,
            output_hidden_states=True,
        )
        total, _ = self.outputs.loss(out.loss, out.hidden_states, embeds, input_ids, signals)
        lm_loss = float(out.loss.detach())
        self.parts = {"lm_loss": lm_loss, "distance": float(total.detach()) - lm_loss}
        return total

    def _attention_mask(
        self, padding: torch.Tensor, media: Sequence[MediaInBatch], dtype: torch.dtype
    ) -> torch.Tensor:
        """The padding mask (B, L), or the 4D mask (B, 1, L, L) where the batch holds items
        whose spans attend bidirectionally."""
        if not self.bidirectional:
            return padding
        spans = [
            bidirectional_spans(
                [m.modality for m in media if m.row == row],
                [(m.start, m.length) for m in media if m.row == row],
                self.bidirectional,
            )
            for row in range(padding.shape[0])
        ]
        if not any(spans):
            return padding
        return span_attention_mask(padding, spans, dtype=dtype, window=sliding_window(self.lm))

    def _add_frames(
        self,
        embeds: torch.Tensor,
        media: Sequence[MediaInBatch],
        projected: Sequence[torch.Tensor],
        times: Sequence[TimeInBatch],
    ) -> torch.Tensor:
        """E.T. Chat: each time token's embedding + the connector output of its (true) frame
        (`timestamps.add_source_frames`, as serving adds a question's times)."""
        frames = []
        for t in times:
            tokens = projected[t.media]  # (F, D): one token per frame
            frames.append(tokens[frame_at(t.frame, tokens.shape[0])])
        rows, positions = [t.row for t in times], [t.position for t in times]
        return add_source_frames(embeds, rows, positions, torch.stack(frames))  # (B, L, D)

    def _matching_loss(
        self,
        norm_in: torch.Tensor,
        hidden_m2: torch.Tensor,
        media: Sequence[MediaInBatch],
        times: Sequence[TimeInBatch],
    ) -> torch.Tensor:
        assert self.heads is not None
        queries, keys, targets = [], [], []
        for row in sorted({t.row for t in times if t.supervised}):
            mine = [t for t in times if t.row == row and t.supervised]
            item = media[mine[-1].media]
            keys.append(self.heads.keys(norm_in[row, item.start : item.start + item.length]))  # (F, h)
            states = hidden_m2[row, [t.position - 1 for t in mine]]  # (N, h): the predicting positions
            queries.append(self.heads.queries(states))
            targets.append(torch.tensor([t.frame for t in mine], device=norm_in.device))
        if not queries:  # nothing to match on this rank: keep the heads in the graph
            return sum((p.sum() for p in self.heads.parameters()), norm_in.new_zeros(())) * 0.0
        return frame_matching_loss(queries, keys, targets, self.alpha)
