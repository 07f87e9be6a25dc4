"""Writing what an import produced: the adapter bundle, published whole or not at all, and the report.

`stage_bundle` writes a bundle into a new folder: the connector tensors, the heads (grouped by
head name, or all under one name such as E.T. Chat's `timestamps`) and the LoRA as a PEFT
adapter folder (`lora/`), which is checked as the LLM service checks it before anything is
published; `publish_bundle` stages into a temporary sibling of the target and renames it into
place, so a failed import leaves no half-written bundle. The bundle is fingerprinted with the
preset's LLM folder (`bundle.base_fingerprint`). An embedded LoRA (PandaGPT, NExT-GPT: no
adapter_config.json of its own) is recorded with the preset's LoRA settings
(`preset_lora_config`). `ImportReport` says what was written and what was left out, for the
CLI to print; `BASE_SOURCE` names the release in a connector base file's metadata.

It depends on the layouts' `Split` and the checks' `llm_linears`; the importers
(`importers`, `import_full`) call it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.presets import Preset
from services.models.checkpoints.bundle import LORA_CONFIG, LORA_WEIGHTS, base_fingerprint, write_bundle
from services.models.checkpoints.files import name_list
from services.models.checkpoints.import_checks import llm_linears
from services.models.checkpoints.import_layouts import Split
from services.models.lm.lora import check_lora

BASE_SOURCE = "modalmesh_source"  # metadata of a connector base file: "<system>:<release file or folder>"


@dataclass
class ImportReport:
    """What an import wrote and what it left out."""

    output: Path
    system: str
    preset: str
    connectors: dict[str, list[str]] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    lora_tensors: int = 0
    lora_config: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    llm_folder: Path | None = None
    llm_tensors: int = 0
    base_file: Path | None = None
    base_tensors: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"wrote {self.output} ({self.system} -> preset {self.preset})"]
        if self.llm_folder is not None:
            out.append(f"  llm folder {self.llm_folder}: {self.llm_tensors} tensors, config, tokenizer")
        if self.base_file is not None:
            out.append(f"  connector base {self.base_file}: {self.base_tensors} tensors")
        out += [f"  connector {n}: {len(keys)} tensors" for n, keys in self.connectors.items()]
        if self.lora_tensors:
            c = self.lora_config
            out.append(
                f"  lora: {self.lora_tensors} tensors (r {c.get('r')}, alpha {c.get('lora_alpha')}, "
                f"targets {c.get('target_modules')})"
            )
        if self.heads:
            out.append(f"  heads: {name_list(sorted({k.split('.')[0] for k in self.heads}))}")
        out += [f"  skipped {name_list(keys)}: {why}" for why, keys in self.skipped.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out


def preset_lora_config(preset: Preset) -> dict[str, Any]:
    """The adapter_config.json of the preset's LoRA settings (for a LoRA embedded in a release)."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=preset.lora.r,
        lora_alpha=preset.lora.alpha,
        lora_dropout=preset.lora.dropout,
        target_modules=list(preset.lora.targets),
        task_type="CAUSAL_LM",
        bias="none",
    )
    out: dict[str, Any] = json.loads(json.dumps(cfg.to_dict(), default=list))
    out["target_modules"] = list(preset.lora.targets)
    return out


def stage_bundle(
    tmp: Path,
    preset: Preset,
    system: str,
    *,
    connector: str,
    split: Split,
    lora_config: dict[str, Any],
    version: str,
    name: str,
    linears_of: Any,
    head_name: str | None,
    fingerprint: str,
) -> None:
    """Write the bundle into `tmp` (a new folder), checked as the LLM service checks it."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in split.heads.items():
        head, _, param = (head_name, "", key) if head_name else key.partition(".")
        heads.setdefault(head, {})[param] = tensor
    if split.lora:
        lora = tmp / "lora"
        lora.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in split.lora.items()},
            str(lora / LORA_WEIGHTS),
            metadata={"format": "pt"},
        )
        (lora / LORA_CONFIG).write_text(json.dumps(lora_config, indent=2, sort_keys=True) + "\n")
        check_lora(lora, llm_linears(linears_of))  # the serving-time check, before publishing
    write_bundle(
        tmp,
        name=name,
        version=version,
        preset=preset.name,
        base_fingerprint=fingerprint,
        connectors={connector: split.connector},
        heads=heads or None,
        stage=f"import:{system}",
    )


def publish_bundle(
    out: Path,
    preset: Preset,
    system: str,
    *,
    connector: str,
    split: Split,
    lora_config: dict[str, Any],
    version: str,
    name: str,
    linears_of: Any,
    head_name: str | None,
    notes: list[str],
) -> ImportReport:
    """Stage the bundle beside `out` and rename it into place; what was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.import-") as tmp_root:
        tmp = Path(tmp_root) / out.name
        stage_bundle(
            tmp, preset, system, connector=connector, split=split, lora_config=lora_config,
            version=version, name=name, linears_of=linears_of, head_name=head_name,
            fingerprint=base_fingerprint(preset.llm.checkpoint),
        )  # fmt: skip
        os.replace(tmp, out)
    return ImportReport(
        output=out,
        system=system,
        preset=preset.name,
        connectors={connector: sorted(split.connector)},
        heads=sorted(split.heads),
        lora_tensors=len(split.lora),
        lora_config=lora_config,
        skipped=split.skipped,
        notes=notes,
    )


def default_output(preset: Preset, version: str | None) -> Path:
    """The bundle folder an import writes by default: the preset's adapter folder (or a sibling)."""
    return preset.adapter.path if version is None else preset.adapter.path.parent / version
