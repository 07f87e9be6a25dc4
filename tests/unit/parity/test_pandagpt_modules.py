"""PandaGPT's modules against the seed's own outputs (tests/fixtures/parity/pandagpt/modules.*).

The fixture (scripts/parity/pandagpt_modules.py) ran PandaGPT's `ImageBindModel` (vision and
audio towers, heads, postprocessors; video and audio clips averaged after normalising, audio
without its logit scale) and `llama_proj` at reduced sizes on random weights. Here the same
weights go the way a user's files go: `imagebind_huge.pth` through the encoder service's
backbone loader (`build_backbone` -> `_checkpoints.load_imagebind`), `pytorch_model.pt` through
the importer's checkpoint reader and PandaGPT key map into the LLM service's connector loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.models.backbones.build import build_backbone
from services.models.checkpoints.importers import LAYOUTS, read_state_dict
from services.models.lm.loading import load_connectors
from tests.helpers.module_parity import assert_matches, imagebind_preset, load_fixture, save_seed_file

FIX = load_fixture("pandagpt")
MODALITIES = ("image", "video", "audio")


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return imagebind_preset("pandagpt", FIX, tmp_path_factory.mktemp("pandagpt"))


@pytest.mark.parametrize("modality", MODALITIES)
def test_imagebind_towers_give_the_seeds_embeddings(preset, modality: str) -> None:  # type: ignore[no-untyped-def]
    spec = preset.modalities[modality].encoder
    backbone = build_backbone(spec, modalities=(modality,), device="cpu")
    ours = backbone.encode(modality, FIX.inputs[modality])  # (B, 1, out)
    assert_matches(f"pandagpt imagebind {modality}", ours[:, 0], FIX.outputs[f"{modality}.embedding"])


def test_llama_proj_from_pixels_gives_the_seeds_llm_inputs(preset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    release = save_seed_file(tmp_path / "pytorch_model.pt", FIX.weights_under("llama_proj."))
    rename = LAYOUTS["pandagpt"].connector["linear"]
    renamed = {rename.target(k): v for k, v in read_state_dict(release).items()}
    (name,) = set(preset.connector_names().values())
    connector = load_connectors(
        preset, {name: renamed}, llm_dim=FIX.meta["sizes"]["llm_hidden"], dtype=torch.float32
    )[name]
    backbone = build_backbone(preset.modalities["image"].encoder, modalities=MODALITIES, device="cpu")
    for modality in MODALITIES:
        features = backbone.encode(modality, FIX.inputs[modality])  # (B, 1, out)
        ours = connector(features.clone())  # (B, 1, hidden)
        assert_matches(f"pandagpt llama_proj {modality}", ours, FIX.outputs[f"{modality}.llama_proj"])
