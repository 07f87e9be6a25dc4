"""Seed releases at the tiny twins' sizes, written key by key and object by object as each
seed's own save code writes them (the seed file:line is cited at every writer).

Sizes come from the twin (its LLM folder's config.json and its preset); key names are written
out here from the seed's code, never taken from the importer under test. Values are random.

    write_pandagpt(folder, preset)            # PandaGPT code/model/agent.py:49-63
    write_nextgpt(folder, preset, stage=1|3)  # NExT-GPT-Lagacy code/model/agent.py:71-95
    write_videochat(path, preset)             # video_chat tasks/train.py:180-203
    write_etchat_full(folder, preset, ...)    # etchat/train/etchat_trainer.py:187-205
    write_etchat_adapter(folder, preset, ...) # etchat/train/etchat_trainer.py:206-219
    write_eventgpt(folder, preset, ...)       # EventGPT model/EventChatModel.py (save_pretrained)
    await serve_one(preset, media)            # load_model + Engine: one request, 3 tokens
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.presets import Preset
from services.llm.domain import GenerationEvent, GenerationRequest
from services.llm.sampling import SamplingParams

SCALE = 0.05
GEN = torch.Generator().manual_seed(7)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * SCALE


def llm_config(preset: Preset) -> dict[str, Any]:
    """The twin's LLM config.json."""
    return dict(json.loads((preset.llm.checkpoint / "config.json").read_text()))


def with_paths(
    preset: Preset, *, llm: Path | None = None, base: Path | None = None, adapter: Path | None = None
) -> Preset:
    """The preset with its LLM folder, Q-Former connector base or adapter folder moved."""
    update: dict[str, Any] = {}
    if llm is not None:
        update["llm"] = preset.llm.model_copy(update={"checkpoint": llm})
    if adapter is not None:
        update["adapter"] = preset.adapter.model_copy(update={"path": adapter})
    if base is not None:
        update["modalities"] = {
            m: s.model_copy(update={"connector": s.connector.model_copy(update={"base": base})})
            if s.connector.base is not None
            else s
            for m, s in preset.modalities.items()
        }
    return preset.model_copy(update=update)


async def serve_one(
    preset: Preset, media: list[MediaFeatures], question: str = "What happens?"
) -> list[GenerationEvent]:
    """Load the preset's LLM side as the LLM service does and serve one greedy request."""
    from services.llm.engine import Engine
    from services.models.lm.loading import load_model

    engine = Engine(load_model(preset))
    try:
        request = GenerationRequest(
            [Turn("user", [*(MediaPart(m) for m in media), TextPart(question)])],
            SamplingParams(max_tokens=3, temperature=0.0),
        )
        return [e async for e in engine.generate(request)]
    finally:
        engine.close()


def media(modality: str, frames: int, rows: int, dim: int) -> MediaFeatures:
    features = torch.randn(frames * rows, dim, generator=torch.Generator().manual_seed(frames))
    return MediaFeatures(modality, features, tuple(float(t) for t in range(frames)))


def lm_linears(preset: Preset) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of each Linear in the twin's LM (as the seed's PEFT wraps them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(preset.llm.checkpoint))
    return {
        n: (m.in_features, m.out_features) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)
    }


def peft_lora(
    preset: Preset, targets: list[str], r: int, *, prefix: str = "", adapter: str = ""
) -> dict[str, torch.Tensor]:
    """LoRA tensors as a PeftModel names its parameters (`adapter` ".default" since PEFT 0.3),
    behind the seed's `prefix`."""
    out = {}
    for name, (in_f, out_f) in lm_linears(preset).items():
        if name.rsplit(".", 1)[-1] in targets:
            out[f"{prefix}base_model.model.{name}.lora_A{adapter}.weight"] = rand(r, in_f)
            out[f"{prefix}base_model.model.{name}.lora_B{adapter}.weight"] = rand(out_f, r)
    return out


def parameters(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.nn.Parameter]:
    """The tensors as the nn.Parameters (requires_grad) `named_parameters()` yields."""
    return OrderedDict((k, torch.nn.Parameter(v.clone())) for k, v in state.items())


