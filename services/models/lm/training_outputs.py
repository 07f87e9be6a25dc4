"""The output side in training (NExT-GPT stage 2, and stage 3 with outputs): the projectors and
their distance loss, part of `services.models.lm.training.TrainingModel`.

`OutputHeads` holds one `services.models.lm.output_projector.OutputProjector` per output modality of
the preset. For every training sequence that carries a modality's signal tokens and a caption
embedding (`SignalInBatch`), the LM's hidden states at layer `hidden_layer` are cut AT the
signal tokens (training always uses "at", SEEDS_SPEC 2.A "Loss"), fed with the tokens' input
embeddings to that projector, and compared with the caption embedding by `signal_distance`
(mean per-token Euclidean distance). The weighted sum over modalities is added to the LM loss
(`stage2_loss`).

A projector that no sequence of this rank's micro-batch uses still runs once on zeros, its
output added times zero: ZeRO needs every rank to produce every trainable gradient, in the
same order as a real forward would (TRAINING_NOTES 10.3), or the ranks' reduce buckets disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from services.common.presets import Preset
from services.models.lm.output_projector import (
    TRAIN_POSITION,
    OutputProjector,
    gather_signal_input,
    signal_distance,
    signal_token_ids,
    stage2_loss,
)

Stage = str  # "stage2" | "stage3": which loss weight of the preset applies


@dataclass(frozen=True)
class SignalInBatch:
    """One caption embedding of a batch: its row, output modality and target (rows, width)."""

    row: int
    modality: str
    target: torch.Tensor  # (n_out, D_out)


@dataclass(frozen=True)
class SignalSpec:
    """What the loss needs of one output modality: its signal ids, hidden layer and weight,
    and its projector's head name in bundles."""

    ids: tuple[int, ...]
    layer: int
    weight: float
    head: str


def signal_specs(preset: Preset, tokenizer: object, stage: Stage) -> dict[str, SignalSpec]:
    """Per output modality of the preset, its `SignalSpec` (stage 3 uses `stage3_loss_weight`)."""
    out = {}
    for modality, spec in preset.outputs.items():
        weight = spec.loss_weight
        if stage == "stage3" and spec.stage3_loss_weight is not None:
            weight = spec.stage3_loss_weight
        out[str(modality)] = SignalSpec(
            tuple(signal_token_ids(tokenizer, spec.signal_tokens)), spec.hidden_layer, weight, spec.head
        )
    return out


class OutputHeads(nn.Module):
    """The output projectors being trained and their distance loss.

    Args:
        projectors: Per output modality, its projector (`build_projector` / `load_projectors`).
        specs: Per output modality, its signal ids, hidden layer and loss weight.
    """

    def __init__(self, projectors: Mapping[str, OutputProjector], specs: Mapping[str, SignalSpec]) -> None:
        super().__init__()
        missing = sorted(set(projectors) - set(specs))
        if missing:
            raise ValueError(f"output heads: no signal spec for {missing}")
        self.projectors = nn.ModuleDict(dict(projectors))
        self.specs = dict(specs)

    @property
    def head_names(self) -> dict[str, str]:
        """Per output modality, its projector's head name in bundles."""
        return {m: s.head for m, s in self.specs.items()}

    def loss(
        self,
        lm_loss: torch.Tensor,
        hidden_states: Sequence[torch.Tensor],
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        signals: Sequence[SignalInBatch],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`stage2_loss` of the batch, and per modality present its distance (detached).

        Args:
            lm_loss: The LM's loss (a scalar).
            hidden_states: The LM's hidden states per layer, (B, L, D) each.
            embeds: The LM's input embeddings of the batch (B, L, D): at the signal tokens,
                their rows of the embedding table. Taken from the forward rather than by
                calling the table again: under ZeRO-3 a module call gathers its parameters
                collectively, and ranks whose batches hold different modalities would call it
                a different number of times.
            input_ids: The batch (B, L).
            signals: The caption embeddings of the batch's rows that end in signal tokens.

        Raises:
            ValueError: A signal of a modality without a projector.
        """
        unknown = sorted({s.modality for s in signals} - set(self.projectors))
        if unknown:
            raise ValueError(
                f"caption embeddings of {unknown}: no output projector (has {sorted(self.projectors)})"
            )
        distances: dict[str, torch.Tensor] = {}
        dummy = lm_loss.new_zeros(())
        for modality, module in self.projectors.items():
            projector: OutputProjector = module  # type: ignore[assignment]
            spec = self.specs[modality]
            mine = [s for s in signals if s.modality == modality]
            if not mine:
                if any(p.requires_grad for p in projector.parameters()):
                    dummy = dummy + 0.0 * self._dummy(projector, lm_loss).sum()
                continue
            rows = torch.tensor([s.row for s in mine], device=input_ids.device)
            states = hidden_states[spec.layer][rows]  # (K, L, D)
            cut = gather_signal_input(
                states, embeds[rows], input_ids[rows], spec.ids, layer=spec.layer, position=TRAIN_POSITION
            )
            out = projector(cut.hidden, cut.embeds)  # (K, n_out, D_out)
            target = torch.stack([s.target for s in mine]).to(out.device)  # (K, n_out, D_out)
            distances[modality] = signal_distance(out, target)
        total = stage2_loss(lm_loss, distances, {m: s.weight for m, s in self.specs.items()})
        return total + dummy, {m: d.detach() for m, d in distances.items()}

    @staticmethod
    def _dummy(projector: OutputProjector, like: torch.Tensor) -> torch.Tensor:
        x = like.new_zeros((1, projector.num_input_tokens, projector.in_dim))  # (1, N, D)
        return projector(x, x)  # (1, n_out, D_out)
