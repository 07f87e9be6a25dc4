"""What the training model's tests share: a training model with mlp2x_gelu connectors over
the tiny Llama of `conftest.base_lm`, and padded batches made as the trainer makes them
(`collate`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from services.models.connectors.connector import build_connector
from services.models.lm.model import FeatureLayout
from services.models.lm.training import TrainingModel
from services.trainer.loop import MediaInExample, TrainExample, collate

CPU = torch.device("cpu")
TOKENS, FEAT_DIM, WIDTH, VOCAB = 4, 16, 32, 64


def make_model(
    base_lm: nn.Module,
    modalities: tuple[str, ...] = ("image",),
    seed: int = 1,
    bidirectional: frozenset[str] = frozenset(),
) -> TrainingModel:
    torch.manual_seed(seed)
    connectors = {m: build_connector("mlp2x_gelu", in_dim=FEAT_DIM, out_dim=WIDTH) for m in modalities}
    layouts = {m: FeatureLayout(m, tokens_per_frame=1, dim=FEAT_DIM, frames=TOKENS) for m in modalities}
    return TrainingModel(copy.deepcopy(base_lm), connectors, layouts, bidirectional=bidirectional)


def example(length: int = 12, media: list[tuple[int, str, torch.Tensor]] | None = None) -> TrainExample:
    ids = [(7 * i + 3) % VOCAB for i in range(length)]
    labels = [-100] * 6 + ids[6:]  # the prompt (with its media span) is not supervised
    items = [MediaInExample(start, TOKENS, m, f) for start, m, f in media or []]
    return TrainExample(input_ids=ids, labels=labels, media=items)


def batch(*examples: TrainExample) -> dict[str, Any]:
    return collate(examples, pad_id=0, device=CPU)


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]