def copy_tokenizer_and_config(preset: Preset, folder: Path) -> None:
    """What `llama_tokenizer.save_pretrained(path)` and `llama_model.config.save_pretrained(path)`
    put beside the delta (the twin's tokenizer and LLM config stand in for Vicuna's)."""
    for p in preset.llm.checkpoint.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")) or p.name == "config.json":
            shutil.copy2(p, folder / p.name)


# -- PandaGPT / NExT-GPT ----------------------------------------------------------------------------


def write_pandagpt(folder: Path, preset: Preset) -> dict[str, torch.Tensor]:
    """PandaGPT code/model/agent.py:49-63: `checkpoint[k] = v` for every named parameter with
    requires_grad (nn.Parameters: llama_proj and the PEFT 0.3 LoRA on q/k/v/o, openllama.py:95-105,
    113-115), `torch.save(checkpoint, f'{path}/pytorch_model.pt')`, then the tokenizer and the
    LLaMA config beside it. Returns the tensors written."""
    hidden = llm_config(preset)["hidden_size"]
    enc = next(iter(preset.modalities.values())).encoder.dim
    state = {"llama_proj.weight": rand(hidden, enc), "llama_proj.bias": rand(hidden)}
    state |= peft_lora(
        preset,
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        preset.lora.r,
        prefix="llama_model.",
        adapter=".default",
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(parameters(state), folder / "pytorch_model.pt")
    copy_tokenizer_and_config(preset, folder)
    return state


def nextgpt_projectors(preset: Preset, hidden: int) -> dict[str, torch.Tensor]:
    """gen_text_hidden_fcs{,_video,_audio}.0.* (anyToImageVideoAudio.py:112-175, one TextFcLayer
    each) at the preset's sizes."""
    from services.models.lm.output_projector import initial_projectors, preset_heads

    heads = preset_heads(preset, initial_projectors(preset, hidden))
    return {f"{h}.{k}": v.clone() for h, sd in heads.items() for k, v in sd.items()}


def write_nextgpt(folder: Path, preset: Preset, *, stage: int) -> dict[str, torch.Tensor]:
    """NExT-GPT-Lagacy code/model/agent.py:71-95: every parameter with requires_grad plus the
    output projectors and llama_proj whatever their flag, as nn.Parameters, in
    `{path}/pytorch_model.pt`, tokenizer and config beside. The embedding matrices are
    trainable in every stage (`resize_token_embeddings` after freezing makes new modules,
    anyToImageVideoAudio.py:100): under plain LLaMA names in stages 1-2 (freeze_lm, no PEFT,
    config/stage_1.yaml), under PEFT names with the LoRA in stage 3 (config/stage_3.yaml)."""
    hidden = llm_config(preset)["hidden_size"]
    vocab = llm_config(preset)["vocab_size"]
    state = {"llama_proj.weight": rand(hidden, 32), "llama_proj.bias": rand(hidden)}
    state |= nextgpt_projectors(preset, hidden)
    lm = "llama_model.base_model.model." if stage == 3 else "llama_model."
    state |= {
        f"{lm}model.embed_tokens.weight": rand(vocab, hidden),
        f"{lm}lm_head.weight": rand(vocab, hidden),
    }
    if stage == 3:
        state |= peft_lora(
            preset,
            ["q_proj", "k_proj", "v_proj", "o_proj"],
            preset.lora.r,
            prefix="llama_model.",
            adapter=".default",
        )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(parameters(state), folder / "pytorch_model.pt")
    copy_tokenizer_and_config(preset, folder)
    return state


# -- VideoChat ------------------------------------------------------------------------------------


@contextlib.contextmanager
def seed_easydict() -> Iterator[type]:
    """VideoChat's EasyDict class as its pickles name it: `utils.easydict.EasyDict` (video_chat
    utils/config.py:17 imports its own utils/easydict.py), registered while the test pickles.

    Like the seed's (utils/easydict.py:113-133), setting an attribute sets the item too and
    turns nested dicts into EasyDicts, so the pickle holds both (SETITEMS and BUILD)."""

    class EasyDict(dict):  # type: ignore[type-arg]
        def __init__(self, d: dict[str, Any] | None = None, **kwargs: Any) -> None:
            for k, v in {**(d or {}), **kwargs}.items():
                setattr(self, k, v)

        def __setattr__(self, name: str, value: Any) -> None:
            if isinstance(value, dict) and not isinstance(value, EasyDict):
                value = EasyDict(value)
            elif isinstance(value, list | tuple):
                value = [EasyDict(x) if isinstance(x, dict) else x for x in value]
            super().__setattr__(name, value)
            super().__setitem__(name, value)

        __setitem__ = __setattr__  # type: ignore[assignment]

    EasyDict.__module__, EasyDict.__qualname__ = "utils.easydict", "EasyDict"
    utils, easydict = types.ModuleType("utils"), types.ModuleType("utils.easydict")
    easydict.EasyDict = EasyDict  # type: ignore[attr-defined]
    utils.easydict = easydict  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("utils", "utils.easydict")}
    sys.modules.update({"utils": utils, "utils.easydict": easydict})
    try:
        yield EasyDict
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def videochat_trained(preset: Preset) -> dict[str, torch.Tensor]:
    """The parameters VideoChat_it trains (video_chat models/videochat_it.py): the Global MHRA
    and its cls token (every `mhra` name stays trainable, :77-86), ln_vision (left open,
    :87), extra_query_tokens (:114-116), llama_proj (:159-161). The ViT, Q-Former, queries and
    LLaMA are frozen (:89-96, :118-124, :154-156)."""
    from services.models.connectors.gmhra import TemporalGMHRA

    spec = preset.modalities["video"]
    q = spec.connector.qformer
    assert q is not None
    width, hidden = spec.encoder.dim, llm_config(preset)["hidden_size"]
    gmhra = TemporalGMHRA(width, q.gmhra_heads, num_layers=q.gmhra_layers).state_dict()
    state = {"visual_encoder.gmhra_cls_token": rand(1, 1, width)}
    state |= {
        f"visual_encoder.gmhra.{k.removeprefix('layers.')}": rand(*v.shape)
        for k, v in gmhra.items()
        if k != "cls_token"
    }
    state |= {"ln_vision.weight": 1 + rand(width), "ln_vision.bias": rand(width)}
    state |= {"extra_query_tokens": rand(1, q.num_extra_query_tokens, q.width)}
    state |= {"llama_proj.weight": rand(hidden, q.width), "llama_proj.bias": rand(hidden)}
    return state


