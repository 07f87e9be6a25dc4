"""Decoder fixtures: the three tiny pipelines, written and loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.models.decoders.pipelines import Decoder, load_decoder
from services.models.decoders.tiny import write_tiny_decoder


@pytest.fixture(scope="session")
def decoder_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-decoders")
    return {kind: write_tiny_decoder(kind, root / kind) for kind in ("image", "audio", "video")}


@pytest.fixture(scope="session")
def decoders(decoder_folders: dict[str, Path]) -> dict[str, Decoder]:
    return {kind: load_decoder(kind, folder) for kind, folder in decoder_folders.items()}
