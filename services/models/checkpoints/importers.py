"""Import the seed systems' releases, as their own save code writes them, for a preset.

The entry points `modalmesh import` calls (`modalmesh/import_cli.py`): `import_checkpoint` turns a
seed system's release into an adapter bundle; `import_qformer_base` turns LAVIS Q-Former weights
into a Q-Former connector's frozen base file; `default_output`, `DEFAULT_PRESETS`, `SYSTEMS`,
`LAYOUTS` and `BASE_LAYOUTS` are what the CLI offers. One import reads the release's files (here:
which files of a folder, a raw DeepSpeed checkpoint refused), sorts its keys by the seed's layout,
checks every tensor against the preset and writes the bundle only when nothing is wrong. The
pieces, each importing only those before it:

- `import_layouts`: per seed, how its save code names its tensors (the file:line table is
  there) and the renames to the preset's connector names; sorting a state dict by a layout;
- `import_checks`: expected shapes from the preset built on the meta device (connector, heads,
  LoRA on the preset's LLM), problems named by the seed's keys, `refuse`;
- `import_write`: staging and publishing the bundle (fingerprinted with the preset's LLM
  folder, its LoRA checked as serving checks it), `ImportReport`;
- `import_full`: E.T. Chat's full model folder (and the adapter form over it), which also writes
  the preset's LLM folder and connector base; `import_checkpoint` hands an `etchat` release
  there when it holds a full folder.

The other names in `__all__` (`compare`, `connector_shapes`, `lora_expected`, `read_state_dict`,
`Rename`) live in those modules and are re-exported for the tests and parity checks that read
releases through this module.

Every pickle is read through `checkpoints.files` (torch's weights-only unpickler plus EasyDict as a
plain dict): a file that needs anything else is refused, naming the global, and never runs. A
raw DeepSpeed checkpoint is refused by name. Every mismatch is reported by the seed's key name,
expected against got, all at once, and nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import Preset
from services.models.checkpoints.bundle import LORA_CONFIG, LORA_WEIGHTS
from services.models.checkpoints.files import read_state_dict, refuse_deepspeed
from services.models.checkpoints.import_checks import (
    add_peft,
    check_parts,
    compare,
    connector_shapes,
    lora_expected,
    lora_problems,
    preset_llm_config,
    refuse,
    unplaced_problems,
)
from services.models.checkpoints.import_full import (
    adapter_base_problems,
    find_full_release,
    import_full_release,
)
from services.models.checkpoints.import_layouts import (
    BASE_LAYOUTS,
    DEFAULT_PRESETS,
    LAYOUTS,
    SYSTEMS,
    Rename,
    SeedLayout,
    pick_connector,
    split_keys,
)
from services.models.checkpoints.import_write import (
    BASE_SOURCE,
    ImportReport,
    default_output,
    preset_lora_config,
    publish_bundle,
)
from services.models.lm.timestamps import HEAD_NAME

# -- reading -------------------------------------------------------------------------------------


def _state_files(layout: SeedLayout, paths: list[Path]) -> tuple[list[Path], Path | None]:
    """The state-dict files to read and the folder holding a PEFT adapter, if any.

    Raises:
        NotFoundError: A path is missing, or a folder holds none of the layout's files.
        InvalidArgumentError: A path is (or holds only) a raw DeepSpeed checkpoint.
    """
    files: list[Path] = []
    peft: Path | None = None
    for p in paths:
        if p.is_dir():
            named = [p / n for n in layout.files if (p / n).is_file()]
            found = named or sorted(p.glob("*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))
            found = [f for f in found if f.name not in (LORA_WEIGHTS, "adapter_model.bin")]
            has_peft = layout.peft_dir and (p / LORA_CONFIG).is_file()
            refuse_deepspeed(p, has_weights=bool(found) or has_peft)
            if layout.files and not named and layout.only is None:
                raise NotFoundError(
                    f"checkpoint folder {p}: expected one of {list(layout.files)}, found none"
                )
            files += found
            folder = p
        elif p.is_file():
            refuse_deepspeed(p)
            files.append(p)
            folder = p.parent
        else:
            raise NotFoundError(f"checkpoint {p}: no such file or folder")
        if layout.peft_dir and (folder / LORA_CONFIG).is_file():
            peft = folder
    if not files and peft is None:
        raise NotFoundError(f"checkpoint {', '.join(map(str, paths))}: no state-dict files found")
    return files, peft


def import_checkpoint(
    system: str,
    paths: list[Path],
    preset: Preset,
    out: Path,
    *,
    version: str | None = None,
    name: str | None = None,
    llm_out: Path | None = None,
    base_out: Path | None = None,
) -> ImportReport:
    """Convert a seed system's release into an adapter bundle at `out` (E.T. Chat's full model
    folder also into the preset's LLM folder and connector base file).

    Args:
        system: A key of LAYOUTS.
        paths: The checkpoint file(s) or folder(s).
        preset: The preset the bundle is for (connector sizes, LoRA settings, LLM folder).
        out: The bundle folder to create (must not exist).
        version: Manifest version; default the folder's name.
        name: Adapter name; default the preset's adapter name.
        llm_out: E.T. Chat full folder: the LLM folder to write (default the preset's
            `llm.checkpoint`); must not exist or be empty.
        base_out: E.T. Chat full folder: the connector base file to write (default the
            connector's `base:`); must not exist.

    Raises:
        NotFoundError: A checkpoint or the preset's LLM config is missing.
        InvalidArgumentError: Unknown system, an unreadable or unsafe file, or keys and shapes
            that do not fit the preset; the message lists each by the seed's name.
    """
    if system not in LAYOUTS:
        raise InvalidArgumentError(f"import: expected a system among {list(LAYOUTS)}, got {system!r}")
    if out.exists():
        raise InvalidArgumentError(
            f"import: the bundle folder {out} already exists; pass another --out or --version"
        )
    if system == "etchat":
        release = find_full_release(paths)
        if release is not None:
            return import_full_release(
                release, paths, preset, out, version=version, name=name, llm_out=llm_out, base_out=base_out
            )
    if llm_out is not None or base_out is not None:
        raise InvalidArgumentError(
            "import: --llm-out and --base-out are written only from an E.T. Chat full model folder "
            f"(config.json and model*.safetensors / pytorch_model*.bin); {system} {', '.join(map(str, paths))} is not one"
        )
    layout = LAYOUTS[system]
    connector = pick_connector(layout, preset, system)
    ctype = next(s.connector.type for m, s in preset.modalities.items() if s.connector_name(m) == connector)
    llm_config = preset_llm_config(preset)
    hidden = int(llm_config.hidden_size)
    files, peft_folder = _state_files(layout, paths)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_state_dict(f, only=layout.only, unwrap=layout.unwrap))
    split = split_keys(layout, layout.connector[ctype], tensors)
    problems = unplaced_problems(split) + check_parts(layout, preset, connector, split, hidden)

    lora_config: dict[str, Any] = {}
    if peft_folder is not None:
        lora_config, more = add_peft(split, peft_folder, preset, llm_config, layout.lora_prefix or "")
        problems += more
    elif split.lora:
        lora_config = preset_lora_config(preset)
        problems += lora_problems(split.lora, lora_config, llm_config, layout.lora_prefix or "")
    notes: list[str] = []
    if system == "etchat":
        more, notes = adapter_base_problems(paths, preset, connector, split)
        problems += more
    refuse(system, paths, preset, problems)
    return publish_bundle(
        out, preset, system, connector=connector, split=split, lora_config=lora_config,
        version=version or out.name, name=name or preset.adapter.name, linears_of=llm_config,
        head_name=HEAD_NAME if layout.timestamp_heads else None, notes=notes,
    )  # fmt: skip


def import_qformer_base(
    system: str, paths: list[Path], preset: Preset, out: Path | None = None
) -> ImportReport:
    """Write a Q-Former connector's frozen base file (`connector.base`) from LAVIS weights:
    BLIP-2 for `qformer` (VideoChat), InstructBLIP for `instruct_qformer` (E.T. Chat).

    Keeps `Qformer.bert.*` (renamed to transformers' names), `query_tokens` and `ln_vision.*`;
    the text-only parts BLIP-2 ships (word/position embeddings, text FFN, `Qformer.cls`) that a
    query-only Q-Former lacks are reported as skipped. The instruction-aware Q-Former keeps them.
    """
    layout = BASE_LAYOUTS[system]
    connector = pick_connector(layout, preset, system)
    spec = next(s.connector for m, s in preset.modalities.items() if s.connector_name(m) == connector)
    target = out or spec.base
    if target is None:
        raise InvalidArgumentError(
            f"import {system}: preset {preset.name}'s connector has no base: path; pass --out FILE"
        )
    (rename,) = layout.connector.values()
    tensors: dict[str, torch.Tensor] = {}
    for f in _state_files(layout, paths)[0]:
        tensors.update(read_state_dict(f, only=layout.only, unwrap=layout.unwrap))
    expected, _base = connector_shapes(preset, connector, preset_llm_config(preset).hidden_size)
    kept: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in tensors.items():
        mapped = rename.target(key)
        if mapped is not None and mapped in expected:
            kept[mapped] = tensor
        elif key.startswith("Qformer.bert.") and (
            ".embeddings.word_" in key
            or ".embeddings.position_" in key
            or ".intermediate." in key
            or ".output." in key
        ):
            skipped.append(key)
        else:
            kept[mapped or key] = tensor
    required = [k for k in expected if k.startswith("qformer.") or k == "query_tokens"]
    problems = compare(
        {k: tuple(v.shape) for k, v in kept.items()}, expected, required, rename.source, f"{connector} base"
    )
    if problems:
        raise InvalidArgumentError(
            f"import {system} {', '.join(map(str, paths))}:\n  " + "\n  ".join(problems)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    source = f"{system}:{','.join(p.name for p in paths)}"
    save_file(
        {k: v.contiguous() for k, v in kept.items()}, str(tmp), metadata={"format": "pt", BASE_SOURCE: source}
    )
    os.replace(tmp, target)
    reason = "text-only parts of the LAVIS Q-Former that the query-only Q-Former lacks"
    return ImportReport(
        output=target, system=system, preset=preset.name, connectors={connector: sorted(kept)},
        skipped={reason: sorted(skipped)} if skipped else {},
    )  # fmt: skip


__all__ = [
    "BASE_LAYOUTS",
    "DEFAULT_PRESETS",
    "LAYOUTS",
    "SYSTEMS",
    "ImportReport",
    "Rename",
    "compare",
    "connector_shapes",
    "default_output",
    "import_checkpoint",
    "import_qformer_base",
    "lora_expected",
    "read_state_dict",
]
