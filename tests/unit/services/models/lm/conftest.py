"""Fixtures of the model library's LM tests: a tiny random Llama for the training model's
tests (`training_support`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.unit.services.models.lm.training_support import VOCAB, WIDTH


@pytest.fixture(scope="module")
def base_lm() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()  # eval: no dropout, so two forwards agree exactly
