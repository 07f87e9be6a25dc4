"""Adapter bundles: the unit the trainer publishes and the LLM service loads.

A bundle is a folder:

    manifest.json           name, version, preset, base_fingerprint, stage, created, metrics,
                            files: {relative path: sha256} (every file but the manifest)
    connectors.safetensors  "<modality>.<param>" -> tensor
    heads.safetensors       (optional) output heads, "<head>.<param>" -> tensor
    lora/                   (optional) PEFT format: adapter_config.json + adapter_model.safetensors,
                            saved relative to the causal LM (`MultimodalLM.lm`), so that PEFT
                            and vLLM can load it onto the bare base model

How the trainer writes one: save the LoRA with PEFT first, into the bundle folder, under the
adapter name "default" (PEFT writes other names into a sub-folder):

    peft_lm.save_pretrained(bundle_dir / "lora")        # peft_lm = get_peft_model(model.lm, cfg)
    write_bundle(bundle_dir, name=..., version="0", preset=..., base_fingerprint=...,
                 connectors=..., stage="stage3", metrics={...})

`write_bundle` adds the safetensors files and then hashes every file under the folder,
`lora/*` included (a LoRA folder elsewhere can be passed as `lora_dir` and is copied in). The
version is stamped by the publisher (`stamp_manifest`); the manifest is not in `files`.

Loading verifies the manifest, every listed file's sha256 (and that no file is unlisted), the
base-model fingerprint, and that each safetensors file and the LoRA config parse, before
anything is used: every way a bundle can be broken is a FailedPreconditionError naming the
file and what is wrong, so a damaged or mismatched bundle is refused as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPreconditionError, NotFoundError

MANIFEST = "manifest.json"
CONNECTORS_FILE = "connectors.safetensors"
HEADS_FILE = "heads.safetensors"
LORA_DIR = "lora"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
REQUIRED_FIELDS: dict[str, type] = {
    "name": str,
    "version": str,
    "preset": str,
    "base_fingerprint": str,
    "stage": str,
    "files": dict,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_fingerprint(llm_dir: Path) -> str:
    """Identity of a base LLM checkpoint: sha256 over its config, tokenizer and weight file names/sizes.

    Hashing multi-GB weights at every start would be slow; names and sizes together with the
    full config and tokenizer tell checkpoints apart in practice.
    """
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        p = llm_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    for p in sorted(llm_dir.glob("*.safetensors")) + sorted(llm_dir.glob("*.bin")):
        h.update(f"{p.name}:{p.stat().st_size}\0".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified adapter bundle.

    Attributes:
        name: The adapter's name (the registry's key), e.g. "tiny".
        version: Its version, e.g. "3".
        path: The bundle folder.
        manifest: The parsed manifest.
        connectors: Per modality, the connector's state dict.
        heads: Flat "<head>.<param>" -> tensor from heads.safetensors ({} if absent).
        lora_dir: The PEFT folder inside the bundle, or None when the bundle has no LoRA.
        stage: The training stage that produced it ("init", "stage1", ...).
    """

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    connectors: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    heads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    lora_dir: Path | None = None
    stage: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def created(self) -> int:
        return int(self.manifest.get("created") or 0)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json aside, fsync it, then rename it into place."""
    tmp = path / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def _check_lora_layout(lora: Path) -> None:
    missing = [n for n in (LORA_CONFIG, LORA_WEIGHTS) if not (lora / n).is_file()]
    if missing:
        nested = sorted(p.parent.name for p in lora.glob(f"*/{LORA_CONFIG}"))
        hint = f" (found it under {nested}: save the PEFT adapter under the name 'default')" if nested else ""
        raise FailedPreconditionError(f"adapter bundle {lora.parent}: {LORA_DIR}/ lacks {missing}{hint}")


def write_bundle(
    path: Path,
    *,
    name: str,
    version: str,
    preset: str,
    base_fingerprint: str,
    connectors: dict[str, dict[str, torch.Tensor]],
    heads: dict[str, dict[str, torch.Tensor]] | None = None,
    lora_dir: Path | None = None,
    stage: str = "init",
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write a bundle folder and its manifest, hashing every file in it.

    Args:
        path: The bundle folder (created; may already hold `lora/` written by PEFT).
        name: Adapter name.
        version: Version; the publisher re-stamps it with the one it allocates.
        preset: The preset it was trained for.
        base_fingerprint: `base_fingerprint(llm_dir)` of the base LLM it was trained on.
        connectors: Per modality, that connector's state dict.
        heads: Per head, its state dict (optional).
        lora_dir: A PEFT adapter folder to copy into `path/lora` (optional; not needed when
            PEFT already saved into `path/lora`).
        stage: The training stage.
        metrics: Final metrics of the run.

    Raises:
        FailedPreconditionError: `lora/` lacks adapter_config.json or adapter_model.safetensors.
    """
    path.mkdir(parents=True, exist_ok=True)
    lora = path / LORA_DIR
    if lora_dir is not None and lora_dir.resolve() != lora.resolve():
        shutil.copytree(lora_dir, lora, dirs_exist_ok=True)
    if lora.exists():
        _check_lora_layout(lora)
    flat = {f"{m}.{k}": v.detach().contiguous().cpu() for m, sd in connectors.items() for k, v in sd.items()}
    save_file(flat, str(path / CONNECTORS_FILE), metadata={"format": "pt"})
    if heads:
        flat = {f"{h}.{k}": v.detach().contiguous().cpu() for h, sd in heads.items() for k, v in sd.items()}
        save_file(flat, str(path / HEADS_FILE), metadata={"format": "pt"})
    files = {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")
    }
    manifest = {
        "name": name,
        "version": version,
        "preset": preset,
        "base_fingerprint": base_fingerprint,
        "stage": stage,
        "created": int(time.time()),
        "metrics": metrics or {},
        "files": files,
    }
    _write_manifest(path, manifest)
    return path


