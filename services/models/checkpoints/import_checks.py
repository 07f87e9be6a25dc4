"""Checks of an import's tensors against what the preset builds, before anything is written.

The expected shapes come from the preset itself, built on the meta device (no weights, no
memory): its connector (`connector_shapes`, with the keys of its frozen base part, which a
release may leave out), E.T. Chat's timestamp heads, NExT-GPT's output projectors per
`outputs`, and the LoRA that the adapter's rank and targets put on the preset's LLM (its
linear layers from the LLM folder's config, `preset_llm_config`). `compare` turns got against
expected into problems named by the seed's own key (missing, unexpected, misshapen, lists
capped at `SHOWN`); the check functions only collect problems, and `refuse` raises them all at
once as one `InvalidArgumentError`, so a release that does not fit is reported whole and
nothing is written.

It depends on the key layouts (`import_layouts`) only; the importers (`importers`,
`import_full`) and the bundle writer (`import_write`) call it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import Preset
from services.models.checkpoints.bundle import LORA_CONFIG, LORA_WEIGHTS
from services.models.checkpoints.files import name_list, read_state_dict
from services.models.checkpoints.import_layouts import SeedLayout, Split
from services.models.lm.lora import linear_shapes
from services.models.lm.seed_configs import read_llm_config

SHOWN = 8  # names listed per kind of problem
PEFT_PREFIX = "base_model.model."


# -- expected shapes -----------------------------------------------------------------------------


def preset_llm_config(preset: Preset) -> Any:
    """The transformers config of the preset's LLM folder (a seed's model_type mapped)."""
    folder = preset.llm.checkpoint
    if not (folder / "config.json").is_file():
        raise NotFoundError(
            f"preset {preset.name}: its LLM folder {folder} has no config.json; the bundle is built for "
            "that base model (its width and fingerprint), so it must be on disk"
        )
    return read_llm_config(folder, error=InvalidArgumentError).config


def connector_shapes(preset: Preset, name: str, llm_dim: int) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The preset's connector `name` built on the meta device: parameter shapes, and the keys
    of its frozen base part (from `connector.base`, so optional in a bundle)."""
    from services.models.connectors.connector import connector_from_spec

    spec = next(s for m, s in preset.modalities.items() if s.connector_name(m) == name)
    with torch.device("meta"):
        # instruct_qformer: the tokenizer only tokenizes at run time; an empty stand-in avoids
        # reading `connector.tokenizer` to learn shapes.
        module = connector_from_spec(spec.connector, spec.encoder, llm_dim, tokenizer=())
    state = module.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}, {k for k in state if module.is_base_key(k)}


def llm_linears(config: Any) -> dict[str, tuple[int, int]]:
    """Linear layer name -> (in, out) features of the LLM `config` describes, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return linear_shapes(lm)


def _head_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """E.T. Chat's frm_head / vid_head as the LLM service builds them."""
    from services.models.lm.timestamps import TimestampHeads

    with torch.device("meta"):
        heads = TimestampHeads(hidden)
    return {k: tuple(v.shape) for k, v in heads.state_dict().items()}


# -- checking ------------------------------------------------------------------------------------