def write_videochat(
    path: Path, preset: Preset, *, extra: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """video_chat tasks/train.py:180-203: `model_without_ddp.state_dict()` less the parameters that
    do not require grad (so every persistent buffer stays: the LLaMA's rotary `inv_freq`,
    models/modeling_llama.py:81, and the Q-Former's `embeddings.position_ids`, models/Qformer.py:70),
    with the optimizer, scheduler and scaler states, the `config` EasyDict, epoch and global
    step, in one `torch.save`. Returns the trained tensors."""
    trained = videochat_trained(preset)
    cfg = llm_config(preset)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    buffers = {
        f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": 1.0
        / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for i in range(cfg["num_hidden_layers"])
    }
    buffers["Qformer.bert.embeddings.position_ids"] = torch.arange(512).expand((1, -1))
    model = OrderedDict(sorted({**trained, **buffers}.items()))
    params = [torch.nn.Parameter(v.clone()) for v in trained.values()]
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), weight_decay=0.02)
    sum(p.sum() for p in params).backward()  # type: ignore[union-attr]
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with seed_easydict() as easydict:
        config = easydict(
            {
                "model": {"model_cls": "VideoChat_it", "num_query_token": 32, "extra_num_query_token": 64, "gmhra_layers": 8, "freeze_qformer": True},
                "optimizer": {"opt": "adamW", "lr": 2e-5, "opt_betas": [0.9, 0.999], "different_lr": {"enable": False, "module_names": []}},
                "scheduler": {"sched": "cosine", "epochs": 3},
                "train_file": [["./anno/videochat_instruct_11k.json", "your_data_path/WebVid10M", "video"]],
                "fp16": True, "output_dir": "out", "pretrained_path": "",
            }
        )  # fmt: skip
        save_obj = {
            "model": model,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 3},
            "config": config,
            "epoch": 2,
            "global_step": 1234,
            **(extra or {}),
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(save_obj, path)
    return trained


# -- E.T. Chat ------------------------------------------------------------------------------------


