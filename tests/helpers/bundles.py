"""Adapter bundles for tests: seeded connectors for a preset, optionally with a PEFT LoRA.

    path = make_bundle(tmp / "v2", tiny_preset, seed=2, lora=True)   # connectors + lora/
    rehash(path, "connectors.safetensors")   # after damaging a file: the manifest agrees again

The LoRA is made the way the trainer makes it: `get_peft_model` on the tiny causal LM with
r=4 on q_proj/v_proj, lora_B set to non-zero random values (PEFT starts it at zero, which
would change nothing), saved with `save_pretrained` into the bundle's `lora/`, then
`write_bundle` adds the connectors and hashes everything.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from services.common.presets import Preset
from services.models.checkpoints.bundle import MANIFEST, base_fingerprint, sha256_file, write_bundle
from services.models.connectors.connector import build_connector


def connector_weights(preset: Preset, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per modality, a freshly initialised connector's state dict (seeded)."""
    hidden = json.loads((preset.llm.checkpoint / "config.json").read_text())["hidden_size"]
    torch.manual_seed(seed)
    return {
        m: build_connector(s.connector.type, in_dim=s.encoder.dim, out_dim=hidden).state_dict()
        for m, s in preset.modalities.items()
    }


def save_lora(preset: Preset, out: Path, *, seed: int, scale: float = 0.5) -> Path:
    """A PEFT LoRA (r=4, q_proj/v_proj) of the preset's LM with random non-zero lora_B, saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(preset.llm.checkpoint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # a transformers deprecation PEFT trips
        peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_lm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_lm.save_pretrained(str(out))
    return out


def make_bundle(
    path: Path,
    preset: Preset,
    *,
    seed: int = 0,
    lora: bool = False,
    lora_seed: int | None = None,
    version: str = "0",
    name: str | None = None,
    fingerprint: str | None = None,
    connectors: dict[str, dict[str, torch.Tensor]] | None = None,
    stage: str = "stage3",
) -> Path:
    """Write a bundle for `preset` at `path`: seeded connectors (or `connectors`), LoRA if asked."""
    if lora:
        save_lora(preset, path / "lora", seed=seed if lora_seed is None else lora_seed)
    return write_bundle(
        path,
        name=name or preset.adapter.name,
        version=version,
        preset=preset.name,
        base_fingerprint=fingerprint or base_fingerprint(preset.llm.checkpoint),
        connectors=connectors if connectors is not None else connector_weights(preset, seed),
        stage=stage,
        metrics={"loss": 1.0},
    )


def rehash(path: Path, rel: str) -> None:
    """Make the manifest list the current sha256 of `rel` (as a careless re-export would)."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][rel] = sha256_file(path / rel)
    (path / MANIFEST).write_text(json.dumps(manifest))
