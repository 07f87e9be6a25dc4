"""PandaGPT's thermal input against the seed's own code (tests/fixtures/parity/pandagpt/thermal.*).

The fixture (scripts/parity/pandagpt_thermal.py) ran PandaGPT's ImageBind `data.py`
(`load_and_transform_thermal_data`) on an RGB false-colour PNG and a grey JPEG, its
`ImageBindModel` thermal tower at reduced width and depth on seeded random weights (the 224 px
input and kernel 16 of imagebind_huge kept), and `llama_proj` as `encode_thermal` applies it.
Here the files go through `prepare_thermal` with the pandagpt preset's ImageBind picture rules,
the weights are written as `imagebind_huge.pth` and read by the backbone loader
(`checkpoints.load_imagebind`, what `build_backbone` runs for imagebind), and `llama_proj` as
`pytorch_model.pt` through the importer's reader and PandaGPT key map into the connector loader.
Tolerance 1e-5 (max abs diff); both agree bit for bit on this machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.common.presets import EncoderSpec
from services.models.backbones.checkpoints import load_imagebind
from services.models.backbones.imagebind import ImageBindBackbone
from services.models.checkpoints.importers import LAYOUTS, read_state_dict
from services.models.lm.loading import load_connectors
from services.models.media.thermal import prepare_thermal
from tests.helpers.module_parity import (
    FIXTURES,
    TOLERANCE,
    ModuleFixture,
    assert_matches,
    preset_from_dict,
    save_seed_file,
    shipped_preset_dict,
)

FOLDER = FIXTURES / "pandagpt"
FILES = ("png", "jpg")  # the batch's order in the fixture
MAX_PIXELS = 64 * 1024 * 1024


def _fixture() -> ModuleFixture:
    from safetensors.torch import load_file

    groups: dict[str, dict[str, torch.Tensor]] = {"weight": {}, "input": {}, "output": {}}
    for key, value in load_file(str(FOLDER / "thermal.safetensors")).items():
        group, _, name = key.partition("/")
        groups[group][name] = value
    meta = json.loads((FOLDER / "thermal.json").read_text())
    return ModuleFixture("pandagpt", groups["weight"], groups["input"], groups["output"], meta)


FIX = _fixture()
SEED_PIXELS = FIX.inputs["thermal.levels"].float() / 255  # (2, 1, 224, 224): the seed's ToTensor output


def _thermal_config() -> dict[str, Any]:
    s = FIX.meta["sizes"]
    return {
        "out_embed_dim": s["out_embed_dim"],
        "thermal_embed_dim": s["thermal_embed_dim"],
        "thermal_num_blocks": s["thermal_num_blocks"],
        "thermal_num_heads": s["thermal_num_heads"],
        "thermal_image_size": s["thermal_image_size"],
        "thermal_kernel": s["thermal_kernel_size"],
    }


@pytest.fixture(scope="module")
def raw_preset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shipped pandagpt preset with its ImageBind encoders reading the fixture's
    `imagebind_huge.pth` (the thermal tower only) at the fixture's sizes."""
    folder = tmp_path_factory.mktemp("pandagpt-thermal")
    checkpoint = save_seed_file(folder / "imagebind_huge.pth", FIX.weights_under("modality_"))
    raw = shipped_preset_dict("pandagpt")
    config = _thermal_config()
    for spec in raw["modalities"].values():
        spec["encoder"] = {
            **spec["encoder"],
            "checkpoint": str(checkpoint),
            "config": config,
            "dim": config["out_embed_dim"],
            "dtype": "float32",
        }
    return raw


@pytest.fixture(scope="module")
def spec(raw_preset: dict[str, Any]) -> EncoderSpec:
    """A thermal encoder spec as the preset's image entry reads ImageBind (crop: round)."""
    image = raw_preset["modalities"]["image"]["encoder"]
    return EncoderSpec(**{k: v for k, v in image.items() if k != "sampling"})


@pytest.fixture(scope="module")
def backbone(spec: EncoderSpec) -> ImageBindBackbone:
    return load_imagebind(spec, ["thermal"])


def _prepare(spec: EncoderSpec, name: str, **rules: Any) -> np.ndarray:
    data = (FOLDER / f"thermal.{name}").read_bytes()
    crop = rules.get("crop", spec.preprocess.crop)
    transparency = spec.preprocess.transparency
    return prepare_thermal(data, max_pixels=MAX_PIXELS, size=224, crop=crop, transparency=transparency)


@pytest.mark.parametrize(("index", "name"), list(enumerate(FILES)))
def test_prepare_thermal_is_imagebinds_transform(spec: EncoderSpec, index: int, name: str) -> None:
    ours = torch.from_numpy(_prepare(spec, name))  # (1, 224, 224)
    assert ours.dtype == torch.float32
    assert_matches(f"pandagpt thermal preprocess {name}", ours, SEED_PIXELS[index])


def test_the_crop_rule_is_the_seeds(spec: EncoderSpec) -> None:
    """The inputs' odd margins tell the crop rules apart: the PNG's 11 (round 6, floor 5) and
    the JPEG's 65 (round half to even 32, ceil 33); each other rule is off by a pixel."""
    assert spec.preprocess.crop == "round"
    for index, name, wrong in ((0, "png", "floor"), (1, "jpg", "ceil")):
        shifted = torch.from_numpy(_prepare(spec, name, crop=wrong))
        assert float((shifted - SEED_PIXELS[index]).abs().max()) > 100 * TOLERANCE, (name, wrong)


def test_thermal_tower_gives_the_seeds_embedding(backbone: ImageBindBackbone) -> None:
    assert backbone.towers == ("thermal",) and backbone.thermal_size == 224
    ours = backbone.encode("thermal", SEED_PIXELS)  # (2, 1, out)
    assert_matches("pandagpt imagebind thermal", ours[:, 0], FIX.outputs["thermal.embedding"])
    # ImageBind's thermal postprocessor scales by 10 after normalising; PandaGPT keeps it.
    torch.testing.assert_close(ours[:, 0].norm(dim=-1), torch.full((2,), 10.0))


def test_thermal_files_to_embeddings(spec: EncoderSpec, backbone: ImageBindBackbone) -> None:
    pixels = torch.from_numpy(np.stack([_prepare(spec, name) for name in FILES]))  # (2, 1, 224, 224)
    ours = backbone.encode("thermal", pixels)[:, 0]  # (2, out)
    assert_matches("pandagpt thermal files -> embedding", ours, FIX.outputs["thermal.embedding"])


def test_llama_proj_of_thermal_gives_the_seeds_llm_inputs(
    raw_preset: dict[str, Any], backbone: ImageBindBackbone, tmp_path: Path
) -> None:
    preset = preset_from_dict(raw_preset, tmp_path)
    release = save_seed_file(tmp_path / "pytorch_model.pt", FIX.weights_under("llama_proj."))
    rename = LAYOUTS["pandagpt"].connector["linear"]
    renamed = {rename.target(k): v for k, v in read_state_dict(release).items()}
    (name,) = set(preset.connector_names().values())  # thermal shares image's llama_proj
    connector = load_connectors(
        preset, {name: renamed}, llm_dim=FIX.meta["sizes"]["llm_hidden"], dtype=torch.float32
    )[name]
    features = backbone.encode("thermal", SEED_PIXELS)  # (2, 1, out)
    ours = connector(features.clone())  # (2, 1, hidden)
    assert_matches("pandagpt llama_proj thermal", ours, FIX.outputs["thermal.llama_proj"])