def lavis_bert(
    prefix: str, *, width: int, mlp: int, layers: int, vocab: int, positions: int
) -> dict[str, torch.Tensor]:
    """E.T. Chat's Q-Former BERT (etchat/model/qformer.py, LAVIS's): embeddings (word, position,
    LayerNorm; the `position_ids` buffer is added by the writers), per layer self-attention,
    cross-attention every 2nd layer (etchat_arch.py:42), the text FFN (intermediate/output) and
    the query FFN (intermediate_query/output_query). No `cls` head: BertLMHeadModel there defines
    none."""
    sd = {
        "embeddings.word_embeddings.weight": rand(vocab, width),
        "embeddings.position_embeddings.weight": rand(positions, width),
        "embeddings.LayerNorm.weight": 1 + rand(width),
        "embeddings.LayerNorm.bias": rand(width),
    }
    for i in range(layers):
        for a in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            for n in ("query", "key", "value"):
                sd[f"encoder.layer.{i}.{a}.self.{n}.weight"] = rand(width, width)
                sd[f"encoder.layer.{i}.{a}.self.{n}.bias"] = rand(width)
            sd[f"encoder.layer.{i}.{a}.output.dense.weight"] = rand(width, width)
            sd[f"encoder.layer.{i}.{a}.output.dense.bias"] = rand(width)
            sd[f"encoder.layer.{i}.{a}.output.LayerNorm.weight"] = 1 + rand(width)
            sd[f"encoder.layer.{i}.{a}.output.LayerNorm.bias"] = rand(width)
        for suffix in ("", "_query"):
            sd[f"encoder.layer.{i}.intermediate{suffix}.dense.weight"] = rand(mlp, width)
            sd[f"encoder.layer.{i}.intermediate{suffix}.dense.bias"] = rand(mlp)
            sd[f"encoder.layer.{i}.output{suffix}.dense.weight"] = rand(width, mlp)
            sd[f"encoder.layer.{i}.output{suffix}.dense.bias"] = rand(width)
            sd[f"encoder.layer.{i}.output{suffix}.LayerNorm.weight"] = 1 + rand(width)
            sd[f"encoder.layer.{i}.output{suffix}.LayerNorm.bias"] = rand(width)
    return {f"{prefix}{k}": v for k, v in sd.items()}


def etchat_qformer(preset: Preset) -> dict[str, torch.Tensor]:
    """Every Q-Former tensor of ETChatMetaModel.build_mm_projector (etchat_arch.py:32-52) under
    its `model.` name: qformer_bert (with the persistent position_ids buffer, qformer.py:33),
    qformer_query, qformer_ln, qformer_proj and the q/k/v projections (LayerNorm + Linear)."""
    spec = preset.modalities["video"]
    q = spec.connector.qformer
    assert q is not None
    vision, hidden = spec.encoder.dim, llm_config(preset)["hidden_size"]
    state = lavis_bert(
        "model.qformer_bert.bert.", width=q.width, mlp=q.mlp_dim, layers=q.layers, vocab=q.vocab_size,
        positions=q.max_text_positions,
    )  # fmt: skip
    state["model.qformer_bert.bert.embeddings.position_ids"] = torch.arange(q.max_text_positions).expand(
        (1, -1)
    )
    state |= {"model.qformer_query": rand(1, q.num_query_tokens, q.width)}
    state |= {"model.qformer_ln.weight": 1 + rand(vision), "model.qformer_ln.bias": rand(vision)}
    state |= {"model.qformer_proj.weight": rand(vision, q.width), "model.qformer_proj.bias": rand(vision)}
    for name, out in (("q", vision), ("k", vision), ("v", hidden)):
        state |= {
            f"model.qformer_{name}_proj.0.weight": 1 + rand(vision), f"model.qformer_{name}_proj.0.bias": rand(vision),
            f"model.qformer_{name}_proj.1.weight": rand(out, vision), f"model.qformer_{name}_proj.1.bias": rand(out),
        }  # fmt: skip
    return state


