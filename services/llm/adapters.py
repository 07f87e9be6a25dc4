"""Adapter bundles: the unit the trainer publishes and the LLM service loads.

A bundle is a folder:

    manifest.json           name, version, preset, base_fingerprint, stage, created, metrics,
                            files: {relative path: sha256}
    connectors.safetensors  "<modality>.<param>" -> tensor
    heads.safetensors       (optional) output heads
    lora/                   (optional) PEFT adapter_config.json + adapter_model.safetensors

Loading verifies every listed file's sha256 and the base-model fingerprint before anything
is used, so a damaged or mismatched bundle is refused as a whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPreconditionError, NotFoundError

MANIFEST = "manifest.json"
CONNECTORS_FILE = "connectors.safetensors"


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
    """A loaded, verified adapter bundle."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    connectors: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def write_bundle(
    path: Path,
    *,
    name: str,
    version: str,
    preset: str,
    base_fingerprint: str,
    connectors: dict[str, dict[str, torch.Tensor]],
    stage: str = "init",
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write a bundle folder; `connectors` maps modality -> that connector's state_dict."""
    path.mkdir(parents=True, exist_ok=True)
    flat = {f"{m}.{k}": v.detach().contiguous().cpu() for m, sd in connectors.items() for k, v in sd.items()}
    save_file(flat, str(path / CONNECTORS_FILE), metadata={"format": "pt"})
    files = {
        str(p.relative_to(path)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MANIFEST
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
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_bundle(path: Path, *, expected_fingerprint: str | None = None) -> Bundle:
    """Read and verify a bundle.

    Raises:
        NotFoundError: The folder or its manifest does not exist.
        FailedPreconditionError: A hash or the base fingerprint does not match.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise NotFoundError(f"adapter bundle {path}: no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise FailedPreconditionError(f"adapter bundle {path}: listed file {rel} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise FailedPreconditionError(
                f"adapter bundle {path}: {rel} sha256 expected {digest[:12]}..., got {actual[:12]}..."
            )
    if expected_fingerprint is not None and manifest.get("base_fingerprint") != expected_fingerprint:
        raise FailedPreconditionError(
            f"adapter bundle {path}: built for base model {str(manifest.get('base_fingerprint'))[:12]}..., "
            f"serving {expected_fingerprint[:12]}..."
        )
    connectors: dict[str, dict[str, torch.Tensor]] = {}
    if (path / CONNECTORS_FILE).is_file():
        for key, tensor in load_file(str(path / CONNECTORS_FILE)).items():
            modality, _, param = key.partition(".")
            connectors.setdefault(modality, {})[param] = tensor
    return Bundle(
        name=str(manifest["name"]),
        version=str(manifest["version"]),
        path=path,
        manifest=manifest,
        connectors=connectors,
    )
