import json

import pytest
import torch

from services.common.errors import FailedPreconditionError, NotFoundError
from services.llm.adapters import base_fingerprint, load_bundle, write_bundle


def _write(path, fingerprint="base-a"):
    return write_bundle(
        path,
        name="demo",
        version="3",
        preset="tiny",
        base_fingerprint=fingerprint,
        connectors={"image": {"fc1.weight": torch.ones(2, 2), "fc1.bias": torch.zeros(2)}},
    )


def test_write_then_load_round_trips(tmp_path):
    _write(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b", expected_fingerprint="base-a")
    assert bundle.ref == "demo@3"
    assert torch.equal(bundle.connectors["image"]["fc1.weight"], torch.ones(2, 2))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"connectors.safetensors"}


def test_a_changed_file_is_refused(tmp_path):
    _write(tmp_path / "b")
    with (tmp_path / "b" / "connectors.safetensors").open("ab") as f:
        f.write(b"x")
    with pytest.raises(FailedPreconditionError, match=r"connectors\.safetensors sha256 expected"):
        load_bundle(tmp_path / "b")


def test_a_missing_file_and_a_missing_manifest(tmp_path):
    _write(tmp_path / "b")
    (tmp_path / "b" / "connectors.safetensors").unlink()
    with pytest.raises(FailedPreconditionError, match=r"listed file connectors\.safetensors is missing"):
        load_bundle(tmp_path / "b")
    with pytest.raises(NotFoundError, match=r"no manifest\.json"):
        load_bundle(tmp_path / "nothing")


def test_a_bundle_for_another_base_model_is_refused(tmp_path):
    _write(tmp_path / "b", fingerprint="base-a")
    with pytest.raises(FailedPreconditionError, match="built for base model base-a"):
        load_bundle(tmp_path / "b", expected_fingerprint="base-b")


def test_base_fingerprint_changes_with_config(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    first = base_fingerprint(tmp_path)
    assert base_fingerprint(tmp_path) == first
    (tmp_path / "config.json").write_text('{"hidden_size": 65}')
    assert base_fingerprint(tmp_path) != first