def etchat_heads(hidden: int) -> dict[str, torch.Tensor]:
    """frm_head / vid_head (etchat_arch.py:92-99): LayerNorm, Linear(h, h/2), GELU, Linear(h/2, h)."""
    out = {}
    for head in ("frm_head", "vid_head"):
        out |= {
            f"{head}.0.weight": 1 + rand(hidden), f"{head}.0.bias": rand(hidden),
            f"{head}.1.weight": rand(hidden // 2, hidden), f"{head}.1.bias": rand(hidden // 2),
            f"{head}.3.weight": rand(hidden, hidden // 2), f"{head}.3.bias": rand(hidden),
        }  # fmt: skip
    return out


def eva_tower(width: int) -> dict[str, torch.Tensor]:
    """A few tensors of the frozen EVA-ViT-g under ETChatMetaModel (etchat_arch.py:31;
    vision_encoder/eva_vit.py:410-431 nests VisionTransformer as `vision_tower`)."""
    p = "model.vision_tower.vision_tower."
    return {
        f"{p}cls_token": rand(1, 1, width), f"{p}pos_embed": rand(1, 5, width),
        f"{p}patch_embed.proj.weight": rand(width, 3, 14, 14), f"{p}blocks.0.norm1.weight": rand(width),
    }  # fmt: skip


def etchat_config(preset: Preset, tokenizer: Any, *, stage: int) -> dict[str, Any]:
    """config.json of ETChatPhi3ForCausalLM: the Phi-3 config, model_type etchat_phi3
    (language_model/phi3.py:10), the model arguments of the stage's script (train.py:28-44
    written by :408, scripts/train_stage_{2,3}.sh), load_base_models False (etchat_trainer.py:191)
    and, with use_matching, match_token_id (train.py:457)."""
    config = llm_config(preset) | {"model_type": "etchat_phi3", "architectures": ["ETChatPhi3ForCausalLM"]}
    config |= {
        "model_name_or_path": f"work_dirs/etchat-stage-{stage - 1}", "language_model": "phi3", "conv_type": "phi3",
        "vision_tower": "eva_vit", "vision_processor": "clip_center_224", "vision_output_layer": -2,
        "vision_output_token": "patch", "mm_projector": "qformer", "pretrain_vision_tower": None,
        "pretrain_qformer": None, "pretrain_projector": None, "use_matching": stage == 3, "use_time_tag": False,
        "bi_attention": stage == 3, "alpha": 2.0, "load_base_models": False,
    }  # fmt: skip
    if stage == 3:
        config["match_token_id"] = tokenizer.convert_tokens_to_ids("<vid>")
    return config


def save_tokenizer(preset: Preset, folder: Path, *, vid: bool) -> Any:
    """The twin's tokenizer as the seed saves it; without `<vid>` before stage 3 (train.py:455-458
    adds it only with use_matching)."""
    from transformers import AutoTokenizer

    from services.models.tiny import build_tokenizer

    twin = AutoTokenizer.from_pretrained(preset.llm.checkpoint)
    if not vid:
        specials = [t for t in twin.all_special_tokens if t not in ("<s>", "</s>", "<unk>", "<pad>", "<vid>")]
        twin = build_tokenizer(specials)
    twin.save_pretrained(folder)
    return twin


def write_etchat_full(
    folder: Path, preset: Preset, *, stage: int = 3, shards: int = 2
) -> dict[str, torch.Tensor]:
    """etchat/train/etchat_trainer.py:187-205 (`--save_full_model True`): the model with its LoRA
    merged, `base_model.model.` stripped, saved by the HF Trainer (`_save`: save_pretrained in
    safetensors shards with an index, the tokenizer, training_args.bin; `save_state` writes
    trainer_state.json). Keys: the Phi-3 (the twin's weights stand in for the merged LLM), the
    frozen EVA, the whole Q-Former, the heads (stage 3). Returns every tensor written."""
    folder.mkdir(parents=True)
    tokenizer = save_tokenizer(preset, folder, vid=stage == 3)
    hidden = llm_config(preset)["hidden_size"]
    state = load_file(str(preset.llm.checkpoint / "model.safetensors"))
    state |= eva_tower(preset.modalities["video"].encoder.dim) | etchat_qformer(preset)
    if stage == 3:
        state |= etchat_heads(hidden)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in state.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(etchat_config(preset, tokenizer, stage=stage)))
    shutil.copy2(preset.llm.checkpoint / "generation_config.json", folder / "generation_config.json")
    torch.save(argparse.Namespace(output_dir=str(folder), save_full_model=True), folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    return state


def write_etchat_adapter(
    folder: Path, preset: Preset
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """etchat/train/etchat_trainer.py:206-219, stage 3 (ZeRO-3 with LoRA, or a checkpoint-N/):
    the PEFT adapter (`save_pretrained(state_dict=gather_lora_params(...))`: PEFT drops the
    adapter name, adapter_model.safetensors + adapter_config.json), the config, generation
    config and tokenizer, and `pytorch_model.safetensors` with every non-LoRA trainable of
    tuning_mode `attention` + use_matching (train.py:467-476): the Q-Former's attention
    sub-modules, qformer_query, qformer_ln, the projections, embed_tokens, lm_head and the heads,
    under the PeftModel's names. Returns (partial tensors without the prefix, LoRA)."""
    folder.mkdir(parents=True)
    tokenizer = save_tokenizer(preset, folder, vid=True)
    cfg = llm_config(preset)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    qformer = etchat_qformer(preset)
    partial = {
        k: v for k, v in qformer.items()
        if "attention" in k or not k.startswith("model.qformer_bert")
    }  # fmt: skip
    partial |= {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden)}
    partial |= etchat_heads(hidden)
    save_file(
        {f"base_model.model.{k}": v for k, v in partial.items()}, str(folder / "pytorch_model.safetensors")
    )
    lora = peft_lora(preset, list(preset.lora.targets), preset.lora.r)
    save_file(lora, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": preset.lora.r, "lora_alpha": preset.lora.alpha,
        "lora_dropout": preset.lora.dropout, "bias": "none", "target_modules": list(preset.lora.targets),
        "base_model_name_or_path": "work_dirs/etchat-stage-2", "modules_to_save": None, "use_dora": False,
    }))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(etchat_config(preset, tokenizer, stage=3)))
    shutil.copy2(preset.llm.checkpoint / "generation_config.json", folder / "generation_config.json")
    return partial, lora


