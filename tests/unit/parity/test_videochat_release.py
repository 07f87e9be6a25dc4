"""The VideoChat checkpoint our tests write pickles what the seed's own save does
(tests/fixtures/parity/videochat/release.json, from scripts/parity/videochat_release.py): the same
top-level entries, the config under the seed's EasyDict name, no global beyond the seed's and
nothing the importer's allow-list refuses."""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path

import pytest

from services.common.presets import Preset, load_preset
from services.models.checkpoints.files import EASYDICT_GLOBALS, load_pickle
from tests.helpers import releases

FIXTURE = Path(__file__).parents[2] / "fixtures" / "parity" / "videochat" / "release.json"


def _globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _no_storages(names: set[str]) -> set[str]:
    return {n for n in names if not n.endswith("Storage")}  # dtypes differ: the seed's LLaMA buffers are fp16


@pytest.fixture(scope="module")
def videochat(tmp_path_factory: pytest.TempPathFactory) -> Preset:
    from services.models.tiny import generate

    preset = load_preset("tiny-videochat", cache_dir=tmp_path_factory.mktemp("cache"))
    generate(preset)
    return preset


def test_the_synthetic_checkpoint_pickles_as_the_seeds(videochat: Preset, tmp_path: Path) -> None:
    seed = json.loads(FIXTURE.read_text())
    assert seed["config_class"] in EASYDICT_GLOBALS
    releases.write_videochat(tmp_path / "ckpt_latest.pth", videochat)
    ours = _globals(tmp_path / "ckpt_latest.pth")
    assert _no_storages(ours) == _no_storages(set(seed["globals"]))
    obj = load_pickle(tmp_path / "ckpt_latest.pth")  # the importer's reader takes it whole
    assert sorted(obj) == seed["top_level_keys"] and type(obj["config"]) is dict