def compare(
    got: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    required: Iterable[str],
    seed_name: Any,
    what: str,
) -> list[str]:
    """Problems of `got` against `expected`, named by the seed's key (`seed_name(key)`)."""
    problems = []
    missing = sorted(seed_name(k) for k in required if k not in got)
    if missing:
        problems.append(f"{what}: missing {len(missing)} key(s) the target needs: {name_list(missing)}")
    extra = sorted(seed_name(k) for k in got if k not in expected)
    if extra:
        problems.append(f"{what}: {len(extra)} unexpected key(s): {name_list(extra)}")
    wrong = [
        f"{seed_name(k)}: expected {expected[k]}, got {shape}"
        for k, shape in sorted(got.items())
        if k in expected and shape != expected[k]
    ]
    if wrong:
        problems.append(
            f"{what}: {len(wrong)} shape mismatch(es): {'; '.join(wrong[:SHOWN])}"
            + (f"; ... and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else "")
        )
    return problems


def _check_output_heads(split: Split, preset: Preset, hidden: int) -> list[str]:
    """Problems of NExT-GPT's output projector heads against the preset's `outputs`.

    Each head the checkpoint holds must be one of the preset's outputs and hold exactly the
    tensors `build_projector` makes for it (so the conditioning rows and width, the LLM width
    and the projector's hidden sizes and layer counts all fit). The signal-token count has no
    tensor of its own (the projector takes any N); serving checks it per request. A preset
    without outputs keeps none of them (reported as skipped).
    """
    from services.models.lm.output_projector import SEED_SLOT, build_projector

    present = sorted({k.split(".", 1)[0] for k in split.heads})
    if not present:
        return []
    if not preset.outputs:
        split.skipped.setdefault("the preset has no outputs", []).extend(sorted(split.heads))
        split.heads = {}
        return []
    by_head = {spec.head: (str(m), spec) for m, spec in preset.outputs.items()}
    problems = []
    unknown = [h for h in present if h not in by_head]
    if unknown:
        names = ", ".join(f"{m}: {h}" for h, (m, _) in by_head.items())
        problems.append(f"output projectors: heads {unknown} are none of the preset's outputs ({names})")
    for head in (h for h in present if h in by_head):
        modality, spec = by_head[head]
        with torch.device("meta"):
            projector = build_projector(spec, hidden)
        expected = {f"{head}.{SEED_SLOT}.{k}": tuple(v.shape) for k, v in projector.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in split.heads.items() if k.startswith(f"{head}.")}
        what = (
            f"output projector {modality} ({head}: {len(spec.signal_tokens)} signal tokens x {hidden} -> "
            f"conditioning {tuple(spec.conditioning)}, hidden {spec.projector.hidden_dim})"
        )
        problems += compare(got, expected, expected, str, what)
    return problems


def lora_expected(
    linears: dict[str, tuple[int, int]], targets: list[str], r: int
) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of LoRA with rank r on every linear layer whose name ends in a target."""
    out: dict[str, tuple[int, ...]] = {}
    for name, (in_f, out_f) in linears.items():
        if name.rsplit(".", 1)[-1] in targets:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, in_f)
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out_f, r)
    return out


# -- LoRA ----------------------------------------------------------------------------------------


def _peft_tensors(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        config = json.loads((folder / LORA_CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(
            f"{folder / LORA_CONFIG}: expected JSON, got a file that does not parse: {e}"
        ) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise InvalidArgumentError(f"{folder / LORA_CONFIG}: expected peft_type 'LORA', got {got!r}")
    weights = folder / LORA_WEIGHTS
    if not weights.is_file():
        weights = folder / "adapter_model.bin"
    tensors = read_state_dict(weights)
    return config, {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}


def _check_peft_config(config: dict[str, Any], preset: Preset) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list):
        return [f"lora adapter_config.json target_modules: expected a list of module names, got {targets!r}"]
    outside = sorted(set(targets) - set(preset.lora.targets))
    problems = []
    if outside:
        problems.append(
            f"lora targets: expected a subset of the preset's {preset.lora.targets}, got also {outside}"
        )
    for key in ("modules_to_save", "use_dora"):
        if config.get(key):
            problems.append(
                f"lora adapter_config.json {key}: expected none (not servable), got {config[key]!r}"
            )
    return problems


def lora_problems(
    lora: dict[str, torch.Tensor], config: dict[str, Any], llm_config: Any, seed_prefix: str
) -> list[str]:
    """Problems of LoRA tensors (PEFT names) against the rank and targets of `config` on the LLM
    `llm_config` describes, named by the seed's key (`seed_prefix` + the PEFT name)."""
    targets, r = config.get("target_modules"), int(config.get("r") or 0)
    if not isinstance(targets, list):
        return []  # reported by _check_peft_config
    expected = lora_expected(llm_linears(llm_config), targets, r)
    got = {k: tuple(v.shape) for k, v in lora.items()}
    return compare(got, expected, expected, lambda k: seed_prefix + k, f"lora (r {r}, targets {targets})")


def add_peft(
    split: Split, folder: Path, preset: Preset, llm_config: Any, seed_prefix: str
) -> tuple[dict[str, Any], list[str]]:
    """Read the PEFT adapter in `folder` into `split.lora`; its config and the problems found."""
    lora_config, lora = _peft_tensors(folder)
    split.lora.update(lora)
    problems = _check_peft_config(lora_config, preset)
    return lora_config, problems + lora_problems(split.lora, lora_config, llm_config, seed_prefix)


# -- the connector and heads, and refusing -----------------------------------------------------


def check_parts(
    layout: SeedLayout,
    preset: Preset,
    connector: str,
    split: Split,
    hidden: int,
    *,
    whole_connector: bool = False,
) -> list[str]:
    """Problems of the connector and head tensors of `split` against the preset.

    Args:
        whole_connector: The release holds the whole connector (its frozen base part too).
    """
    ctype = next(s.connector.type for m, s in preset.modalities.items() if s.connector_name(m) == connector)
    rename = layout.connector[ctype]
    expected, base = connector_shapes(preset, connector, hidden)
    required = list(expected) if whole_connector else [k for k in expected if k not in base]
    problems = compare(
        {k: tuple(v.shape) for k, v in split.connector.items()}, expected, required,
        lambda k: rename.source(k), f"connector {connector} ({ctype})",
    )  # fmt: skip
    if layout.timestamp_heads:
        if preset.heads.timestamps is not None:
            shapes = _head_shapes(hidden)
            problems += compare(
                {k: tuple(v.shape) for k, v in split.heads.items()}, shapes, shapes, str, "timestamp heads"
            )
        elif split.heads:
            split.skipped.setdefault("the preset has no timestamp head", []).extend(sorted(split.heads))
            split.heads = {}
    if layout.output_heads:
        problems += _check_output_heads(split, preset, hidden)
    return problems


def unplaced_problems(split: Split) -> list[str]:
    """The keys a layout could not place, as one problem."""
    if not split.unplaced:
        return []
    return [f"{len(split.unplaced)} key(s) this layout does not know: {name_list(sorted(split.unplaced))}"]


def refuse(system: str, paths: list[Path], preset: Preset, problems: list[str]) -> None:
    """Raise the one error listing every problem, when there are any."""
    if problems:
        raise InvalidArgumentError(
            f"import {system} {', '.join(map(str, paths))} for preset {preset.name}: the checkpoint does not fit:\n  "
            + "\n  ".join(problems)
        )
