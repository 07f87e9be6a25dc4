"""E.T. Chat's releases: the full model folder, and the adapter form over an earlier stage.

What `ETChatTrainer.gather_and_save_model` (etchat/train/etchat_trainer.py:179-219) writes:

- **Full model folder** (`--save_full_model True`, every training script: scripts/train_stage_
  {1,2,3}.sh:36/40/39): the LoRA merged (:188-189), `load_base_models` False (:191), the state
  dict with `base_model.model.` stripped (:204) saved by the HF Trainer (:205): config.json
  (model_type `etchat_phi3`, ETChatPhi3ForCausalLM, the model arguments, `match_token_id`),
  generation_config.json, the weights (`model.safetensors` or shards `model-0000i-of-0000n.safetensors`
  + an index; `pytorch_model*.bin` without safetensors), the tokenizer with `<vid>`
  (train.py:455-458) and training_args.bin (a pickle, never read). Its keys: the Phi-3
  (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`), the frozen EVA-ViT-g
  (`model.vision_tower.vision_tower.*`), the whole trained Q-Former (`model.qformer_bert.bert.*`
  with its `embeddings.position_ids` buffer, `model.qformer_query`, `model.qformer_ln`,
  `model.qformer_{proj,q_proj,k_proj,v_proj}`; etchat_arch.py:32-48) and the timestamp heads
  `frm_head`/`vid_head` (etchat_arch.py:88-99). It becomes the preset's LLM folder (a plain
  Phi-3 folder: config mapped by `seed_configs.plain_config`, the Phi-3 tensors, the tokenizer),
  the connector's base file (the Q-Former, queries and ln_vision as trained: stage 2 trains the
  FFN and embeddings, stage 3 the attention) and the bundle (the projections and the heads).
- **Adapter form** (ZeRO-3 with LoRA, :183-185 and :206-219; every `checkpoint-N/`, :221-231):
  `adapter_model.safetensors` + adapter_config.json (PEFT, `base_model.model.` names) and
  `pytorch_model.safetensors` (every non-LoRA trainable, PEFT-prefixed names), config,
  generation config and tokenizer. `build_model` (model/builder.py:35-81) loads it over the model
  at `config.model_name_or_path`, the previous stage's full folder. Given alone it becomes a
  bundle over the preset's LLM folder and base (importers.py); given together with that full
  folder, this module imports both as build_model composes them: the full folder's tensors,
  the partial file's over them, the LoRA in the bundle.
- A raw DeepSpeed checkpoint (ZeRO-3 without gathered weights, :193-196) is refused by name.

`importers.import_checkpoint` hands an `etchat` release here when it holds a full folder, and
calls `adapter_base_problems` for the adapter form alone. This module builds on the pieces every
import uses (`import_layouts`, `import_checks`, `import_write`) and imports nothing of
`importers` back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import Preset
from services.models.checkpoints.bundle import LORA_CONFIG, base_fingerprint
from services.models.checkpoints.files import name_list, read_state_dict, refuse_deepspeed, safetensors_shapes
from services.models.checkpoints.import_checks import (
    add_peft,
    check_parts,
    compare,
    connector_shapes,
    refuse,
    unplaced_problems,
)
from services.models.checkpoints.import_layouts import LAYOUTS, Split, pick_connector, split_keys
from services.models.checkpoints.import_write import BASE_SOURCE, ImportReport, stage_bundle
from services.models.lm.seed_configs import LLMConfig, plain_config, read_llm_config
from services.models.lm.timestamps import HEAD_NAME

SYSTEM = "etchat"
MODEL_TYPE = "etchat_phi3"  # etchat/model/language_model/phi3.py:10
PARTIAL = "pytorch_model.safetensors"  # etchat_trainer.py:219, :231
PEFT_PREFIX = "base_model.model."  # the partial's names (named_parameters of the PeftModel)
HF_WEIGHTS = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)$")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
LLM_SHARD_BYTES = 5 * 2**30  # the HF Trainer's default shard size


@dataclass
class Release:
    """What the given paths hold.

    Attributes:
        full_dir: The full model folder.
        full_files: Its weight files, in order.
        partial: Partial state-dict files (the adapter form's non-LoRA trainables).
        adapter_dir: The folder holding the PEFT adapter, if any.
        meta_dir: The folder whose config.json and tokenizer describe the result: the adapter
            form's (the later stage) when given, else the full folder's.
    """

    full_dir: Path
    full_files: list[Path]
    partial: list[Path] = field(default_factory=list)
    adapter_dir: Path | None = None
    meta_dir: Path = Path()


def _weight_files(folder: Path) -> list[Path]:
    """The HF weight files of a model folder (those its index names, when it has one).

    Raises:
        InvalidArgumentError: The index does not parse or names a file that is missing.
    """
    for index_name in INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise InvalidArgumentError(
                    f"{index}: expected a weight index with a weight_map, got a file that does not parse ({e})"
                ) from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise InvalidArgumentError(
                    f"{index}: names {name_list(missing)}, which {'is' if len(missing) == 1 else 'are'} missing "
                    "(an incomplete copy of the release?)"
                )
            return [folder / n for n in names]
    return sorted(p for p in folder.iterdir() if p.is_file() and HF_WEIGHTS.match(p.name))


def find_full_release(paths: list[Path]) -> Release | None:
    """The release when `paths` hold a full model folder; None for the adapter form alone.

    Raises:
        NotFoundError: A path is missing.
        InvalidArgumentError: Two full folders, a raw DeepSpeed checkpoint, a broken index.
    """
    full: list[tuple[Path, list[Path]]] = []
    partial: list[Path] = []
    adapter: Path | None = None
    for p in paths:
        if p.is_file():
            refuse_deepspeed(p)
            partial.append(p)
            continue
        if not p.is_dir():
            raise NotFoundError(f"checkpoint {p}: no such file or folder")
        weights = _weight_files(p)
        has_adapter = (p / LORA_CONFIG).is_file()
        refuse_deepspeed(p, has_weights=bool(weights) or has_adapter or (p / PARTIAL).is_file())
        if weights and not has_adapter:
            full.append((p, weights))
        if (p / PARTIAL).is_file():
            partial.append(p / PARTIAL)
        if has_adapter:
            adapter = p
    if not full:
        return None
    if len(full) > 1:
        raise InvalidArgumentError(
            f"import {SYSTEM}: expected at most one full model folder, got {', '.join(str(d) for d, _ in full)}"
        )
    ((full_dir, files),) = full
    later = adapter or next((f.parent for f in partial if f.parent != full_dir), None)
    return Release(full_dir, files, partial, adapter, later or full_dir)


class _Weights:
    """Key -> shape of one weights file (its header for safetensors), and its tensors on demand."""

    def __init__(self, path: Path, strip: str = "") -> None:
        self.path, self.strip = path, strip
        self._state: dict[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            raw = safetensors_shapes(path)
        else:
            self._state = read_state_dict(path)
            raw = {k: tuple(v.shape) for k, v in self._state.items()}
        self.names = {k.removeprefix(strip): k for k in raw}  # key -> the key in the file
        self.shapes = {k.removeprefix(strip): s for k, s in raw.items()}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._state is not None:
            return {k: self._state[self.names[k]] for k in keys}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(self.names[k]) for k in keys}
        except (SafetensorError, OSError) as e:
            raise InvalidArgumentError(f"checkpoint {self.path}: unreadable tensors ({e})") from None


@dataclass
class _Plan:
    """Every key of the release, where it comes from and where it goes."""

    source: dict[str, _Weights] = field(default_factory=dict)  # key -> the file it is read from
    llm: list[str] = field(default_factory=list)
    llm_expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    connector: dict[str, str] = field(default_factory=dict)  # preset key -> release key
    base: set[str] = field(default_factory=set)  # preset keys of the connector's frozen part
    heads: dict[str, str] = field(default_factory=dict)


def _config_problems(llm: LLMConfig, preset: Preset, label: Path) -> list[str]:
    """The release's config against what the preset serves."""
    raw, problems = llm.raw, []
    if raw.get("model_type") != MODEL_TYPE:
        problems.append(
            f"{label / 'config.json'} model_type: expected {MODEL_TYPE!r} (E.T. Chat's ETChatPhi3ForCausalLM), "
            f"got {raw.get('model_type')!r}: a checkpoint of another system?"
        )
        return problems
    spec = next(s for s in preset.modalities.values() if s.connector.type == "instruct_qformer")
    wanted = {
        "mm_projector": ("qformer", "the preset's instruct_qformer connector"),
        "vision_output_token": ("patch", "the Q-Former reads patches"),
        "vision_output_layer": (spec.encoder.select_layer, "the preset's encoder.select_layer"),
    }
    for key, (value, why) in wanted.items():
        if key in raw and raw[key] != value:
            problems.append(f"{label / 'config.json'} {key}: expected {value!r} ({why}), got {raw[key]!r}")
    return problems


def _plan(release: Release, preset: Preset, llm: LLMConfig, connector: str) -> tuple[_Plan, Split, list[str]]:
    """Place every key of the release: LLM, connector, heads, skipped or unknown."""
    from transformers import AutoModelForCausalLM

    layout = LAYOUTS[SYSTEM]
    plan = _Plan()
    for f in release.full_files:
        w = _Weights(f)
        plan.source.update(dict.fromkeys(w.shapes, w))
    for f in release.partial:  # the later stage's trainables, over the full folder's (builder.py:74-76)
        w = _Weights(f, strip=PEFT_PREFIX)
        plan.source.update(dict.fromkeys(w.shapes, w))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(llm.config)
    plan.llm_expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    if getattr(llm.config, "tie_word_embeddings", False):
        plan.llm_expected.pop("lm_head.weight", None)
    shapes = {k: w.shapes[k] for k, w in plan.source.items()}
    plan.llm = [k for k in shapes if k in plan.llm_expected]
    rest = {k: torch.empty(shapes[k], device="meta") for k in shapes if k not in plan.llm_expected}
    ctype = "instruct_qformer"
    split = split_keys(layout, layout.connector[ctype], rest)
    rename = layout.connector[ctype]
    plan.connector = {target: rename.source(target) for target in split.connector}
    problems = unplaced_problems(split)
    problems += compare(
        {k: shapes[k] for k in plan.llm},
        plan.llm_expected,
        plan.llm_expected,
        str,
        f"LLM ({llm.seed.architecture if llm.seed else 'causal LM'} of {llm.path})",
    )
    hidden = int(llm.config.hidden_size)
    problems += check_parts(layout, preset, connector, split, hidden, whole_connector=True)
    _, base = connector_shapes(preset, connector, hidden)
    plan.base = {k for k in split.connector if k in base}
    plan.heads = {k: k for k in split.heads}  # those the preset keeps (check_parts skips the others)
    return plan, split, problems


def _check_targets(out: Path, llm_out: Path, base_out: Path) -> None:
    if out.exists():
        raise InvalidArgumentError(
            f"import: the bundle folder {out} already exists; pass another --out or --version"
        )
    if llm_out.exists() and (not llm_out.is_dir() or any(llm_out.iterdir())):
        raise InvalidArgumentError(
            f"import {SYSTEM}: the LLM folder {llm_out} already exists; the release's merged LLM is written "
            "as a new folder: pass --llm-out (and a preset whose llm.checkpoint names it) or remove it"
        )
    if base_out.exists():
        raise InvalidArgumentError(
            f"import {SYSTEM}: the connector base {base_out} already exists; the release's trained Q-Former is "
            "written as a new file: pass --base-out (and a preset whose connector base names it) or remove it"
        )


def _write_llm(staged: Path, release: Release, plan: _Plan, llm: LLMConfig) -> None:
    """The plain Phi-3 folder: the LLM tensors in safetensors shards, config, tokenizer."""
    from services.models.lm.tokens import copy_extra_files

    staged.mkdir(parents=True)
    by_file: dict[_Weights, list[str]] = {}
    for key in plan.llm:
        by_file.setdefault(plan.source[key], []).append(key)
    shards: list[list[str]] = [[]]  # key names per shard written
    pending: dict[str, torch.Tensor] = {}
    size = total = 0
    for weights, keys in by_file.items():
        for key, tensor in weights.read(keys).items():
            nbytes = tensor.numel() * tensor.element_size()
            if pending and size + nbytes > LLM_SHARD_BYTES:
                _save_shard(staged, len(shards) - 1, pending, shards)
                shards.append([])
                size = 0
            pending[key] = tensor.contiguous()
            size, total = size + nbytes, total + nbytes
    _save_shard(staged, len(shards) - 1, pending, shards)
    if len(shards) == 1:
        os.replace(staged / "shard-0.safetensors", staged / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(staged / f"shard-{i}.safetensors", staged / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staged / INDEXES[0]).write_text(json.dumps(index, indent=2) + "\n")
    config = plain_config(llm.raw, llm.seed)
    (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for folder in dict.fromkeys([release.meta_dir, release.full_dir]):
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (folder / name).is_file() and not (staged / name).exists():
                shutil.copy2(folder / name, staged / name)
    copy_extra_files(release.full_dir, staged)


def _save_shard(staged: Path, i: int, pending: dict[str, torch.Tensor], shards: list[list[str]]) -> None:
    save_file(pending, str(staged / f"shard-{i}.safetensors"), metadata={"format": "pt"})
    shards[i] = sorted(pending)
    pending.clear()


def _check_tokenizer(staged: Path, preset: Preset, llm: LLMConfig, rows: int) -> list[str]:
    """The tokenizer written beside the LLM: the preset's added tokens one token each, and
    `<vid>` at the config's match_token_id (train.py:456-457)."""
    from transformers import AutoTokenizer

    from services.models.lm.tokens import one_token

    label = llm.path.parent
    try:
        tokenizer = AutoTokenizer.from_pretrained(staged)
    except (OSError, ValueError, TypeError) as e:
        return [f"tokenizer of {label}: expected one transformers loads, got an error ({e})"]
    problems = []
    for token in preset.llm.added_tokens:
        if one_token(tokenizer, token) is None:
            problems.append(
                f"tokenizer of {label}: expected {token!r} (the preset's llm.added_tokens) as one token, got "
                f"{tokenizer(token, add_special_tokens=False)['input_ids']}: a release of an earlier stage "
                "(no use_matching)?"
            )
    ts = preset.heads.timestamps
    match = llm.raw.get("match_token_id")
    if ts is not None and match is not None and one_token(tokenizer, ts.token) not in (None, match):
        problems.append(
            f"config.json match_token_id: expected the id of {ts.token!r} in the tokenizer "
            f"({one_token(tokenizer, ts.token)}), got {match}"
        )
    if len(tokenizer) > rows:
        problems.append(
            f"tokenizer of {label}: expected at most {rows} tokens (the embedding rows), got {len(tokenizer)}"
        )
    return problems


def import_full_release(
    release: Release,
    paths: list[Path],
    preset: Preset,
    out: Path,
    *,
    version: str | None = None,
    name: str | None = None,
    llm_out: Path | None = None,
    base_out: Path | None = None,
) -> ImportReport:
    """Import an E.T. Chat full model folder (and an adapter form over it) for `preset`.

    Writes three things, all checked before any is written and each moved into place whole:
    the LLM folder (`llm_out`, default the preset's `llm.checkpoint`), the connector base file
    (`base_out`, default the connector's `base:`) and the bundle `out` (the connector's
    projections, the heads, the adapter form's LoRA), fingerprinted with the new LLM folder.

    Raises:
        InvalidArgumentError: A target exists, or the release does not fit the preset (every
            problem listed, by the release's key names).
    """
    connector = pick_connector(LAYOUTS[SYSTEM], preset, SYSTEM)
    spec = next(s.connector for m, s in preset.modalities.items() if s.connector_name(m) == connector)
    llm_out = llm_out or preset.llm.checkpoint
    base_out = base_out or spec.base
    if base_out is None:
        raise InvalidArgumentError(
            f"import {SYSTEM}: preset {preset.name}'s connector has no base: path; pass --base-out FILE"
        )
    _check_targets(out, llm_out, base_out)
    problems: list[str] = []
    for folder in dict.fromkeys([release.full_dir, release.meta_dir]):
        problems += _config_problems(read_llm_config(folder, error=InvalidArgumentError), preset, folder)
    refuse(SYSTEM, paths, preset, problems)
    llm = read_llm_config(release.meta_dir, error=InvalidArgumentError)  # the later stage's config
    plan, split, problems = _plan(release, preset, llm, connector)
    lora_config: dict[str, Any] = {}
    if release.adapter_dir is not None:
        lora_config, more = add_peft(split, release.adapter_dir, preset, llm.config, "")
        problems += more
    refuse(SYSTEM, paths, preset, problems)

    with _Staging() as staging:
        llm_dir = staging.path(llm_out)
        _write_llm(llm_dir, release, plan, llm)
        rows = plan.llm_expected["model.embed_tokens.weight"][0]
        refuse(SYSTEM, paths, preset, _check_tokenizer(llm_dir, preset, llm, rows))
        tensors = _read(plan, {**plan.connector, **plan.heads})
        split.connector = {k: tensors[r] for k, r in plan.connector.items() if k not in plan.base}
        split.heads = {k: tensors[r] for k, r in plan.heads.items()}
        base_file = staging.path(base_out)
        base = {k: tensors[plan.connector[k]].contiguous() for k in sorted(plan.base)}
        source = f"{SYSTEM}:{release.full_dir.name}"
        save_file(base, str(base_file), metadata={"format": "pt", BASE_SOURCE: source})
        bundle = staging.path(out)
        stage_bundle(
            bundle, preset, SYSTEM, connector=connector, split=split, lora_config=lora_config,
            version=version or out.name, name=name or preset.adapter.name, linears_of=llm.config,
            head_name=HEAD_NAME, fingerprint=base_fingerprint(llm_dir),
        )  # fmt: skip
        staging.publish()
    return ImportReport(
        output=out, system=SYSTEM, preset=preset.name, connectors={connector: sorted(split.connector)},
        heads=sorted(split.heads), lora_tensors=len(split.lora), lora_config=lora_config, skipped=split.skipped,
        llm_folder=llm_out, llm_tensors=len(plan.llm), base_file=base_out, base_tensors=len(plan.base), notes=_notes(llm),
    )  # fmt: skip


def _read(plan: _Plan, wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """The release tensors named (release key) in `wanted`'s values, read per file."""
    by_file: dict[_Weights, list[str]] = {}
    for key in set(wanted.values()):
        by_file.setdefault(plan.source[key], []).append(key)
    out: dict[str, torch.Tensor] = {}
    for weights, keys in by_file.items():
        out.update(weights.read(keys))
    return out


class _Staging:
    """Staged copies of the targets, beside each, moved into place together by `publish`.

    On leaving without publishing (an error), the staged copies are deleted, and so are the
    target folders' parents this created; a failed move undoes the moves done before it.
    """

    def __init__(self) -> None:
        self._roots: list[tempfile.TemporaryDirectory[str]] = []
        self._moves: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def __enter__(self) -> _Staging:
        return self

    def path(self, target: Path) -> Path:
        """Where to write `target` before it is published."""
        missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        self._created += missing
        target.parent.mkdir(parents=True, exist_ok=True)
        root = tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.import-")
        self._roots.append(root)
        staged = Path(root.name) / target.name
        self._moves.append((staged, target))
        return staged

    def publish(self) -> None:
        done: list[Path] = []
        try:
            for staged, target in self._moves:
                if target.is_dir() and not any(target.iterdir()):
                    target.rmdir()  # an empty LLM folder (_check_targets allows it)
                os.replace(staged, target)
                done.append(target)
        except OSError:
            for target in done:
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            raise
        self._created = []

    def __exit__(self, *exc: object) -> None:
        for root in self._roots:
            root.cleanup()
        for folder in sorted(set(self._created), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _notes(llm: LLMConfig) -> list[str]:
    raw = llm.raw
    notes = []
    if raw.get("bi_attention"):
        notes.append(
            "trained with bi_attention (train_stage_3.sh:30): the frames attend to each other in both "
            "directions; the preset must serve the video span the same way"
        )
    return notes


def adapter_base_problems(
    paths: list[Path], preset: Preset, connector: str, split: Split
) -> tuple[list[str], list[str]]:
    """The adapter form alone: what it was trained over, against the preset's LLM and base.

    The adapter form holds only the trainables of its stage; `build_model` loads the rest from
    `config.model_name_or_path` (builder.py:35-44): the previous stage's full folder (its
    merged LLM, and the Q-Former FFN and embeddings trained in stage 2), unless the run loaded
    the base models itself (`pretrain_qformer`, train.py:409). A connector base written from
    InstructBLIP (`modalmesh import instructblip-qformer`) then lacks the stage-2 training: that
    is refused; anything else is noted.

    Returns:
        (problems, notes).
    """
    folders = [p if p.is_dir() else p.parent for p in paths]
    meta = next((f for f in folders if (f / "config.json").is_file()), None)
    if meta is None:
        return [], []
    try:
        raw = json.loads((meta / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{meta / 'config.json'}: expected JSON, got a file that does not parse: {e}"], []
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        return [
            f"{meta / 'config.json'} model_type: expected {MODEL_TYPE!r}, got {got!r}: a checkpoint of another system?"
        ], []
    base_of = raw.get("model_name_or_path")
    if raw.get("pretrain_qformer") or not base_of:
        return [], []
    spec = next(s.connector for m, s in preset.modalities.items() if s.connector_name(m) == connector)
    _, base_keys = connector_shapes(preset, connector, 1)
    if base_keys <= set(split.connector) or spec.base is None or not spec.base.is_file():
        return [], [
            f"trained over {base_of} (config.json model_name_or_path): the preset's LLM folder must hold its merged LLM"
        ]
    source = _base_source(spec.base)
    if source.startswith(("instructblip-qformer", "blip2-qformer")):
        return [
            f"connector base {spec.base}: expected the Q-Former of {base_of} (config.json model_name_or_path; "
            f"its FFN and embeddings, trained in stage 2, are not in this release), got {source.split(':')[0]}'s "
            f"original: import that folder with this one (`modalmesh import {SYSTEM} <{base_of}> {meta}`)"
        ], []
    return [], [
        f"trained over {base_of} (config.json model_name_or_path): the preset's LLM folder and connector base "
        f"({source or 'of unknown origin'}) must be that folder's"
    ]


def _base_source(path: Path) -> str:
    try:
        with safe_open(str(path), framework="pt") as f:
            return str((f.metadata() or {}).get(BASE_SOURCE, ""))
    except (SafetensorError, OSError):
        return ""


__all__ = ["Release", "adapter_base_problems", "find_full_release", "import_full_release"]
