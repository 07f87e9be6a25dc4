"""Fixtures of the LLM service's unit tests: the tiny model loaded once per session."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.presets import Preset
from services.llm.loading import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded(tiny_preset: Preset) -> LoadedModel:
    """The tiny preset's tokenizer, LM, connectors and adapter bundle (shared; do not mutate)."""
    return load_model(tiny_preset)


@pytest.fixture(scope="session")
def tokenizer(loaded: LoadedModel) -> Any:
    """The tiny byte-level BPE tokenizer."""
    return loaded.tokenizer