# -- EventGPT -------------------------------------------------------------------------------------


def write_eventgpt(
    folder: Path, preset: Preset, *, start_end: bool = True, tokens_saved: bool = True
) -> dict[str, torch.Tensor]:
    """An EventChatModel's `save_pretrained` folder (EventGPT model/EventChatModel.py:17-27,
    61-81 at inference-time sizes): config.json with model_type EventChat_llama (:41-42) and the
    fields initialize_vision_modules writes (:101-104), the tokens initialize_vision_tokenizer
    adds (:193-200: `<ev_patch>`, and `<ev_start>`/`<ev_end>` with mm_use_im_start_end) and the
    embeddings resized to them, the LLaMA weights, the CLIP tower, `model.visual_projector.{0,2}`
    and `model.feature_adaptor`. `tokens_saved=False`: a folder whose tokenizer lacks them (the
    inference script adds them at load, inference.py:35-39). Returns the projector and adaptor
    tensors."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(preset.llm.checkpoint)
    if tokens_saved:
        tokenizer.add_tokens(["<ev_patch>"], special_tokens=True)
    if start_end and tokens_saved:
        tokenizer.add_tokens(["<ev_start>", "<ev_end>"], special_tokens=True)
    tokenizer.save_pretrained(folder)
    cfg = llm_config(preset)
    hidden, old = cfg["hidden_size"], cfg["vocab_size"]
    state = load_file(str(preset.llm.checkpoint / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        grown = state[key].mean(0, keepdim=True).expand(len(tokenizer) - old, -1)
        state[key] = torch.cat([state[key], grown])
    clip = preset.modalities["event"].encoder.dim
    mine = {
        "model.visual_projector.0.weight": rand(hidden, clip), "model.visual_projector.0.bias": rand(hidden),
        "model.visual_projector.2.weight": rand(hidden, hidden), "model.visual_projector.2.bias": rand(hidden),
        "model.feature_adaptor.weight": rand(hidden, hidden), "model.feature_adaptor.bias": rand(hidden),
    }  # fmt: skip
    tower = "model.visual_tower.visual_tower.vision_model."
    state |= mine | {
        f"{tower}embeddings.class_embedding": rand(clip),
        f"{tower}post_layernorm.weight": rand(clip),
    }
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = cfg | {
        "model_type": "EventChat_llama",
        "architectures": ["EventChatModel"],
        "vocab_size": len(tokenizer),
    }
    config |= {"mm_visual_tower": "openai/clip-vit-large-patch14-336", "event_feature_adaptor": True}
    config |= {"mm_use_im_start_end": start_end, "mm_use_im_patch_token": True}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy2(preset.llm.checkpoint / "generation_config.json", folder / "generation_config.json")
    return mine
