"""Fixtures of the LLM service's unit tests: the tiny model loaded once per session, and the
LLM side (tiny LM, connector bases, Q-Former tokenizer, initial bundle) of the tiny twins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.presets import Preset, load_preset
from services.models.lm.loading import LoadedModel, load_model

SEED = 99
LM_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.1,
}
PHI3_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def write_llm_side(preset: Preset) -> None:
    """Write what the LLM service loads for a tiny twin (not its encoders) from the builders."""
    from services.models.checkpoints.bundle import base_fingerprint, write_bundle
    from services.models.lm.tiny import (
        initial_connectors,
        write_tiny_connector_base,
        write_tiny_lm,
        write_tiny_qformer_tokenizer,
    )
    from services.models.tiny import build_tokenizer

    markers = PHI3_MARKERS if preset.llm.architecture == "phi3" else []
    tokens = [m.placeholder for m in preset.modalities.values()] + list(preset.llm.added_tokens) + markers
    tokenizer = build_tokenizer(list(dict.fromkeys(tokens)))
    llm_dim = write_tiny_lm(
        preset.llm.checkpoint,
        tokenizer,
        architecture=preset.llm.architecture,
        sizes=LM_SIZES,
        max_context=preset.llm.max_context_tokens,
        seed=SEED,
        eos_tokens=["<|end|>"] if markers else [],
    )
    for spec in preset.modalities.values():
        conn = spec.connector
        if conn.base is not None and not conn.base.exists():
            write_tiny_connector_base(conn, spec.encoder, conn.base, seed=SEED + 1)
        if conn.tokenizer is not None and not conn.tokenizer.exists():
            assert conn.qformer is not None
            write_tiny_qformer_tokenizer(conn.tokenizer, conn.qformer.vocab_size)
    write_bundle(
        preset.adapter.path,
        name=preset.adapter.name,
        version=preset.adapter.path.name,
        preset=preset.name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint),
        connectors=initial_connectors(preset, llm_dim, seed=SEED + 2),
    )


@pytest.fixture(scope="session")
def loaded(tiny_preset: Preset) -> LoadedModel:
    """The tiny preset's tokenizer, LM, connectors and adapter bundle (shared; do not mutate)."""
    return load_model(tiny_preset)


@pytest.fixture(scope="session")
def tokenizer(loaded: LoadedModel) -> Any:
    """The tiny byte-level BPE tokenizer."""
    return loaded.tokenizer


@pytest.fixture(scope="session")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Preset]:
    """name -> a tiny twin preset whose LLM side is written (once per name) under a temp cache."""
    cache = tmp_path_factory.mktemp("twins")
    done: dict[str, Preset] = {}

    def get(name: str) -> Preset:
        if name not in done:
            preset = load_preset(name, cache_dir=cache)
            write_llm_side(preset)
            done[name] = preset
        return done[name]

    return get


@pytest.fixture(scope="session")
def twin_model(twin: Callable[[str], Preset]) -> Callable[[str], LoadedModel]:
    """name -> the loaded LLM side of a tiny twin (shared; do not mutate)."""
    models: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in models:
            models[name] = load_model(twin(name))
        return models[name]

    return get


def cache_of(preset: Preset) -> Path:
    return preset.llm.checkpoint.parent
