"""The E.T. Chat full folder our tests write (tests/helpers/releases.py, which the importer tests
import and serve) has the keys the seed's own model class saves
(tests/fixtures/parity/etchat/release.json, from scripts/parity/etchat_release.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.common.presets import Preset, load_preset
from tests.helpers import releases

FIXTURE = Path(__file__).parents[2] / "fixtures" / "parity" / "etchat" / "release.json"


def _layout(names: list[str]) -> set[str]:
    """Names with layer and block numbers folded (the fixture builds 1 EVA block, the twin 2 BERT layers)."""
    return {re.sub(r"\.(layers|layer|blocks)\.\d+\.", r".\1.N.", n) for n in names}


@pytest.fixture(scope="module")
def etchat(tmp_path_factory: pytest.TempPathFactory) -> Preset:
    from services.models.tiny import generate

    preset = load_preset("tiny-etchat", cache_dir=tmp_path_factory.mktemp("cache"))
    generate(preset)
    return preset


def test_the_synthetic_full_folder_has_the_seeds_key_layout(etchat: Preset, tmp_path: Path) -> None:
    seed = json.loads(FIXTURE.read_text())
    written = releases.write_etchat_full(tmp_path / "release", etchat, stage=3)
    seed_names, ours = _layout(seed["names"]), _layout(list(written))
    vision = {n for n in seed_names if n.startswith("model.vision_tower.")}
    assert ours - seed_names == set()  # nothing the seed would not save
    assert seed_names - vision <= ours  # everything it saves but the frozen EVA (a sample of it is written)
    assert "model.qformer_bert.bert.embeddings.position_ids" in seed_names  # a persistent buffer, saved
    assert not any(".lora_" in n or n.startswith("base_model.") for n in seed_names)  # LoRA merged
