"""Adapter bundles: writing (with LoRA), stamping, and refusing every kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPreconditionError, NotFoundError
from services.models.checkpoints.bundle import base_fingerprint, load_bundle, stamp_manifest, write_bundle
from tests.helpers.bundles import make_bundle, rehash


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


# ---- bundles with LoRA, and every way a bundle can be broken ----------------------------------


@pytest.fixture(scope="module")
def lora_bundle(tiny_preset, tmp_path_factory) -> Path:
    """A tiny-preset bundle with connectors and a PEFT LoRA (read-only: copy it to damage it)."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "lora", tiny_preset, seed=5, lora=True)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def test_a_bundle_with_lora_hashes_and_loads_it(lora_bundle: Path, tiny_preset) -> None:
    manifest = json.loads((lora_bundle / "manifest.json").read_text())
    assert {"connectors.safetensors", "lora/adapter_config.json", "lora/adapter_model.safetensors"} <= set(
        manifest["files"]
    )
    bundle = load_bundle(lora_bundle, expected_fingerprint=base_fingerprint(tiny_preset.llm.checkpoint))
    assert (bundle.lora_dir, bundle.stage, bundle.heads) == (lora_bundle / "lora", "stage3", {})
    assert set(bundle.connectors) == {"image"}


def test_a_lora_folder_from_elsewhere_is_copied_in_and_heads_are_kept(
    tmp_path: Path, lora_bundle: Path
) -> None:
    out = write_bundle(
        tmp_path / "b", name="demo", version="1", preset="tiny", base_fingerprint="base-a",
        connectors={"image": {"w": torch.ones(2)}}, heads={"signal": {"w": torch.zeros(3)}},
        lora_dir=lora_bundle / "lora",
    )  # fmt: skip
    bundle = load_bundle(out)
    assert bundle.lora_dir == out / "lora" and (out / "lora" / "adapter_model.safetensors").is_file()
    assert torch.equal(bundle.heads["signal.w"], torch.zeros(3))


def test_a_peft_subfolder_layout_is_refused_with_a_hint(tmp_path: Path, lora_bundle: Path) -> None:
    shutil.copytree(lora_bundle / "lora", tmp_path / "b" / "lora" / "my_adapter")
    with pytest.raises(
        FailedPreconditionError, match=r"found it under \['my_adapter'\]: save the PEFT adapter"
    ):
        _write(tmp_path / "b")


def test_stamp_manifest_keeps_the_hashes_valid(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    stamp_manifest(tmp_path / "b", version="7", job_id="job-1")
    bundle = load_bundle(tmp_path / "b")
    assert (bundle.ref, bundle.manifest["job_id"]) == ("demo@7", "job-1")
    with pytest.raises(ValueError, match="'files' is computed"):
        stamp_manifest(tmp_path / "b", files={})


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _rehash(path: Path, rel: str) -> Path:
    """`rehash`, returning the folder (the damage lambdas chain steps in a tuple)."""
    rehash(path, rel)
    return path


BROKEN = {
    # name: (damage(bundle folder), message)
    "truncated connectors, hash updated": (
        lambda b: (_truncate(b / "connectors.safetensors"), _rehash(b, "connectors.safetensors")),
        r"connectors\.safetensors is not a valid safetensors file: .*incomplete metadata",
    ),
    "garbage lora weights, hash updated": (
        lambda b: ((b / "lora/adapter_model.safetensors").write_bytes(b"\x00" * 64),
                   _rehash(b, "lora/adapter_model.safetensors")),
        r"lora/adapter_model\.safetensors is not a valid safetensors file",
    ),
    "lora config not JSON, hash updated": (
        lambda b: ((b / "lora/adapter_config.json").write_text("{nope"), _rehash(b, "lora/adapter_config.json")),
        r"lora/adapter_config\.json is not valid JSON",
    ),
    "lora config of another PEFT type": (
        lambda b: ((b / "lora/adapter_config.json").write_text('{"peft_type": "IA3"}'),
                   _rehash(b, "lora/adapter_config.json")),
        r"lora/adapter_config\.json: expected peft_type 'LORA', got 'IA3'",
    ),
    "lora weights changed": (
        lambda b: (b / "lora/adapter_model.safetensors").open("ab").write(b"x"),
        r"lora/adapter_model\.safetensors sha256 expected [0-9a-f]{12}\.\.\., got",
    ),
    "lora weights missing": (
        lambda b: (b / "lora/adapter_model.safetensors").unlink(),
        r"listed file lora/adapter_model\.safetensors is missing",
    ),
    "an unlisted file": (
        lambda b: (b / "lora" / "extra.bin").write_bytes(b"1"),
        r"lora/extra\.bin is not listed in manifest\.json",
    ),
    "manifest not JSON": (
        lambda b: (b / "manifest.json").write_text("{"),
        r"manifest\.json is not valid JSON",
    ),
    "manifest without files": (
        lambda b: _edit_manifest(b, lambda m: m.pop("files")),
        r"manifest\.json lacks the field 'files'",
    ),
    "manifest with a wrong type": (
        lambda b: _edit_manifest(b, lambda m: m.update(version=3)),
        r"manifest\.json: 'version': expected str, got int",
    ),
    "manifest not an object": (
        lambda b: (b / "manifest.json").write_text("[]"),
        r"manifest\.json: expected a JSON object, got list",
    ),
    "a path outside the bundle": (
        lambda b: _edit_manifest(b, lambda m: m["files"].update({"../x": "0" * 64})),
        r"manifest\.json: bad files entry '\.\./x'",
    ),
    "no connectors listed": (
        lambda b: (_edit_manifest(b, lambda m: m["files"].pop("connectors.safetensors")),
                   (b / "connectors.safetensors").unlink()),
        r"manifest\.json does not list connectors\.safetensors",
    ),
}  # fmt: skip


def _edit_manifest(path: Path, edit) -> Path:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("kind", list(BROKEN))
def test_every_kind_of_broken_bundle_is_refused_naming_the_file(
    kind: str, lora_bundle: Path, tmp_path: Path
) -> None:
    damage, message = BROKEN[kind]
    bundle = _copy(lora_bundle, tmp_path)
    load_bundle(bundle)
    damage(bundle)
    with pytest.raises(FailedPreconditionError, match=message) as e:
        load_bundle(bundle)
    assert str(bundle) in e.value.message
