"""Import the seed systems' releases, as their own save code writes them, for a preset.

One layout per seed (SEEDS_SPEC 1.8, 2.A, 3, 4, 5, 6); each renames the seed's keys to the
preset's connector names, checks every tensor against the connector built from the preset (on
the meta device) and the LoRA against the preset's LLM (also on the meta device), then writes a
bundle (`adapters.write_bundle`) fingerprinted with the preset's LLM folder. What each seed's
save code writes (file:line in the seed checkout):

    pandagpt   `{save_path}/pytorch_model.pt` (PandaGPT code/model/agent.py:49-63): every
               parameter with requires_grad, as nn.Parameters: llama_proj.* and the PEFT 0.3 LoRA
               llama_model.base_model.model.<m>.lora_{A,B}.default.weight; tokenizer and LLaMA
               config beside it. -> connector (linear) proj.*, lora/ (the preset's r/alpha/targets)
    nextgpt    the same file (NExT-GPT-Lagacy code/model/agent.py:71-95) plus the output projectors
               gen_text_hidden_fcs{,_video,_audio}.* (kept whatever their requires_grad) and the
               embedding matrices resized after freezing (anyToImageVideoAudio.py:100): PEFT names
               llama_model.base_model.model.{model.embed_tokens,lm_head}.weight in stage 3, plain
               llama_model.{model.embed_tokens,lm_head}.weight in stages 1-2 (agent.py:145-160 maps
               the one to the other). -> heads (checked against the preset's `outputs`); the
               matrices are skipped (`modalmesh add-tokens --rows-from` takes them)
    videochat  `ckpt_NN.pth` / `ckpt_latest.pth` (video_chat tasks/train.py:180-203): {'model': the
               state dict less the frozen parameters, so with every persistent buffer
               (llama_model...rotary_emb.inv_freq, models/modeling_llama.py:81;
               Qformer.bert.embeddings.position_ids, models/Qformer.py:70), 'optimizer',
               'scheduler', 'scaler', 'config' (an EasyDict), 'epoch', 'global_step'}: read with the
               allow-listed unpickler (checkpoint_files.py), buffers skipped by name ->
               visual_encoder.gmhra.{j}.* -> gmhra.layers.{j}.*, gmhra_cls_token, ln_vision.*,
               extra_query_tokens, llama_proj.* -> proj.* (connector qformer)
    llava      LLaVA (c121f04) llava/train/train.py:185-206 `mm_projector.bin` (stage 1:
               model.mm_projector.*, model.embed_tokens with use_im_start_end) or :974-984 a PEFT
               adapter + `non_lora_trainables.bin` (base_model.model.model.mm_projector.*)
    etchat     a full model folder (the training scripts' --save_full_model, etchat_trainer.py:187-205)
               or the adapter form (:206-219, with :221-231 in checkpoint-N/): services/models/checkpoints/import_full.py
    eventgpt   the EventGPT-7b folder (an EventChatModel's save_pretrained: model.visual_projector.{0,2}.*
               -> fc1/fc2, model.feature_adaptor.* -> adaptor.*; only those keys are read) or files
    blip2-qformer, instructblip-qformer
               LAVIS Qformer.bert.*, query_tokens, ln_vision.* -> the frozen base file of a Q-Former
               connector (`connector.base`), not a bundle

Every pickle is read through `checkpoint_files` (torch's weights-only unpickler plus EasyDict as a
plain dict): a file that needs anything else is refused, naming the global, and never runs. A
raw DeepSpeed checkpoint is refused by name. Every mismatch is reported by the seed's key name,
expected against got, all at once, and nothing is written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import Preset
from services.models.checkpoints.bundle import LORA_CONFIG, LORA_WEIGHTS, base_fingerprint, write_bundle
from services.models.checkpoints.files import name_list as _names
from services.models.checkpoints.files import read_state_dict, refuse_deepspeed
from services.models.lm.lora import check_lora, linear_shapes
from services.models.lm.seed_configs import read_llm_config
from services.models.lm.timestamps import HEAD_NAME

SHOWN = 8  # names listed per kind of problem
BASE_SOURCE = "modalmesh_source"  # metadata of a connector base file: "<system>:<release file or folder>"
PEFT_PREFIX = "base_model.model."
# LAVIS BERT -> transformers Q-Former names (services/models/connectors/eva_qformer.py's table).
_QFORMER_SUBS = (
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
)


@dataclass(frozen=True)
class Rename:
    """Seed key <-> modalmesh key: prefix rules (first match wins), then inner substitutions."""

    rules: tuple[tuple[str, str], ...]
    subs: tuple[tuple[str, str], ...] = ()

    def target(self, key: str) -> str | None:
        for src, dst in self.rules:
            if key.startswith(src):
                out = dst + key[len(src) :]
                for a, b in self.subs:
                    out = out.replace(a, b)
                return out
        return None

    def source(self, key: str) -> str:
        for src, dst in self.rules:
            if key.startswith(dst):
                out = src + key[len(dst) :]
                for a, b in self.subs:
                    out = out.replace(b, a)
                return out
        return key


def _qformer_rename(prefix: str, *, instruct: bool, extra: tuple[tuple[str, str], ...] = ()) -> Rename:
    norm = "qformer.embeddings.layernorm." if instruct else "qformer.layernorm."
    return Rename(((f"{prefix}embeddings.LayerNorm.", norm), *extra, (prefix, "qformer.")), _QFORMER_SUBS)


@dataclass(frozen=True)
class SeedLayout:
    """How one seed system saved its trained tensors.

    Attributes:
        connector_types: Preset connector types this layout fills (exactly one connector).
        connector: Seed key -> connector parameter, per connector type.
        strip: Prefixes removed from every key first (PEFT wrappers).
        unwrap: Top-level entry holding the state dict (VideoChat's 'model').
        lora_prefix: Seed prefix of LoRA keys before PEFT's `base_model.model.` (embedded LoRA).
        heads: Seed key prefixes kept as bundle heads, the first component naming the head.
        skip: (prefix, reason): seed keys left out of the bundle, reported with the reason.
        buffers: (regex, reason): persistent buffers the seed's save keeps (state_dict() less
            the frozen parameters), skipped with the reason.
        only: Read only keys with these prefixes (a full Hugging Face folder: the rest is the
            base model); None reads every key and reports any it cannot place.
        peft_dir: Read a PEFT adapter (adapter_config.json + adapter_model.*) beside the files.
        files: The file names read from a folder (default: its *.safetensors and pytorch_model*.bin).
        timestamp_heads: The heads are E.T. Chat's frm_head/vid_head: checked against the LLM
            width and stored as the bundle head `timestamps` (services/models/lm/timestamps.py).
        output_heads: The heads are NExT-GPT's output projectors: checked against the preset's
            `outputs` (services/models/lm/output_projector.py).
    """

    connector_types: tuple[str, ...]
    connector: dict[str, Rename]
    strip: tuple[str, ...] = ()
    unwrap: str | None = None
    lora_prefix: str | None = None
    heads: tuple[str, ...] = ()
    skip: tuple[tuple[str, str], ...] = ()
    buffers: tuple[tuple[str, str], ...] = ()
    only: tuple[str, ...] | None = None
    peft_dir: bool = False
    files: tuple[str, ...] = ()
    timestamp_heads: bool = False
    output_heads: bool = False


_EMBED_REASON = (
    "the base LLM's rows are not part of a bundle (`modalmesh add-tokens BASE --preset P --rows-from "
    "<this checkpoint>` writes them into the preset's LLM folder)"
)
_LINEAR_PROJ = {"linear": Rename((("llama_proj.", "proj."),))}
_POSITION_IDS = "a persistent buffer (arange position indices), rebuilt by the connector"
LAYOUTS: dict[str, SeedLayout] = {
    # PandaGPT code/model/agent.py:49-63: the trainable parameters (llama_proj, PEFT LoRA).
    "pandagpt": SeedLayout(
        ("linear",), _LINEAR_PROJ, lora_prefix="llama_model.", files=("pytorch_model.pt",)
    ),
    # NExT-GPT-Lagacy code/model/agent.py:71-95, the matrices under either name (:145-160).
    "nextgpt": SeedLayout(
        ("linear",),
        _LINEAR_PROJ,
        lora_prefix="llama_model.",
        heads=("gen_text_hidden_fcs.", "gen_text_hidden_fcs_video.", "gen_text_hidden_fcs_audio."),
        output_heads=True,
        skip=(
            ("llama_model.base_model.model.model.embed_tokens.", _EMBED_REASON),
            ("llama_model.base_model.model.lm_head.", _EMBED_REASON),
            ("llama_model.model.embed_tokens.", _EMBED_REASON),
            ("llama_model.lm_head.", _EMBED_REASON),
        ),
        files=("pytorch_model.pt",),
    ),
    "videochat": SeedLayout(
        ("qformer",),
        {
            "qformer": _qformer_rename(
                "Qformer.bert.",
                instruct=False,
                extra=(
                    ("visual_encoder.gmhra_cls_token", "gmhra.cls_token"),
                    ("visual_encoder.gmhra.", "gmhra.layers."),
                    ("ln_vision.", "ln_vision."),
                    ("extra_query_tokens", "extra_query_tokens"),
                    ("query_tokens", "query_tokens"),
                    ("llama_proj.", "proj."),
                ),
            )
        },
        unwrap="model",
        # video_chat tasks/train.py:183-190 keeps every buffer of the model
        buffers=(
            (
                r"^llama_model\.(base_model\.model\.)?model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
                "a persistent buffer of the frozen LLaMA (rotary inverse frequencies, "
                "models/modeling_llama.py:81), recomputed by the LLM",
            ),
            (r"^Qformer\.bert\.embeddings\.position_ids$", _POSITION_IDS),
        ),
    ),
    "llava": SeedLayout(
        ("mlp2x_gelu", "linear"),
        {
            "mlp2x_gelu": Rename((("model.mm_projector.0.", "fc1."), ("model.mm_projector.2.", "fc2."))),
            "linear": Rename((("model.mm_projector.", "proj."),)),
        },
        strip=("base_model.model.",),
        skip=(("model.embed_tokens.", _EMBED_REASON), ("lm_head.", _EMBED_REASON)),
        peft_dir=True,
        files=("non_lora_trainables.bin", "mm_projector.bin"),
    ),
    "etchat": SeedLayout(
        ("instruct_qformer",),
        {
            "instruct_qformer": _qformer_rename(
                "model.qformer_bert.bert.",
                instruct=True,
                extra=(
                    ("model.qformer_query", "query_tokens"),
                    ("model.qformer_ln.", "ln_vision."),
                    ("model.qformer_proj.", "qformer_proj."),
                    ("model.qformer_q_proj.", "q_proj."),
                    ("model.qformer_k_proj.", "k_proj."),
                    ("model.qformer_v_proj.", "v_proj."),
                ),
            )
        },
        strip=("base_model.model.",),
        heads=("frm_head.", "vid_head."),
        skip=(
            ("model.embed_tokens.", _EMBED_REASON),
            ("lm_head.", _EMBED_REASON),
            (
                "model.vision_tower.",
                "the frozen EVA-ViT-g (never trained; the preset's encoder reads its own checkpoint)",
            ),
        ),
        buffers=((r"^model\.qformer_bert\.bert\.embeddings\.position_ids$", _POSITION_IDS),),
        peft_dir=True,
        files=("pytorch_model.safetensors",),
        timestamp_heads=True,
    ),
    "eventgpt": SeedLayout(
        ("event_adaptor",),
        {
            "event_adaptor": Rename(
                (
                    ("model.visual_projector.0.", "fc1."),
                    ("model.visual_projector.2.", "fc2."),
                    ("model.feature_adaptor.", "adaptor."),
                )
            )
        },
        only=("model.visual_projector.", "model.feature_adaptor."),
    ),
}
BASE_LAYOUTS: dict[str, SeedLayout] = {
    "blip2-qformer": SeedLayout(
        ("qformer",),
        {
            "qformer": _qformer_rename(
                "Qformer.bert.",
                instruct=False,
                extra=(("query_tokens", "query_tokens"), ("ln_vision.", "ln_vision.")),
            )
        },
        unwrap="model",
        only=("Qformer.bert.", "query_tokens", "ln_vision."),
    ),
    # LAVIS InstructBLIP (instruct_blip_vicuna7b_trimmed.pth): the instruction-aware Q-Former
    # E.T. Chat starts from; its text parts (word/position embeddings, text FFN) are kept, and
    # they are what E.T. Chat's release lacks (it holds only the parts it trained).
    "instructblip-qformer": SeedLayout(
        ("instruct_qformer",),
        {
            "instruct_qformer": _qformer_rename(
                "Qformer.bert.",
                instruct=True,
                extra=(("query_tokens", "query_tokens"), ("ln_vision.", "ln_vision.")),
            )
        },
        unwrap="model",
        only=("Qformer.bert.", "query_tokens", "ln_vision."),
    ),
}
SYSTEMS: tuple[str, ...] = (*LAYOUTS, *BASE_LAYOUTS)
DEFAULT_PRESETS: dict[str, str] = {
    "pandagpt": "pandagpt",
    "nextgpt": "nextgpt",
    "videochat": "videochat",
    "etchat": "etchat",
    "eventgpt": "eventgpt",
    "blip2-qformer": "videochat",
    "instructblip-qformer": "etchat",
}


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
            out.append(f"  heads: {_names(sorted({k.split('.')[0] for k in self.heads}))}")
        out += [f"  skipped {_names(keys)}: {why}" for why, keys in self.skipped.items()]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t)


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


# -- expected shapes -----------------------------------------------------------------------------


def _llm_config(preset: Preset) -> Any:
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


def _llm_linears(config: Any) -> dict[str, tuple[int, int]]:
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
        problems.append(f"{what}: missing {len(missing)} key(s) the target needs: {_names(missing)}")
    extra = sorted(seed_name(k) for k in got if k not in expected)
    if extra:
        problems.append(f"{what}: {len(extra)} unexpected key(s): {_names(extra)}")
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


# -- importing -----------------------------------------------------------------------------------


@dataclass
class Split:
    connector: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)


def split_keys(layout: SeedLayout, rename: Rename, tensors: dict[str, torch.Tensor]) -> Split:
    out = Split()
    for raw, tensor in tensors.items():
        key = raw
        for prefix in layout.strip:
            key = key.removeprefix(prefix)
        if ".lora_" in key and layout.lora_prefix is not None and key.startswith(layout.lora_prefix):
            peft_key = key[len(layout.lora_prefix) :].replace(".default.weight", ".weight")
            out.lora[peft_key] = tensor
            continue
        reason = next((why for pattern, why in layout.buffers if re.match(pattern, key)), None)
        reason = reason or next((why for prefix, why in layout.skip if key.startswith(prefix)), None)
        if reason is not None:
            out.skipped.setdefault(reason, []).append(raw)
        elif key.startswith(layout.heads):
            out.heads[key] = tensor
        elif (target := rename.target(key)) is not None:
            out.connector[target] = tensor
        else:
            out.unplaced.append(raw)
    return out


def pick_connector(layout: SeedLayout, preset: Preset, system: str) -> str:
    names = {
        s.connector_name(m): s.connector.type for m, s in preset.modalities.items()
        if s.connector.type in layout.connector_types
    }  # fmt: skip
    if len(names) != 1:
        have = {s.connector_name(m): s.connector.type for m, s in preset.modalities.items()}
        raise InvalidArgumentError(
            f"import {system}: expected the preset {preset.name} to have exactly one connector of type "
            f"{' or '.join(layout.connector_types)}, got {have}"
        )
    return next(iter(names))


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


def _check_lora(
    lora: dict[str, torch.Tensor], config: dict[str, Any], llm_config: Any, seed_prefix: str
) -> list[str]:
    targets, r = config.get("target_modules"), int(config.get("r") or 0)
    if not isinstance(targets, list):
        return []  # reported by _check_peft_config
    expected = lora_expected(_llm_linears(llm_config), targets, r)
    got = {k: tuple(v.shape) for k, v in lora.items()}
    return compare(got, expected, expected, lambda k: seed_prefix + k, f"lora (r {r}, targets {targets})")


def _lora_config(preset: Preset) -> dict[str, Any]:
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
    return [f"{len(split.unplaced)} key(s) this layout does not know: {_names(sorted(split.unplaced))}"]


def add_peft(
    split: Split, folder: Path, preset: Preset, llm_config: Any, seed_prefix: str
) -> tuple[dict[str, Any], list[str]]:
    """Read the PEFT adapter in `folder` into `split.lora`; its config and the problems found."""
    lora_config, lora = _peft_tensors(folder)
    split.lora.update(lora)
    problems = _check_peft_config(lora_config, preset)
    return lora_config, problems + _check_lora(split.lora, lora_config, llm_config, seed_prefix)


def refuse(system: str, paths: list[Path], preset: Preset, problems: list[str]) -> None:
    """Raise the one error listing every problem, when there are any."""
    if problems:
        raise InvalidArgumentError(
            f"import {system} {', '.join(map(str, paths))} for preset {preset.name}: the checkpoint does not fit:\n  "
            + "\n  ".join(problems)
        )


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
        from services.models.checkpoints.import_full import find_full_release, import_full_release

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
    llm_config = _llm_config(preset)
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
        lora_config = _lora_config(preset)
        problems += _check_lora(split.lora, lora_config, llm_config, layout.lora_prefix or "")
    notes: list[str] = []
    if system == "etchat":
        from services.models.checkpoints.import_full import adapter_base_problems

        more, notes = adapter_base_problems(paths, preset, connector, split)
        problems += more
    refuse(system, paths, preset, problems)
    return _write(
        out, preset, system, connector=connector, split=split, lora_config=lora_config,
        version=version or out.name, name=name or preset.adapter.name, linears_of=llm_config,
        head_name=HEAD_NAME if layout.timestamp_heads else None, notes=notes,
    )  # fmt: skip


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
        check_lora(lora, _llm_linears(linears_of))  # the serving-time check, before publishing
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


def _write(
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
    expected, _base = connector_shapes(preset, connector, _llm_config(preset).hidden_size)
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


def default_output(preset: Preset, version: str | None) -> Path:
    """The bundle folder an import writes by default: the preset's adapter folder (or a sibling)."""
    return preset.adapter.path if version is None else preset.adapter.path.parent / version


__all__ = [
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
    "read_state_dict",
]
