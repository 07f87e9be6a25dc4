"""E.T. Chat's releases at the tiny-etchat twin's sizes: the full model folder becomes the LLM
folder + the connector base + the bundle and serves; the adapter form over the stage-2 full
folder composes as the seed's build_model does; every damaged variant is refused by name with
nothing written. The releases are written by tests/helpers/releases.py (seed lines cited there).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.models.checkpoints.bundle import base_fingerprint, load_bundle
from services.models.checkpoints.importers import import_checkpoint
from tests.helpers import releases

Q = "model.qformer_bert.bert.encoder.layer."


def _targets(tmp_path: Path) -> dict[str, Path]:
    return {"llm_out": tmp_path / "models" / "phi3", "base_out": tmp_path / "models" / "qformer.safetensors"}


def _served_preset(preset: Preset, tmp_path: Path) -> Preset:
    t = _targets(tmp_path)
    return releases.with_paths(preset, llm=t["llm_out"], base=t["base_out"], adapter=tmp_path / "b")


async def test_full_folder_becomes_llm_folder_connector_base_and_bundle_and_serves(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    preset = twin("tiny-etchat")
    release = tmp_path / "ETChat-Phi3-Mini-Stage-3"
    state = releases.write_etchat_full(release, preset, stage=3)
    report = import_checkpoint("etchat", [release], preset, tmp_path / "b", **_targets(tmp_path))
    llm = _targets(tmp_path)["llm_out"]
    # the LLM folder: a plain Phi-3 (the seed's keys dropped), the release's Phi-3 tensors, its tokenizer
    config = json.loads((llm / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]
    assert "match_token_id" not in config and "bi_attention" not in config
    written = load_file(str(llm / "model.safetensors"))
    twin_llm = load_file(str(preset.llm.checkpoint / "model.safetensors"))
    _assert_equal(written, {k: state[k] for k in twin_llm})
    assert not any(k.startswith(("model.vision_tower", "model.qformer", "frm_head")) for k in written)
    assert (llm / "tokenizer.json").is_file() and (llm / "generation_config.json").is_file()
    assert not (llm / "training_args.bin").exists()
    # the connector base: the release's trained Q-Former (FFN and embeddings included), not InstructBLIP's
    base = load_file(str(_targets(tmp_path)["base_out"]))
    assert torch.equal(
        base["qformer.encoder.layer.0.intermediate_query.dense.weight"],
        state[f"{Q}0.intermediate_query.dense.weight"],
    )
    assert torch.equal(
        base["qformer.embeddings.word_embeddings.weight"],
        state["model.qformer_bert.bert.embeddings.word_embeddings.weight"],
    )
    assert torch.equal(base["query_tokens"], state["model.qformer_query"])
    with safe_open(str(_targets(tmp_path)["base_out"]), framework="pt") as f:
        assert f.metadata()["modalmesh_source"] == "etchat:ETChat-Phi3-Mini-Stage-3"
    # the bundle: the projections and the heads, fingerprinted with the new LLM folder
    bundle = load_bundle(tmp_path / "b", expected_fingerprint=base_fingerprint(llm))
    projections = [
        f"{p}.{i}.{w}" for p in ("q_proj", "k_proj", "v_proj") for i in (0, 1) for w in ("weight", "bias")
    ]
    assert sorted(bundle.connectors["video"]) == sorted(
        [*projections, "qformer_proj.bias", "qformer_proj.weight"]
    )
    assert torch.equal(bundle.connectors["video"]["v_proj.1.weight"], state["model.qformer_v_proj.1.weight"])
    assert torch.equal(bundle.heads["timestamps.vid_head.3.bias"], state["vid_head.3.bias"])
    assert bundle.lora_dir is None  # merged into the LLM by the seed (etchat_trainer.py:188-189)
    skipped = {k for keys in report.skipped.values() for k in keys}
    assert (
        "model.qformer_bert.bert.embeddings.position_ids" in skipped
        and "model.vision_tower.vision_tower.cls_token" in skipped
    )
    assert any("bi_attention" in n for n in report.notes)
    events = await releases.serve_one(
        _served_preset(preset, tmp_path), [releases.media("video", 5, 4, 32)], "when?"
    )
    assert events[-1].usage is not None and events[-1].usage.completion_tokens >= 1


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


async def test_adapter_form_over_the_stage_2_full_folder_composes_as_build_model(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    """builder.py:35-81: the base model from config.model_name_or_path (the stage-2 full folder),
    the LoRA, then the partial state dict over it."""
    preset = twin("tiny-etchat")
    stage2 = releases.write_etchat_full(tmp_path / "etchat-stage-2", preset, stage=2)
    partial, lora = releases.write_etchat_adapter(tmp_path / "etchat-stage-3", preset)
    paths = [tmp_path / "etchat-stage-3", tmp_path / "etchat-stage-2"]
    report = import_checkpoint("etchat", paths, preset, tmp_path / "b", **_targets(tmp_path))
    llm = load_file(str(_targets(tmp_path)["llm_out"] / "model.safetensors"))
    assert torch.equal(
        llm["model.embed_tokens.weight"], partial["model.embed_tokens.weight"]
    )  # stage 3 trained it
    assert torch.equal(
        llm["model.layers.0.self_attn.qkv_proj.weight"], stage2["model.layers.0.self_attn.qkv_proj.weight"]
    )
    base = load_file(str(_targets(tmp_path)["base_out"]))
    attention = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    assert torch.equal(base[attention], partial[f"{Q}0.crossattention.self.key.weight"])  # stage 3
    ffn = "qformer.encoder.layer.1.output_query.dense.weight"
    assert torch.equal(base[ffn], stage2[f"{Q}1.output_query.dense.weight"])  # stage 2, not InstructBLIP
    bundle = load_bundle(tmp_path / "b")
    assert bundle.lora_dir is not None and report.lora_tensors == len(lora)
    _assert_equal(load_file(str(bundle.lora_dir / "adapter_model.safetensors")), lora)
    assert torch.equal(bundle.heads["timestamps.frm_head.1.weight"], partial["frm_head.1.weight"])
    tokenizer_config = (_targets(tmp_path)["llm_out"] / "tokenizer.json").read_text()
    assert "<vid>" in tokenizer_config  # the stage-3 tokenizer, not stage 2's
    events = await releases.serve_one(
        _served_preset(preset, tmp_path), [releases.media("video", 3, 4, 32)], "when?"
    )
    assert events[-1].usage is not None


def test_adapter_form_alone_over_instructblips_qformer_is_refused(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    preset = twin("tiny-etchat")
    releases.write_etchat_adapter(tmp_path / "etchat-stage-3", preset)
    base = load_file(str(preset.modalities["video"].connector.base))
    save_file(
        base,
        str(tmp_path / "instructblip.safetensors"),
        metadata={"modalmesh_source": "instructblip-qformer:x.pth"},
    )
    bad = releases.with_paths(preset, base=tmp_path / "instructblip.safetensors")
    with pytest.raises(InvalidArgumentError) as e:
        import_checkpoint("etchat", [tmp_path / "etchat-stage-3"], bad, tmp_path / "b")
    assert "expected the Q-Former of work_dirs/etchat-stage-2" in e.value.message
    assert "got instructblip-qformer's original" in e.value.message and not (tmp_path / "b").exists()
    report = import_checkpoint(
        "etchat", [tmp_path / "etchat-stage-3"], preset, tmp_path / "c"
    )  # a base of unknown origin
    assert any("trained over work_dirs/etchat-stage-2" in n for n in report.notes)


def _damage_shard(release: Path, preset: Preset) -> None:
    shard = release / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 64])


def _damage_index(release: Path, preset: Preset) -> None:
    (release / "model-00002-of-00002.safetensors").unlink()


def _damage_shape(release: Path, preset: Preset) -> None:
    shard = release / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    key = next(
        k for k in state if k.endswith("qformer_v_proj.1.weight") or k.endswith("self_attn.o_proj.weight")
    )
    state[key] = state[key][:, :8].contiguous()
    save_file(state, str(shard))


def _damage_model_type(release: Path, preset: Preset) -> None:
    config = json.loads((release / "config.json").read_text()) | {"model_type": "etchat_qwen3"}
    (release / "config.json").write_text(json.dumps(config))


def _another_system(release: Path, preset: Preset) -> None:
    config = json.loads((release / "config.json").read_text()) | {"model_type": "EventChat_llama"}
    (release / "config.json").write_text(json.dumps(config))


def _no_vid(release: Path, preset: Preset) -> None:
    for p in release.glob("tokenizer*"):
        p.unlink()
    releases.save_tokenizer(preset, release, vid=False)  # a stage-2 tokenizer in a stage-3 folder


def _deepspeed(release: Path, preset: Preset) -> None:
    for p in release.glob("model*"):
        p.unlink()
    (release / "global_step500").mkdir()
    (release / "latest").write_text("global_step500")
    torch.save({}, release / "global_step500" / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_damage_shard, "model-00002-of-00002.safetensors: expected a safetensors file, got an unreadable"),
        (_damage_index, "model.safetensors.index.json: names model-00002-of-00002.safetensors, which is missing"),
        (_damage_shape, "shape mismatch(es): "),
        (_damage_model_type, "model_type: expected one transformers knows (the presets serve llama and phi3) or a seed's (EventChat_llama, etchat_phi3), got 'etchat_qwen3'"),
        (_another_system, "config.json model_type: expected 'etchat_phi3' (E.T. Chat's ETChatPhi3ForCausalLM), got 'EventChat_llama'"),
        (_no_vid, "expected '<vid>' (the preset's llm.added_tokens) as one token"),
        (_deepspeed, "a raw DeepSpeed checkpoint (latest, global_step500/), not a model's weights: convert it with zero_to_fp32.py first"),
    ],
)  # fmt: skip
def test_damaged_full_folders_are_refused_by_name_and_nothing_is_written(
    twin: Callable[[str], Preset], tmp_path: Path, damage: Callable[[Path, Preset], None], message: str
) -> None:
    preset = twin("tiny-etchat")
    release = tmp_path / "release"
    releases.write_etchat_full(release, preset, stage=3)
    damage(release, preset)
    with pytest.raises(InvalidArgumentError) as e:
        import_checkpoint("etchat", [release], preset, tmp_path / "b", **_targets(tmp_path))
    assert message in e.value.message
    assert not (tmp_path / "b").exists() and not (tmp_path / "models").exists()


def test_existing_targets_and_a_stage_2_release_for_a_timestamp_preset_are_refused(
    twin: Callable[[str], Preset], tmp_path: Path
) -> None:
    preset = twin("tiny-etchat")
    releases.write_etchat_full(tmp_path / "stage-3", preset, stage=3)
    t = _targets(tmp_path)
    t["llm_out"].mkdir(parents=True)
    (t["llm_out"] / "config.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match=r"the LLM folder .* already exists; .* pass --llm-out"):
        import_checkpoint("etchat", [tmp_path / "stage-3"], preset, tmp_path / "b", **t)
    with pytest.raises(InvalidArgumentError, match=r"the connector base .* already exists"):
        import_checkpoint("etchat", [tmp_path / "stage-3"], preset, tmp_path / "b", llm_out=tmp_path / "new")
    releases.write_etchat_full(tmp_path / "stage-2", preset, stage=2)
    with pytest.raises(InvalidArgumentError) as e:
        import_checkpoint(
            "etchat", [tmp_path / "stage-2"], preset, tmp_path / "b", **_targets(tmp_path / "x")
        )
    assert "timestamp heads: missing 12 key(s) the target needs: frm_head.0.bias" in e.value.message
    assert not (tmp_path / "b").exists() and not (tmp_path / "x").exists()
