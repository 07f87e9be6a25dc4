"""Encoder fixtures: the tiny presets' backbone checkpoints, written once per session with
`write_tiny_backbone` (the encoder tests need no LLM, connector or adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.presets import Preset, load_preset
from services.models.backbones.tiny import write_tiny_backbone

TWINS = ("tiny", "tiny-pandagpt", "tiny-nextgpt", "tiny-videochat", "tiny-etchat", "tiny-eventgpt")
SEED = 1234


def write_backbones(cache: Path, names: tuple[str, ...] = TWINS) -> dict[str, Preset]:
    """Load the presets under `cache` and write each distinct backbone checkpoint once."""
    presets = {name: load_preset(name, cache_dir=cache) for name in names}
    for preset in presets.values():
        for spec in (m.encoder for m in preset.modalities.values()):
            if not spec.checkpoint.exists():
                users = [m for m, s in preset.modalities.items() if s.encoder.checkpoint == spec.checkpoint]
                write_tiny_backbone(spec, spec.checkpoint, seed=SEED, modalities=users)
    return presets


@pytest.fixture(scope="session")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Preset]:
    """The tiny presets by name, their backbone checkpoints written under a temporary cache."""
    return write_backbones(tmp_path_factory.mktemp("encoder-backbones"))


@pytest.fixture(scope="session")
def tiny_preset(twins: dict[str, Preset]) -> Preset:
    """The `tiny` preset with its image backbone written (overrides the suite-wide fixture,
    which also generates the LLM and the adapter)."""
    return twins["tiny"]
