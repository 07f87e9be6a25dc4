"""Seed checkpoints in each seed's own naming (at the tiny twins' sizes) -> adapter bundles.

Every fake checkpoint is written here key by key as the seed saves it (torch.save or
safetensors), imported for the preset's tiny twin, loaded back with `load_bundle` and compared
tensor by tensor. The LLM folder holds only the tiny LLM's config.json: the importer reads the
width and the layer shapes from it (on the meta device) and fingerprints the folder.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.content import MediaPart, TextPart, Turn
from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import Preset, load_preset
from services.llm.domain import GenerationRequest
from services.llm.sampling import SamplingParams
from services.models.checkpoints.bundle import base_fingerprint, load_bundle
from services.models.checkpoints.importers import import_checkpoint, import_qformer_base, read_state_dict
from services.models.connectors.gmhra import TemporalGMHRA
from tests.helpers import releases

H, KV, LAYERS = 64, 32, 2  # tiny LLM: width 64, 4 heads of 16, 2 KV heads -> k/v width 32


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _preset(name: str, cache: Path) -> Preset:
    """The preset with a tiny LLM config (Llama, or Phi-3 for E.T. Chat) in its LLM folder."""
    from transformers import LlamaConfig, Phi3Config

    preset = load_preset(name, cache_dir=cache)
    sizes: dict[str, Any] = dict(
        hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = Phi3Config(**sizes) if preset.llm.architecture == "phi3" else LlamaConfig(**sizes)
    config.save_pretrained(preset.llm.checkpoint)
    return preset


def _llama_lora(
    prefix: str,
    r: int,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    adapter: str = "",
) -> dict[str, torch.Tensor]:
    """LoRA tensors of a tiny Llama as PEFT names them, behind the seed's `prefix`."""
    outs = {
        "q_proj": H,
        "k_proj": KV,
        "v_proj": KV,
        "o_proj": H,
        "gate_proj": 128,
        "up_proj": 128,
        "down_proj": H,
    }
    ins = {"down_proj": 128}
    where = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    out = {}
    for i in range(LAYERS):
        for t in targets:
            m = f"{prefix}base_model.model.model.layers.{i}.{where.get(t, 'self_attn')}.{t}"
            out[f"{m}.lora_A{adapter}.weight"] = _rand(r, ins.get(t, H))
            out[f"{m}.lora_B{adapter}.weight"] = _rand(outs[t], r)
    return out


def _peft_key(seed_key: str, prefix: str) -> str:
    return seed_key.removeprefix(prefix).replace(".default.weight", ".weight")


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def _bundle(out: Path, preset: Preset):
    return load_bundle(out, expected_fingerprint=base_fingerprint(preset.llm.checkpoint))


# -- PandaGPT / NExT-GPT ------------------------------------------------------------------------


