"""The model being trained: connectors + the LLM (optionally with LoRA, timestamp heads and
output projectors), composed.

Frozen encoders are not part of it: their features are computed once before training (they
are frozen and deterministic) and arrive in the batch. `TrainingModel.forward` runs each item
through its modality's connector (modalities may share one, PandaGPT's `llama_proj`), writes
the outputs at the items' spans (items of one span, `media_combine: sum`, are summed there)
and returns the LM's loss, plus E.T. Chat's frame-matching loss when it has timestamp heads
(`services.models.lm.timestamps`): each time token's embedding gets the frame it names added (its
true frame, teacher-forced), and the heads learn to match the replies' time tokens. Items of
the `bidirectional` modalities attend bidirectionally within their span (E.T. Chat's stage-3
`bi_attention`): the LM then gets a 4D mask built per row from the padding mask and that row's
spans (`services.models.lm.attention`), as serving's prefill does.

A trainable connector that no item of this rank's batch uses still takes part through a
zero-weighted dummy forward: ZeRO needs every rank to produce a gradient for every trainable
parameter, or the ranks' reduce buckets disagree (a crash on gloo, a hang on NCCL). The heads
likewise add 0 x their parameters when the batch has nothing to match. The output projectors
(NExT-GPT, `services.trainer._outputs`) add their distance loss to the LM loss, with a
zero-weighted dummy forward for a projector the batch does not use.

Trainable parameters are chosen in one place (`select_trainable`), by name patterns, after
LoRA injection, with a learning rate per group; the result is checked to be non-empty.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.common.presets import LoraSpec
from services.models.connectors.connector import Connector
from services.models.lm.attention import (
    bidirectional_spans,
    check_attention_implementation,
    sliding_window,
    span_attention_mask,
)
from services.models.lm.model import FeatureLayout
from services.models.lm.timestamps import (
    TimestampHeads,
    add_source_frames,
    capture_norm_input,
    frame_at,
    frame_matching_loss,
)
from services.trainer._outputs import OutputHeads, SignalInBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaInBatch:
    """One media item of a batch.

    Attributes:
        row: Its row in the batch.
        start: Where its span starts.
        length: Positions its span holds.
        modality: Its modality.
        features: Encoder features (frames * tokens_per_frame, D_in).
        instruction: The text of the user turn holding it (for text-reading connectors).
    """

    row: int
    start: int
    length: int
    modality: str
    features: torch.Tensor  # (F*T, D_in)
    instruction: str = ""


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


class TrainingModel(nn.Module):
    """Connectors (by name) + a causal LM [+ timestamp heads] [+ output projectors].

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

    lm: Any  # a transformers PreTrainedModel or its PEFT wrapper; typed loosely as HF annotates

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
        super().__init__()
        missing = sorted({m for m, lay in layouts.items() if lay.connector not in connectors})
        if missing:
            raise ValueError(f"no connector for modalities {missing}")
        self.lm = lm
        self.connectors = nn.ModuleDict(dict(connectors))
        self.layouts = dict(layouts)
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
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, L, D)
        projected, dummy = self._project(media, embeds)
        embeds = embeds + dummy
        if media:
            rows, cols, values = [], [], []
            for item, out in zip(media, projected, strict=True):
                if out.shape[0] != item.length:
                    raise ValueError(
                        f"{item.modality} item: span of {item.length}, connector gave {out.shape[0]}"
                    )
                cols.append(torch.arange(item.start, item.start + item.length, device=embeds.device))
                rows.append(torch.full_like(cols[-1], item.row))
                values.append(out)
            index = (torch.cat(rows), torch.cat(cols))  # (sum T_i,) each
            # Zero the spans, then add: items sharing a span (media_combine sum) are summed.
            embeds = embeds.index_put(index, embeds.new_zeros(())).index_put(
                index, torch.cat(values).to(embeds.dtype), accumulate=True
            )
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

    def _project(
        self, media: Sequence[MediaInBatch], embeds: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per item its connector output (T_out, D), and the dummies' zero-weighted sum."""
        out: list[torch.Tensor | None] = [None] * len(media)
        dummy = embeds.new_zeros(())
        for name, module in self.connectors.items():
            connector: Connector = module  # type: ignore[assignment]
            mine = [i for i, m in enumerate(media) if self.layouts[m.modality].connector == name]
            if not mine:
                if any(p.requires_grad for p in connector.parameters()):
                    # Added to the embeddings, not the loss, so that its gradient arrives in the
                    # same backward order as a real item's: ZeRO-3 reduces gradients in the
                    # order they become ready, and ranks must agree on it.
                    dummy = dummy + 0.0 * self._dummy(name, connector, embeds).sum()
                continue
            groups: dict[tuple[int, int], list[int]] = {}
            for i in mine:
                frames = media[i].features.shape[0] // connector.tokens_per_frame
                groups.setdefault((frames, i if connector.reads_text else -1), []).append(i)
            for (frames, single), idx in groups.items():
                x = torch.stack([media[i].features for i in idx]).to(embeds.dtype)  # (N, F*T, D_in)
                x = x.view(len(idx), frames, connector.tokens_per_frame, -1)  # (N, F, T, D_in)
                instruction = (
                    connector.encode_instructions([media[single].instruction]) if single >= 0 else None
                )
                projected = connector(x, instruction)  # (N, T_out, D)
                for j, i in enumerate(idx):
                    out[i] = projected[j]
        return [t for t in out if t is not None], dummy

    def _dummy(self, name: str, connector: Connector, embeds: torch.Tensor) -> torch.Tensor:
        layout = next(lay for lay in self.layouts.values() if lay.connector == name)
        x = embeds.new_zeros((1, layout.frames or 1, layout.tokens_per_frame, layout.dim))  # (1, F, T, D)
        instruction = connector.encode_instructions([""]) if connector.reads_text else None
        return connector(x, instruction)

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


def lora_target_names(lm: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full names of the LM's Linear modules whose last name component is in `suffixes`.

    Full paths (not bare suffixes) so that PEFT can never match a module elsewhere.

    Raises:
        ValueError: A suffix matches no Linear module of the LM.
    """
    names = [
        n for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes
    ]
    found = {n.rsplit(".", 1)[-1] for n in names}
    missing = sorted(set(suffixes) - found)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {missing} match no Linear module of the LLM; it has {linear}")
    return names


def add_lora(lm: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap the LM with a fresh PEFT LoRA adapter ("default") on the spec's targets."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_target_names(lm, spec.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


@dataclass(frozen=True)
class ParamGroup:
    """Parameters matching any of `patterns` (fnmatch on full names) train at `lr`."""

    name: str
    patterns: tuple[str, ...]
    lr: float


def select_trainable(
    model: nn.Module, groups: Sequence[ParamGroup], *, weight_decay: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Freeze everything, then unfreeze the parameters each group's patterns select.

    Returns:
        Optimizer parameter groups, and per group the number of parameters (elements).

    Raises:
        ValueError: A group selects nothing (the NExT-GPT stage-3 bug: training nothing), or a
            parameter is selected by two groups.
    """
    model.requires_grad_(False)
    chosen: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for group in groups:
        params = []
        for name, p in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in group.patterns):
                if name in chosen:
                    raise ValueError(
                        f"parameter {name} is selected by groups {chosen[name]} and {group.name}"
                    )
                chosen[name] = group.name
                p.requires_grad_(True)
                params.append(p)
        if not params:
            raise ValueError(
                f"trainable group {group.name!r}: patterns {list(group.patterns)} select no parameter"
            )
        counts[group.name] = sum(p.numel() for p in params)
        out.append({"params": params, "lr": group.lr, "weight_decay": weight_decay, "name": group.name})
    logger.info(
        "trainable: %s of %s parameters (%s)",
        sum(counts.values()),
        sum(p.numel() for p in model.parameters()),
        ", ".join(f"{k}={v}" for k, v in counts.items()),
    )
    return out, counts