def stamp_manifest(path: Path, **fields: Any) -> dict[str, Any]:
    """Set manifest fields (e.g. version, job_id) in place, atomically; returns the new manifest.

    The manifest is not in `files`, so the hashes stay valid. `files` itself cannot be stamped.

    Raises:
        FailedPreconditionError: The manifest is unreadable.
        ValueError: `files` was passed.
    """
    if "files" in fields:
        raise ValueError("stamp_manifest: 'files' is computed by write_bundle, not stamped")
    manifest = read_manifest(path)
    manifest.update(fields)
    _write_manifest(path, manifest)
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check a bundle's manifest.json (fields and their types only; no hashing).

    Raises:
        NotFoundError: The folder or its manifest does not exist.
        FailedPreconditionError: The manifest is not JSON, or a field is missing or of the wrong type.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise NotFoundError(f"adapter bundle {path}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FailedPreconditionError(f"adapter bundle {path}: {MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise FailedPreconditionError(
            f"adapter bundle {path}: {MANIFEST}: expected a JSON object, got {type(manifest).__name__}"
        )
    for key, typ in REQUIRED_FIELDS.items():
        if key not in manifest:
            raise FailedPreconditionError(f"adapter bundle {path}: {MANIFEST} lacks the field {key!r}")
        if not isinstance(manifest[key], typ):
            raise FailedPreconditionError(
                f"adapter bundle {path}: {MANIFEST}: {key!r}: expected {typ.__name__}, "
                f"got {type(manifest[key]).__name__}"
            )
    return manifest


def _verify_files(path: Path, files: dict[str, Any]) -> None:
    root = path.resolve()
    for rel, digest in files.items():
        f = path / rel
        if not isinstance(digest, str) or not f.resolve().is_relative_to(root):
            raise FailedPreconditionError(f"adapter bundle {path}: {MANIFEST}: bad files entry {rel!r}")
        if not f.is_file():
            raise FailedPreconditionError(f"adapter bundle {path}: listed file {rel} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise FailedPreconditionError(
                f"adapter bundle {path}: {rel} sha256 expected {digest[:12]}..., got {actual[:12]}..."
            )
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and p.name != MANIFEST and rel not in files:
            raise FailedPreconditionError(f"adapter bundle {path}: {rel} is not listed in {MANIFEST}")
    if CONNECTORS_FILE not in files:
        raise FailedPreconditionError(f"adapter bundle {path}: {MANIFEST} does not list {CONNECTORS_FILE}")


def _load_tensors(path: Path, rel: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / rel))
    except (SafetensorError, OSError, ValueError) as e:
        raise FailedPreconditionError(
            f"adapter bundle {path}: {rel} is not a valid safetensors file: {e}"
        ) from None


def _check_lora(path: Path) -> Path | None:
    lora = path / LORA_DIR
    if not lora.exists():
        return None
    _check_lora_layout(lora)
    rel = f"{LORA_DIR}/{LORA_CONFIG}"
    try:
        config = json.loads((lora / LORA_CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FailedPreconditionError(f"adapter bundle {path}: {rel} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise FailedPreconditionError(f"adapter bundle {path}: {rel}: expected peft_type 'LORA', got {got!r}")
    try:
        with safe_open(str(lora / LORA_WEIGHTS), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise FailedPreconditionError(
            f"adapter bundle {path}: {LORA_DIR}/{LORA_WEIGHTS} is not a valid safetensors file: {e}"
        ) from None
    return lora


def load_bundle(path: Path, *, expected_fingerprint: str | None = None) -> Bundle:
    """Read and verify a bundle.

    Raises:
        NotFoundError: The folder or its manifest does not exist.
        FailedPreconditionError: The manifest is broken, a file is missing, unlisted or has
            another sha256, the base fingerprint does not match, or a safetensors file or the
            LoRA config does not parse; the message names the file.
    """
    manifest = read_manifest(path)
    _verify_files(path, manifest["files"])
    if expected_fingerprint is not None and manifest["base_fingerprint"] != expected_fingerprint:
        raise FailedPreconditionError(
            f"adapter bundle {path}: built for base model {manifest['base_fingerprint'][:12]}..., "
            f"serving {expected_fingerprint[:12]}..."
        )
    connectors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _load_tensors(path, CONNECTORS_FILE).items():
        modality, _, param = key.partition(".")
        connectors.setdefault(modality, {})[param] = tensor
    heads = _load_tensors(path, HEADS_FILE) if HEADS_FILE in manifest["files"] else {}
    return Bundle(
        name=manifest["name"],
        version=manifest["version"],
        path=path,
        manifest=manifest,
        connectors=connectors,
        heads=heads,
        lora_dir=_check_lora(path),
        stage=manifest["stage"],
    )


def check_state_dict(
    what: str,
    expected: Mapping[str, torch.Tensor],
    got: Mapping[str, torch.Tensor],
    *,
    prefix: str = "",
    shape_note: str = "",
) -> None:
    """Refuse a bundle part whose keys or shapes differ from the module it is loaded into.

    Args:
        what: Names the part in the message, e.g. "image connector", "timestamps heads".
        expected: The module's state dict.
        got: The part's tensors, keys relative to the module.
        prefix: Written before each key in messages (the key as the bundle spells it); without
            one a missing or unexpected key is quoted.
        shape_note: Added after an expected shape, e.g. " (LLM hidden size 16)".

    Raises:
        FailedPreconditionError: Naming the first missing key, unexpected key or wrong shape.
    """

    def name(key: str) -> str:
        return f"{prefix}{key}" if prefix else repr(key)

    missing = sorted(set(expected) - set(got))
    if missing:
        raise FailedPreconditionError(f"adapter bundle: {what}: missing key {name(missing[0])}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise FailedPreconditionError(f"adapter bundle: {what}: unexpected key {name(unexpected[0])}")
    for key, tensor in expected.items():
        if tuple(got[key].shape) != tuple(tensor.shape):
            raise FailedPreconditionError(
                f"adapter bundle: {what}: {prefix}{key}: expected shape {tuple(tensor.shape)}{shape_note}, "
                f"got {tuple(got[key].shape)}"
            )
