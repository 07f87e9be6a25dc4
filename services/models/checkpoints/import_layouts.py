"""The seed systems' key layouts: how each one's save code names its trained tensors, and the renames.

One `SeedLayout` per seed system (SEEDS_SPEC 1.8, 2.A, 3, 4, 5, 6): `LAYOUTS` for the releases that
become adapter bundles, `BASE_LAYOUTS` for the LAVIS Q-Formers that become a connector's frozen
base file. `split_keys` applies a layout to a state dict: every key goes to the connector
(renamed to the preset's parameter names by the layout's `Rename`), the LoRA (PEFT names), the
heads, the skipped (with the reason: embedding rows, persistent buffers, frozen towers) or the
unplaced, which the import reports. `pick_connector` finds the preset's one connector a layout
fills.

This module is data and that pure sorting: it reads no file (`importers`), checks no shape
(`import_checks`) and writes nothing (`import_write`), and it imports none of them, so the
import modules depend on it one way. What each seed's save code writes (file:line in the seed
checkout):

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from services.common.errors import InvalidArgumentError
from services.common.presets import Preset

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
class Split:
    """A state dict sorted by `split_keys`: connector tensors under the preset's names, LoRA
    tensors under PEFT's, head tensors, skipped seed keys by reason, and the seed keys the layout
    could not place."""

    connector: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)


def split_keys(layout: SeedLayout, rename: Rename, tensors: dict[str, torch.Tensor]) -> Split:
    """Sort a seed's state dict by `layout`, connector keys renamed by `rename` (see `Split`)."""
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
    """The name of the preset's one connector of a type `layout` fills.

    Raises:
        InvalidArgumentError: The preset has none, or more than one.
    """
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