def _panda_delta() -> dict[str, torch.Tensor]:
    delta = {"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H)}
    delta.update(_llama_lora("llama_model.", 32))
    return delta


def test_pandagpt_delta_becomes_connector_and_peft_lora(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = _preset("tiny-pandagpt", tmp_path)
    delta = _panda_delta()
    torch.save(delta, tmp_path / "pytorch_model.pt")
    report = import_checkpoint("pandagpt", [tmp_path / "pytorch_model.pt"], preset, tmp_path / "b")
    bundle = _bundle(tmp_path / "b", preset)
    assert bundle.name == "tiny-pandagpt" and bundle.version == "b" and bundle.stage == "import:pandagpt"
    want = {"proj.weight": delta["llama_proj.weight"], "proj.bias": delta["llama_proj.bias"]}
    _assert_same(bundle.connectors["llama_proj"], want)
    assert bundle.lora_dir is not None
    lora = load_file(str(bundle.lora_dir / "adapter_model.safetensors"))
    _assert_same(lora, {_peft_key(k, "llama_model."): v for k, v in delta.items() if ".lora_" in k})
    config = json.loads((bundle.lora_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (32, 32, 0.1)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert report.lora_tensors == len(lora) == 2 * 4 * LAYERS
    # PEFT itself loads the folder onto the bare LM with the same tensors.
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(preset.llm.checkpoint))
    peft_lm = PeftModel.from_pretrained(lm, bundle.lora_dir)
    q: Any = peft_lm.get_submodule("base_model.model.model.layers.1.self_attn.q_proj")
    torch.testing.assert_close(
        q.lora_A["default"].weight,
        delta["llama_model.base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
    )


def test_nextgpt_keeps_output_projectors_as_heads_and_newer_peft_names(tmp_path: Path) -> None:
    preset = _preset("tiny-nextgpt", tmp_path)
    delta = {"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H)}
    delta.update(_llama_lora("llama_model.", 32, adapter=".default"))
    fcs = _nextgpt_projectors(preset)
    torch.save({**delta, **fcs}, tmp_path / "pytorch_model.pt")
    report = import_checkpoint("nextgpt", [tmp_path / "pytorch_model.pt"], preset, tmp_path / "out" / "7")
    bundle = _bundle(tmp_path / "out" / "7", preset)
    _assert_same(bundle.heads, fcs)
    assert bundle.lora_dir is not None
    lora = load_file(str(bundle.lora_dir / "adapter_model.safetensors"))
    _assert_same(lora, {_peft_key(k, "llama_model."): v for k, v in delta.items() if ".lora_" in k})
    assert "heads: gen_text_hidden_fcs, gen_text_hidden_fcs_audio, gen_text_hidden_fcs_video" in "\n".join(
        report.lines()
    )


def _nextgpt_projectors(preset: Preset) -> dict[str, torch.Tensor]:
    """The seed's gen_text_hidden_fcs{,_video,_audio}.0.* tensors for the preset's outputs."""
    from services.models.lm.output_projector import initial_projectors, preset_heads

    heads = preset_heads(preset, initial_projectors(preset, H))
    return {f"{h}.{k}": v.clone() for h, sd in heads.items() for k, v in sd.items()}


# -- bad inputs ----------------------------------------------------------------------------------


def _import_error(
    tmp_path: Path, delta: object, system: str = "pandagpt", preset: str = "tiny-pandagpt"
) -> str:
    p = _preset(preset, tmp_path)
    torch.save(delta, tmp_path / "ckpt.pt")
    with pytest.raises(InvalidArgumentError) as e:
        import_checkpoint(system, [tmp_path / "ckpt.pt"], p, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    return e.value.message


def test_missing_extra_and_misshapen_keys_are_named(tmp_path: Path) -> None:
    delta = _panda_delta()
    del delta["llama_proj.bias"]
    del delta["llama_model.base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    delta["llama_proj.weight"] = _rand(48, 32)
    delta["llama_proj.scale"] = _rand(1)
    delta["visual_hidden_fc.weight"] = _rand(2, 2)
    message = _import_error(tmp_path, delta)
    assert "missing 1 key(s) the target needs: llama_proj.bias" in message
    assert "llama_proj.weight: expected (64, 32), got (48, 32)" in message
    assert "unexpected key(s): llama_proj.scale" in message
    assert "key(s) this layout does not know: visual_hidden_fc.weight" in message
    assert (
        "missing 1 key(s) the target needs: llama_model.base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
        in message
    )


def test_lora_rank_and_layers_that_do_not_fit(tmp_path: Path) -> None:
    delta = {"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H)}
    delta.update(_llama_lora("llama_model.", 16))  # preset: r 32
    delta["llama_model.base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = _rand(32, H)
    message = _import_error(tmp_path, delta)
    assert re.search(r"q_proj\.lora_A\.weight: expected \(32, 64\), got \(16, 64\)", message)
    assert (
        "unexpected key(s): llama_model.base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"
        in message
    )


def test_long_lists_are_capped(tmp_path: Path) -> None:
    delta = _panda_delta()
    delta.update({f"junk.{i}": _rand(1) for i in range(20)})
    message = _import_error(tmp_path, delta)
    assert "20 key(s) this layout does not know" in message and "... and 12 more" in message


class _Payload:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    message = _import_error(tmp_path, {"llama_proj.weight": _Payload(marker)})
    assert not marker.exists()
    assert "refused" in message and "allow-list" in message and "Unsupported global: GLOBAL" in message
    # A plain pickle (not torch's zip format) is refused the same way.
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    with pytest.raises(InvalidArgumentError, match="refused") as info:
        read_state_dict(tmp_path / "plain.pt")
    assert not marker.exists()
    assert "()" not in str(info.value) and "pathlib.Path.touch is not on the allow-list" in str(info.value)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    preset = _preset("tiny-pandagpt", tmp_path)
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(InvalidArgumentError, match="expected a torch checkpoint or a safetensors file"):
        import_checkpoint("pandagpt", [tmp_path / "notes.pt"], preset, tmp_path / "b")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(InvalidArgumentError, match="expected a state dict"):
        import_checkpoint("pandagpt", [tmp_path / "list.pt"], preset, tmp_path / "b")
    with pytest.raises(NotFoundError, match="no such file"):
        import_checkpoint("pandagpt", [tmp_path / "absent.pt"], preset, tmp_path / "b")


def test_existing_bundle_folder_and_missing_llm_are_refused(tmp_path: Path) -> None:
    preset = _preset("tiny-pandagpt", tmp_path)
    torch.save(_panda_delta(), tmp_path / "d.pt")
    (tmp_path / "b").mkdir()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        import_checkpoint("pandagpt", [tmp_path / "d.pt"], preset, tmp_path / "b")
    (preset.llm.checkpoint / "config.json").unlink()
    with pytest.raises(NotFoundError, match=r"has no config\.json"):
        import_checkpoint("pandagpt", [tmp_path / "d.pt"], preset, tmp_path / "c")


def test_a_preset_without_the_layouts_connector_is_refused(tmp_path: Path) -> None:
    preset = _preset("tiny-videochat", tmp_path)
    torch.save(_panda_delta(), tmp_path / "d.pt")
    with pytest.raises(InvalidArgumentError, match="exactly one connector of type linear"):
        import_checkpoint("pandagpt", [tmp_path / "d.pt"], preset, tmp_path / "b")


# -- VideoChat -----------------------------------------------------------------------------------


def _videochat_model() -> dict[str, torch.Tensor]:
    gmhra = TemporalGMHRA(32, 2, num_layers=2).state_dict()
    model = {"visual_encoder.gmhra_cls_token": _rand(1, 1, 32)}
    model.update(
        {
            f"visual_encoder.gmhra.{k.removeprefix('layers.')}": _rand(*v.shape)
            for k, v in gmhra.items()
            if k != "cls_token"
        }
    )
    model.update(
        {"ln_vision.weight": _rand(32), "ln_vision.bias": _rand(32), "extra_query_tokens": _rand(1, 8, 32)}
    )
    model.update({"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H)})
    return model


def test_videochat_pth_becomes_the_qformer_connector(tmp_path: Path) -> None:
    preset = _preset("tiny-videochat", tmp_path)
    model = _videochat_model()
    torch.save({"model": model, "epoch": 2, "optimizer": {"state": {}}}, tmp_path / "videochat_7b.pth")
    import_checkpoint("videochat", [tmp_path / "videochat_7b.pth"], preset, tmp_path / "b")
    got = _bundle(tmp_path / "b", preset).connectors["qformer"]
    want = {
        "gmhra.cls_token": model["visual_encoder.gmhra_cls_token"],
        **{
            f"gmhra.layers.{k.removeprefix('visual_encoder.gmhra.')}": v
            for k, v in model.items()
            if k.startswith("visual_encoder.gmhra.")
        },
        **{k: v for k, v in model.items() if k.startswith(("ln_vision.", "extra_query"))},
        "proj.weight": model["llama_proj.weight"],
        "proj.bias": model["llama_proj.bias"],
    }
    _assert_same(got, want)
    assert "gmhra.layers.1.attn.in_proj_weight" in got


def test_videochat_mismatch_names_the_seed_keys(tmp_path: Path) -> None:
    model = _videochat_model()
    del model["visual_encoder.gmhra.1.dpe.weight"]
    model["extra_query_tokens"] = _rand(1, 64, 32)
    model["visual_encoder.gmhra.2.ln_1.weight"] = _rand(32)
    message = _import_error(tmp_path, {"model": model}, "videochat", "tiny-videochat")
    assert "missing 1 key(s) the target needs: visual_encoder.gmhra.1.dpe.weight" in message
    assert "extra_query_tokens: expected (1, 8, 32), got (1, 64, 32)" in message
    assert "unexpected key(s): visual_encoder.gmhra.2.ln_1.weight" in message


def test_videochat_checkpoint_with_objects_is_refused_by_name(tmp_path: Path) -> None:
    import argparse

    message = _import_error(
        tmp_path,
        {"model": _videochat_model(), "config": argparse.Namespace(lr=1)},
        "videochat",
        "tiny-videochat",
    )
    assert "refused" in message and "argparse.Namespace" in message


def _lavis_qformer(
    layers: int = 2, width: int = 32, mlp: int = 64, instruct_text: bool = True
) -> dict[str, torch.Tensor]:
    """A LAVIS BertModel's keys under `Qformer.bert.` (cross-attention every 2nd layer)."""
    sd = {"embeddings.LayerNorm.weight": _rand(width), "embeddings.LayerNorm.bias": _rand(width)}
    if instruct_text:
        sd.update(
            {
                "embeddings.word_embeddings.weight": _rand(512, width),
                "embeddings.position_embeddings.weight": _rand(64, width),
            }
        )
    for i in range(layers):
        parts = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for a in parts:
            for n in ("query", "key", "value"):
                sd[f"encoder.layer.{i}.{a}.self.{n}.weight"] = _rand(width, width)
                sd[f"encoder.layer.{i}.{a}.self.{n}.bias"] = _rand(width)
            sd[f"encoder.layer.{i}.{a}.output.dense.weight"] = _rand(width, width)
            sd[f"encoder.layer.{i}.{a}.output.dense.bias"] = _rand(width)
            sd[f"encoder.layer.{i}.{a}.output.LayerNorm.weight"] = _rand(width)
            sd[f"encoder.layer.{i}.{a}.output.LayerNorm.bias"] = _rand(width)
        for suffix in ("_query", "") if instruct_text else ("_query",):
            sd[f"encoder.layer.{i}.intermediate{suffix}.dense.weight"] = _rand(mlp, width)
            sd[f"encoder.layer.{i}.intermediate{suffix}.dense.bias"] = _rand(mlp)
            sd[f"encoder.layer.{i}.output{suffix}.dense.weight"] = _rand(width, mlp)
            sd[f"encoder.layer.{i}.output{suffix}.dense.bias"] = _rand(width)
            sd[f"encoder.layer.{i}.output{suffix}.LayerNorm.weight"] = _rand(width)
            sd[f"encoder.layer.{i}.output{suffix}.LayerNorm.bias"] = _rand(width)
    return sd


def test_blip2_qformer_becomes_the_connector_base_file(tmp_path: Path) -> None:
    preset = _preset("tiny-videochat", tmp_path)
    bert = _lavis_qformer()  # BLIP-2 stage-1 weights carry the text parts too
    ckpt = {f"Qformer.bert.{k}": v for k, v in bert.items()}
    ckpt.update(
        {
            "query_tokens": _rand(1, 4, 32),
            "Qformer.cls.predictions.bias": _rand(512),
            "t5_proj.weight": _rand(4, 4),
        }
    )
    torch.save({"model": ckpt}, tmp_path / "blip2.pth")
    report = import_qformer_base(
        "blip2-qformer", [tmp_path / "blip2.pth"], preset, tmp_path / "base.safetensors"
    )
    base = load_file(str(tmp_path / "base.safetensors"))
    assert torch.equal(base["qformer.layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    assert torch.equal(
        base["qformer.encoder.layer.0.crossattention.attention.key.weight"],
        bert["encoder.layer.0.crossattention.self.key.weight"],
    )
    assert torch.equal(
        base["qformer.encoder.layer.1.output_query.dense.weight"],
        bert["encoder.layer.1.output_query.dense.weight"],
    )
    assert torch.equal(base["query_tokens"], ckpt["query_tokens"])
    assert not any(".output.dense" in k and "attention" not in k for k in base)  # the text FFN was left out
    assert any(
        "encoder.layer.0.intermediate.dense.weight" in k for keys in report.skipped.values() for k in keys
    )


# -- LLaVA ---------------------------------------------------------------------------------------


def test_llava_projector_and_peft_adapter(tmp_path: Path) -> None:
    preset = _preset("tiny", tmp_path)
    trainables = {
        "base_model.model.model.mm_projector.0.weight": _rand(H, 64),
        "base_model.model.model.mm_projector.0.bias": _rand(H),
        "base_model.model.model.mm_projector.2.weight": _rand(H, H),
        "base_model.model.model.mm_projector.2.bias": _rand(H),
    }
    run = tmp_path / "llava-lora"
    run.mkdir()
    torch.save(trainables, run / "non_lora_trainables.bin")
    lora = _llama_lora("", 16, ("q_proj", "v_proj", "down_proj"))
    torch.save(lora, run / "adapter_model.bin")  # older PEFT saves .bin
    (run / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "none"}))  # fmt: skip
    import_checkpoint("llava", [run], preset, tmp_path / "b")
    bundle = _bundle(tmp_path / "b", preset)
    _assert_same(bundle.connectors["image"], {
        "fc1.weight": trainables["base_model.model.model.mm_projector.0.weight"],
        "fc1.bias": trainables["base_model.model.model.mm_projector.0.bias"],
        "fc2.weight": trainables["base_model.model.model.mm_projector.2.weight"],
        "fc2.bias": trainables["base_model.model.model.mm_projector.2.bias"]})  # fmt: skip
    assert bundle.lora_dir is not None
    _assert_same(load_file(str(bundle.lora_dir / "adapter_model.safetensors")), lora)
    assert json.loads((bundle.lora_dir / "adapter_config.json").read_text())["r"] == 16


def test_llava_stage1_mm_projector_and_foreign_targets(tmp_path: Path) -> None:
    preset = _preset("tiny", tmp_path)
    proj = {"model.mm_projector.0.weight": _rand(H, 64), "model.mm_projector.0.bias": _rand(H),
            "model.mm_projector.2.weight": _rand(H, H), "model.mm_projector.2.bias": _rand(H)}  # fmt: skip
    torch.save(proj, tmp_path / "mm_projector.bin")
    import_checkpoint("llava", [tmp_path / "mm_projector.bin"], preset, tmp_path / "b")
    assert torch.equal(
        _bundle(tmp_path / "b", preset).connectors["image"]["fc2.bias"], proj["model.mm_projector.2.bias"]
    )
    assert _bundle(tmp_path / "b", preset).lora_dir is None
    # A LoRA on modules the preset does not train is refused.
    run = tmp_path / "run"
    run.mkdir()
    torch.save(proj, run / "non_lora_trainables.bin")
    save_file(_llama_lora("", 16, ("q_proj",)), str(run / "adapter_model.safetensors"))
    (run / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "lm_head"]})
    )
    with pytest.raises(
        InvalidArgumentError,
        match=r"lora targets: expected a subset of the preset's .*got also \['lm_head'\]",
    ):
        import_checkpoint("llava", [run], preset, tmp_path / "c")


# -- E.T. Chat -----------------------------------------------------------------------------------


def test_etchat_folder_becomes_connector_heads_and_lora(tmp_path: Path) -> None:
    preset = _preset("tiny-etchat", tmp_path)
    bert = _lavis_qformer()
    partial = {f"model.qformer_bert.bert.{k}": v for k, v in bert.items()}
    partial.update({
        "model.qformer_query": _rand(1, 4, 32), "model.qformer_ln.weight": _rand(32), "model.qformer_ln.bias": _rand(32),
        "model.qformer_proj.weight": _rand(32, 32), "model.qformer_proj.bias": _rand(32),
        "model.embed_tokens.weight": _rand(512, H), "lm_head.weight": _rand(512, H),
    })  # fmt: skip
    for name, out in (("q", 32), ("k", 32), ("v", H)):
        partial.update({f"model.qformer_{name}_proj.0.weight": _rand(32), f"model.qformer_{name}_proj.0.bias": _rand(32),
                        f"model.qformer_{name}_proj.1.weight": _rand(out, 32), f"model.qformer_{name}_proj.1.bias": _rand(out)})  # fmt: skip
    heads = {}
    for head in ("frm_head", "vid_head"):
        heads.update({f"{head}.0.weight": _rand(H), f"{head}.0.bias": _rand(H), f"{head}.1.weight": _rand(H // 2, H),
                      f"{head}.1.bias": _rand(H // 2), f"{head}.3.weight": _rand(H, H // 2), f"{head}.3.bias": _rand(H)})  # fmt: skip
    partial.update(heads)
    run = tmp_path / "etchat-stage-3"
    run.mkdir()
    save_file(
        {f"base_model.model.{k}": v for k, v in partial.items()}, str(run / "pytorch_model.safetensors")
    )
    lora = {}
    for i in range(LAYERS):
        m = f"base_model.model.model.layers.{i}.self_attn"
        lora.update({f"{m}.qkv_proj.lora_A.weight": _rand(16, H), f"{m}.qkv_proj.lora_B.weight": _rand(H + 2 * KV, 16),
                     f"{m}.o_proj.lora_A.weight": _rand(16, H), f"{m}.o_proj.lora_B.weight": _rand(H, 16)})  # fmt: skip
    save_file(lora, str(run / "adapter_model.safetensors"))
    (run / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["qkv_proj", "o_proj"]})
    )
    report = import_checkpoint("etchat", [run], preset, tmp_path / "b")
    bundle = _bundle(tmp_path / "b", preset)
    got = bundle.connectors["video"]
    assert torch.equal(got["query_tokens"], partial["model.qformer_query"])
    assert torch.equal(got["ln_vision.weight"], partial["model.qformer_ln.weight"])
    assert torch.equal(got["v_proj.1.weight"], partial["model.qformer_v_proj.1.weight"])
    assert torch.equal(got["qformer.embeddings.layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    assert torch.equal(
        got["qformer.embeddings.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"]
    )
    assert torch.equal(
        got["qformer.encoder.layer.0.attention.attention.query.bias"],
        bert["encoder.layer.0.attention.self.query.bias"],
    )
    assert torch.equal(
        got["qformer.encoder.layer.1.output.dense.weight"], bert["encoder.layer.1.output.dense.weight"]
    )
    _assert_same(bundle.heads, {f"timestamps.{k}": v for k, v in heads.items()})
    assert bundle.lora_dir is not None
    _assert_same(load_file(str(bundle.lora_dir / "adapter_model.safetensors")), lora)
    skipped = {k for keys in report.skipped.values() for k in keys}
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= skipped


def test_etchat_stage1_without_heads_is_refused_for_a_preset_with_timestamps(tmp_path: Path) -> None:
    preset = _preset("tiny-etchat", tmp_path)
    partial = {"model.qformer_proj.weight": _rand(32, 32), "model.qformer_proj.bias": _rand(32)}
    for name, out in (("q", 32), ("k", 32), ("v", H)):
        partial.update({f"model.qformer_{name}_proj.0.weight": _rand(32), f"model.qformer_{name}_proj.0.bias": _rand(32),
                        f"model.qformer_{name}_proj.1.weight": _rand(out, 32), f"model.qformer_{name}_proj.1.bias": _rand(out)})  # fmt: skip
    run = tmp_path / "stage1"
    run.mkdir()
    save_file(partial, str(run / "pytorch_model.safetensors"))
    with pytest.raises(InvalidArgumentError, match=r"timestamp heads: missing 12 key\(s\)"):
        import_checkpoint("etchat", [run], preset, tmp_path / "b")


# -- EventGPT ------------------------------------------------------------------------------------


def test_eventgpt_reads_only_its_keys_from_a_hf_folder_and_separate_bins(tmp_path: Path) -> None:
    preset = _preset("tiny-eventgpt", tmp_path)
    mine = {"model.visual_projector.0.weight": _rand(H, 64), "model.visual_projector.0.bias": _rand(H),
            "model.visual_projector.2.weight": _rand(H, H), "model.visual_projector.2.bias": _rand(H),
            "model.feature_adaptor.weight": _rand(H, H), "model.feature_adaptor.bias": _rand(H)}  # fmt: skip
    folder = tmp_path / "EventGPT-7b"
    folder.mkdir()
    body = {"model.layers.0.self_attn.q_proj.weight": _rand(H, H), "lm_head.weight": _rand(512, H)}
    save_file({**body, **dict(list(mine.items())[:4])}, str(folder / "model-00001-of-00002.safetensors"))
    save_file(dict(list(mine.items())[4:]), str(folder / "model-00002-of-00002.safetensors"))
    import_checkpoint("eventgpt", [folder], preset, tmp_path / "b")
    want = {
        "fc1.weight": mine["model.visual_projector.0.weight"], "fc1.bias": mine["model.visual_projector.0.bias"],
        "fc2.weight": mine["model.visual_projector.2.weight"], "fc2.bias": mine["model.visual_projector.2.bias"],
        "adaptor.weight": mine["model.feature_adaptor.weight"], "adaptor.bias": mine["model.feature_adaptor.bias"],
    }  # fmt: skip
    _assert_same(_bundle(tmp_path / "b", preset).connectors["event"], want)
    torch.save(dict(list(mine.items())[:4]), tmp_path / "mm_projector.bin")
    torch.save(dict(list(mine.items())[4:]), tmp_path / "feature_adaptor.bin")
    import_checkpoint(
        "eventgpt", [tmp_path / "mm_projector.bin", tmp_path / "feature_adaptor.bin"], preset, tmp_path / "c"
    )
    _assert_same(_bundle(tmp_path / "c", preset).connectors["event"], want)
    torch.save(dict(list(mine.items())[:4]), tmp_path / "only_projector.bin")
    with pytest.raises(
        InvalidArgumentError,
        match=r"missing 2 key.*model\.feature_adaptor\.bias, model\.feature_adaptor\.weight",
    ):
        import_checkpoint("eventgpt", [tmp_path / "only_projector.bin"], preset, tmp_path / "d")


def test_nextgpt_output_projectors_that_do_not_fit_the_preset_are_named(tmp_path: Path) -> None:
    preset = _preset("tiny-nextgpt", tmp_path)
    delta = {"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H)}
    fcs = _nextgpt_projectors(preset)
    fcs["gen_text_hidden_fcs.0.model.weight"] = _rand(768, 32)  # SD 1.5's width, preset (77, 32)
    fcs["gen_text_hidden_fcs_audio.0.query_embs"] = _rand(1, 2, 32)  # 2 rows, preset (1, 16)
    del fcs["gen_text_hidden_fcs_video.0.model.bias"]
    fcs["gen_text_hidden_fcs_video.0.tfm.encoder.layers.1.linear1.weight"] = _rand(64, 32)  # 2 layers
    fcs["gen_text_hidden_fcs_3d.0.fc.weight"] = _rand(32, H)
    message = _import_error(tmp_path, {**delta, **fcs}, system="nextgpt", preset="tiny-nextgpt")
    assert (
        "output projector image (gen_text_hidden_fcs: 4 signal tokens x 64 -> conditioning (77, 32), "
        "hidden 32): 1 shape mismatch(es): gen_text_hidden_fcs.0.model.weight: expected (32, 32), got (768, 32)"
    ) in message
    assert "gen_text_hidden_fcs_audio.0.query_embs: expected (1, 1, 32), got (1, 2, 32)" in message
    assert "missing 1 key(s) the target needs: gen_text_hidden_fcs_video.0.model.bias" in message
    assert "unexpected key(s): gen_text_hidden_fcs_video.0.tfm.encoder.layers.1.linear1.weight" in message
    assert "key(s) this layout does not know: gen_text_hidden_fcs_3d.0.fc.weight" in message


def test_nextgpt_output_projectors_the_preset_does_not_produce_are_named(tmp_path: Path) -> None:
    full = _preset("tiny-nextgpt", tmp_path)
    image_only = full.model_copy(update={"outputs": {"image": full.outputs["image"]}})
    delta = {"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H), **_nextgpt_projectors(full)}
    torch.save(delta, tmp_path / "ckpt.pt")
    with pytest.raises(InvalidArgumentError) as e:
        import_checkpoint("nextgpt", [tmp_path / "ckpt.pt"], image_only, tmp_path / "b")
    assert (
        "heads ['gen_text_hidden_fcs_audio', 'gen_text_hidden_fcs_video'] are none of the preset's outputs "
        "(image: gen_text_hidden_fcs)"
    ) in e.value.message


def test_nextgpt_output_projectors_for_a_preset_without_outputs_are_skipped(tmp_path: Path) -> None:
    nextgpt = _preset("tiny-nextgpt", tmp_path / "a")
    panda = _preset("tiny-pandagpt", tmp_path / "b")
    delta = {"llama_proj.weight": _rand(H, 32), "llama_proj.bias": _rand(H), **_nextgpt_projectors(nextgpt)}
    torch.save(delta, tmp_path / "pytorch_model.pt")
    report = import_checkpoint("nextgpt", [tmp_path / "pytorch_model.pt"], panda, tmp_path / "out" / "1")
    assert _bundle(tmp_path / "out" / "1", panda).heads == {}
    assert "the preset has no outputs" in "\n".join(report.lines())


def test_instructblip_qformer_becomes_the_etchat_connector_base_file(tmp_path: Path) -> None:
    """LAVIS InstructBLIP -> E.T. Chat's frozen Q-Former base: the text parts are kept (the
    Q-Former reads the instruction), and the file is the connector's whole frozen part."""
    from services.models.checkpoints.importers import connector_shapes

    preset = _preset("tiny-etchat", tmp_path)
    bert = _lavis_qformer(instruct_text=True)
    ckpt = {f"Qformer.bert.{k}": v for k, v in bert.items()}
    ckpt.update({
        "query_tokens": _rand(1, 4, 32), "ln_vision.weight": _rand(32), "ln_vision.bias": _rand(32),
        "llm_proj.weight": _rand(H, 32), "llm_proj.bias": _rand(H),
    })  # fmt: skip
    torch.save({"model": ckpt}, tmp_path / "instruct_blip_vicuna7b_trimmed.pth")
    spec = preset.modalities["video"].connector
    assert spec.base is not None
    report = import_qformer_base(
        "instructblip-qformer", [tmp_path / "instruct_blip_vicuna7b_trimmed.pth"], preset
    )
    assert report.output == spec.base and not report.skipped
    base = load_file(str(spec.base))
    assert torch.equal(base["qformer.embeddings.layernorm.weight"], bert["embeddings.LayerNorm.weight"])
    assert torch.equal(
        base["qformer.embeddings.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"]
    )
    assert torch.equal(
        base["qformer.encoder.layer.1.output.dense.weight"], bert["encoder.layer.1.output.dense.weight"]
    )
    assert torch.equal(base["ln_vision.bias"], ckpt["ln_vision.bias"])
    assert not any(k.startswith("llm_proj") for k in base)
    # exactly the frozen part of the connector the preset builds, each with its shape
    expected, base_keys = connector_shapes(preset, preset.modalities["video"].connector_name("video"), H)
    assert set(base) == base_keys
    assert all(tuple(base[k].shape) == expected[k] for k in base)


def test_instructblip_qformer_that_does_not_fit_is_named(tmp_path: Path) -> None:
    preset = _preset("tiny-etchat", tmp_path)
    bert = _lavis_qformer(instruct_text=False)  # a BLIP-2 Q-Former: no text parts
    torch.save({"model": {f"Qformer.bert.{k}": v for k, v in bert.items()}}, tmp_path / "blip2.pth")
    with pytest.raises(InvalidArgumentError) as e:
        import_qformer_base(
            "instructblip-qformer", [tmp_path / "blip2.pth"], preset, tmp_path / "base.safetensors"
        )
    assert (
        "missing" in e.value.message and "Qformer.bert.embeddings.word_embeddings.weight" in e.value.message
    )
    assert not (tmp_path / "base.safetensors").exists()


# -- Releases as each seed's save code writes them, at the twins' sizes, served -------------------
# (tests/helpers/releases.py writes them, citing the seed lines; the twin's LLM side is shared)


def _served(events: list[Any]) -> None:
    assert events[-1].usage is not None and events[-1].usage.completion_tokens >= 1


async def test_pandagpt_release_folder_imports_and_serves(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    preset = twin("tiny-pandagpt")
    state = releases.write_pandagpt(tmp_path / "pandagpt_7b_max_len_1024", preset)
    import_checkpoint("pandagpt", [tmp_path / "pandagpt_7b_max_len_1024"], preset, tmp_path / "b")
    bundle = _bundle(tmp_path / "b", preset)
    _assert_same(
        bundle.connectors["llama_proj"],
        {"proj.weight": state["llama_proj.weight"], "proj.bias": state["llama_proj.bias"]},
    )
    assert bundle.lora_dir is not None
    lora = load_file(str(bundle.lora_dir / "adapter_model.safetensors"))
    _assert_same(lora, {_peft_key(k, "llama_model."): v for k, v in state.items() if ".lora_" in k})
    _served(
        await releases.serve_one(
            releases.with_paths(preset, adapter=tmp_path / "b"), [releases.media("audio", 1, 1, 32)]
        )
    )


@pytest.mark.parametrize("stage", [1, 3])
async def test_nextgpt_release_takes_the_embedding_rows_in_either_form(
    twin: Callable[[str], Preset], tmp_path: Path, stage: int
) -> None:
    preset = twin("tiny-nextgpt")
    state = releases.write_nextgpt(tmp_path / "7b_tiva_v0", preset, stage=stage)
    report = import_checkpoint("nextgpt", [tmp_path / "7b_tiva_v0"], preset, tmp_path / "b")
    lm = "llama_model.base_model.model." if stage == 3 else "llama_model."
    skipped = report.skipped[next(iter(report.skipped))]
    assert sorted(skipped) == [f"{lm}lm_head.weight", f"{lm}model.embed_tokens.weight"]
    bundle = _bundle(tmp_path / "b", preset)
    assert torch.equal(
        bundle.heads["gen_text_hidden_fcs.0.model.weight"], state["gen_text_hidden_fcs.0.model.weight"]
    )
    assert (bundle.lora_dir is not None) == (stage == 3)
    _served(
        await releases.serve_one(
            releases.with_paths(preset, adapter=tmp_path / "b"), [releases.media("video", 1, 1, 32)]
        )
    )


async def test_videochat_release_with_its_buffers_and_config_imports_and_serves(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    preset = twin("tiny-videochat")
    trained = releases.write_videochat(tmp_path / "ckpt_latest.pth", preset)
    report = import_checkpoint("videochat", [tmp_path / "ckpt_latest.pth"], preset, tmp_path / "b")
    got = _bundle(tmp_path / "b", preset).connectors["qformer"]
    assert torch.equal(got["gmhra.cls_token"], trained["visual_encoder.gmhra_cls_token"])
    assert torch.equal(
        got["gmhra.layers.1.attn.in_proj_weight"], trained["visual_encoder.gmhra.1.attn.in_proj_weight"]
    )
    assert torch.equal(got["proj.weight"], trained["llama_proj.weight"])
    assert len(got) == len(trained)
    skipped = {k: why for why, keys in report.skipped.items() for k in keys}
    assert "rotary inverse frequencies" in skipped["llama_model.model.layers.1.self_attn.rotary_emb.inv_freq"]
    assert "position indices" in skipped["Qformer.bert.embeddings.position_ids"]
    _served(
        await releases.serve_one(
            releases.with_paths(preset, adapter=tmp_path / "b"), [releases.media("video", 4, 10, 32)]
        )
    )


def test_videochat_release_damaged_is_refused_by_name(twin: Callable[[str], Preset], tmp_path: Path) -> None:
    import argparse

    preset = twin("tiny-videochat")

    def refused(path: Path) -> str:
        with pytest.raises(InvalidArgumentError) as e:
            import_checkpoint("videochat", [path], preset, tmp_path / "b")
        assert not (tmp_path / "b").exists() and str(path) in e.value.message
        return e.value.message

    releases.write_videochat(tmp_path / "ok.pth", preset)
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    assert "expected a torch checkpoint or a safetensors file" in refused(tmp_path / "cut.pth")
    releases.write_videochat(tmp_path / "ns.pth", preset, extra={"args": argparse.Namespace(lr=1)})
    assert "GLOBAL argparse.Namespace is not on the allow-list" in refused(tmp_path / "ns.pth")
    model = read_state_dict(tmp_path / "ok.pth", unwrap="model")
    model["llama_proj.weight"] = model["llama_proj.weight"][:, :16]
    torch.save({"model": model}, tmp_path / "shape.pth")
    assert "llama_proj.weight: expected (32, 32), got (32, 16)" in refused(tmp_path / "shape.pth")
    releases.write_pandagpt(tmp_path / "panda", twin("tiny-pandagpt"))  # another system's release
    assert "key(s) this layout does not know: llama_model.base_model.model" in refused(
        tmp_path / "panda" / "pytorch_model.pt"
    )


@pytest.mark.parametrize("tokens_saved", [True, False])
async def test_eventgpt_release_folder_imports_and_serves_its_ev_tokens_as_single_ids(
    twin: Callable[[str], Preset], tmp_path: Path, tokens_saved: bool
) -> None:
    """mm_use_im_start_end: <ev_start>/<ev_end> are added tokens, from the release's tokenizer
    or added at load as the seed's inference.py:35-39 does."""
    from services.llm.engine import Engine
    from services.models.lm.loading import load_model

    twin_preset = twin("tiny-eventgpt")
    folder = tmp_path / "EventGPT-7b"
    mine = releases.write_eventgpt(folder, twin_preset, start_end=True, tokens_saved=tokens_saved)
    preset = releases.with_paths(twin_preset, llm=folder, adapter=tmp_path / "b")
    import_checkpoint("eventgpt", [folder], preset, tmp_path / "b")
    got = _bundle(tmp_path / "b", preset).connectors["event"]
    assert torch.equal(got["fc1.weight"], mine["model.visual_projector.0.weight"])
    assert torch.equal(got["adaptor.bias"], mine["model.feature_adaptor.bias"])
    loaded = load_model(preset)
    ids = {t: loaded.tokenizer.convert_tokens_to_ids(t) for t in ("<ev_start>", "<ev_end>", "<ev_patch>")}
    assert loaded.model.lm.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer) > max(ids.values())
    engine = Engine(loaded)
    try:
        request = GenerationRequest(
            [Turn("user", [MediaPart(releases.media("event", 5, 17, 64)), TextPart("What happens?")])],
            SamplingParams(max_tokens=3, temperature=0.0),
        )
        prompt = engine.prepare(request).prompt
        (start, length) = prompt.media_spans[0]
        # prepare_event_prompt's "<ev_start><event><ev_end>\n": the added tokens as single ids
        assert (
            prompt.input_ids[start - 1] == ids["<ev_start>"]
            and prompt.input_ids[start + length] == ids["<ev_end>"]
        )
        _served([e async for e in engine.generate(request)])
    finally:
        engine.close()


def test_eventgpt_config_with_an_unknown_model_type_is_refused_by_name(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    folder = tmp_path / "EventGPT-7b"
    releases.write_eventgpt(folder, twin("tiny-eventgpt"))
    config = json.loads((folder / "config.json").read_text()) | {"model_type": "EventChat_llama2"}
    (folder / "config.json").write_text(json.dumps(config))
    preset = releases.with_paths(twin("tiny-eventgpt"), llm=folder)
    with pytest.raises(InvalidArgumentError) as e:
        import_checkpoint("eventgpt", [folder], preset, tmp_path / "b")
    assert f"{folder / 'config.json'}: model_type: expected one transformers knows" in e.value.message
    assert "got 'EventChat_llama2'" in e.value.message and "EventChat_llama" in e.value.message
    assert not (tmp_path / "b").exists()
