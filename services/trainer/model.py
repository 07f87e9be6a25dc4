"""The model being trained: connectors + the LLM (optionally with LoRA), composed.

Frozen encoders are not part of it: their features are computed once before training (they
are frozen and deterministic) and arrive in the batch. `TrainingModel.forward` writes each
item's projected features at its span and returns the LM's loss. A trainable connector whose
modality is absent from this rank's batch still takes part through a zero-weighted dummy
forward: ZeRO needs every rank to produce a gradient for every trainable parameter, or the
ranks' reduce buckets disagree (a crash on gloo, a hang on NCCL).

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
from services.llm.connectors import Connector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaInBatch:
    """One media item of a batch: its row, where its span starts, and its encoder features."""

    row: int
    start: int
    modality: str
    features: torch.Tensor  # (T_in, D_in)


class TrainingModel(nn.Module):
    """Connectors per modality + a causal LM.

    Args:
        lm: A Hugging Face causal LM, possibly wrapped by PEFT.
        connectors: Per modality, encoder features -> LLM embeddings.
        feature_shapes: Per modality, the (tokens, dim) of the encoder features (for the dummy).
    """

    lm: Any  # a transformers PreTrainedModel or its PEFT wrapper; typed loosely as HF annotates

    def __init__(
        self,
        lm: nn.Module,
        connectors: Mapping[str, Connector],
        feature_shapes: Mapping[str, tuple[int, int]],
    ) -> None:
        super().__init__()
        self.lm = lm
        self.connectors = nn.ModuleDict(dict(connectors))
        self.feature_shapes = dict(feature_shapes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        media: Sequence[MediaInBatch] = (),
    ) -> torch.Tensor:
        """The mean token loss over supervised positions (labels != -100)."""
        embed = self.lm.get_input_embeddings()
        embeds = embed(input_ids)  # (B, L, D)
        for modality, connector in self.connectors.items():
            items = [m for m in media if m.modality == modality]
            trainable = any(p.requires_grad for p in connector.parameters())
            if not items:
                if trainable:  # dummy forward: a zero-weighted gradient path on every rank
                    tokens, dim = self.feature_shapes[modality]
                    dummy = connector(embeds.new_zeros((1, tokens, dim)))  # (1, T, D)
                    # Added to the embeddings, not the loss, so that its gradient arrives in the
                    # same backward order as a real item's: ZeRO-3 reduces gradients in the order
                    # they become ready, and ranks must agree on it.
                    embeds = embeds + 0.0 * dummy.sum()
                continue
            feats = torch.stack([m.features for m in items]).to(embeds.dtype)  # (N, T_in, D_in)
            projected = connector(feats)  # (N, T, D)
            n, t, _ = projected.shape
            rows = torch.tensor([m.row for m in items], device=embeds.device).repeat_interleave(t)  # (N*T,)
            cols = (
                torch.tensor([m.start for m in items], device=embeds.device)[:, None]
                + torch.arange(t, device=embeds.device)[None, :]
            ).reshape(-1)  # (N*T,)
            embeds = embeds.index_put((rows, cols), projected.reshape(n * t, -1))
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
        return out.loss


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
