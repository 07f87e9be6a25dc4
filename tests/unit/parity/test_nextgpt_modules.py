"""NExT-GPT's (legacy) modules against the seed's own outputs (tests/fixtures/parity/nextgpt/modules.*).

The fixture (scripts/parity/nextgpt_modules.py) ran NExT-GPT's copy of ImageBind (the same
`models/` code as PandaGPT's but for comments), `llama_proj` and the three output projectors
(`layers.py` TextFcLayer, mode transformer, with the seed's token counts 4 -> 77, 24 -> 77,
8 -> 1 at small widths) on random weights. Here `imagebind_huge.pth` goes through the encoder
service's backbone loader; `pytorch_model.pt` through the importer's reader and NExT-GPT key
map: `llama_proj.*` into the connector loader, `gen_text_hidden_fcs*.0.*` into bundle heads
as the importer writes them (head = first key component) and the LLM service's projector loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.models.backbones.build import build_backbone
from services.models.checkpoints.importers import LAYOUTS, read_state_dict
from services.models.lm.loading import load_connectors
from services.models.lm.output_projector import load_projectors
from tests.helpers.module_parity import (
    assert_matches,
    imagebind_preset,
    load_fixture,
    preset_from_dict,
    save_seed_file,
    shipped_preset_dict,
)

FIX = load_fixture("nextgpt")
SIZES = FIX.meta["sizes"]
MODALITIES = ("image", "video", "audio")


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return imagebind_preset("nextgpt", FIX, tmp_path_factory.mktemp("nextgpt"))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The seed's delta checkpoint (`pytorch_model.pt`) read back by the importer's reader."""
    keys = ("llama_proj.", "gen_text_hidden_fcs")
    state = {k: v for k, v in FIX.weights.items() if k.startswith(keys)}
    path = save_seed_file(tmp_path_factory.mktemp("release") / "pytorch_model.pt", state)
    return read_state_dict(path)


@pytest.mark.parametrize("modality", MODALITIES)
def test_imagebind_towers_give_the_seeds_embeddings(preset, modality: str) -> None:  # type: ignore[no-untyped-def]
    backbone = build_backbone(preset.modalities[modality].encoder, modalities=(modality,), device="cpu")
    ours = backbone.encode(modality, FIX.inputs[modality])  # (B, 1, out)
    assert_matches(f"nextgpt imagebind {modality}", ours[:, 0], FIX.outputs[f"{modality}.embedding"])


def test_llama_proj_from_pixels_gives_the_seeds_llm_inputs(preset, release) -> None:  # type: ignore[no-untyped-def]
    rename = LAYOUTS["nextgpt"].connector["linear"]
    renamed = {rename.target(k): v for k, v in release.items() if k.startswith("llama_proj.")}
    (name,) = set(preset.connector_names().values())
    connector = load_connectors(preset, {name: renamed}, llm_dim=SIZES["llm_hidden"], dtype=torch.float32)[
        name
    ]
    backbone = build_backbone(preset.modalities["image"].encoder, modalities=MODALITIES, device="cpu")
    for modality in MODALITIES:
        ours = connector(backbone.encode(modality, FIX.inputs[modality]).clone())  # (B, 1, hidden)
        assert_matches(f"nextgpt llama_proj {modality}", ours, FIX.outputs[f"{modality}.llama_proj"])


def test_output_projectors_give_the_seeds_conditioning(release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    raw = shipped_preset_dict("nextgpt")
    for modality, out in raw["outputs"].items():
        sizes = SIZES["outputs"][modality]
        assert out["head"] == sizes["head"] and len(out["signal_tokens"]) == sizes["num_input_tokens"]
        out["conditioning"] = [sizes["num_output_tokens"], sizes["out_dim"]]
        out["projector"] = {
            "hidden_dim": SIZES["projector_hidden"]
        }  # heads, layers, ffn: the seed's defaults
    preset = preset_from_dict(raw, tmp_path)
    layout = LAYOUTS["nextgpt"]
    heads = {k: v for k, v in release.items() if k.startswith(layout.heads)}  # the bundle's flat heads
    projectors = load_projectors(preset, heads, llm_dim=SIZES["llm_hidden"], dtype=torch.float32)
    for modality, projector in projectors.items():
        head = preset.outputs[modality].head
        ours = projector(FIX.inputs[f"{head}.hidden"], FIX.inputs[f"{head}.input_embs"])
        assert_matches(f"nextgpt {head}", ours, FIX.outputs[head])
