"""Loading a preset: frozen LM, strict connector weights, bundle checks, context cap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPreconditionError
from services.common.presets import AdapterSpec, Preset
from services.models.checkpoints.bundle import write_bundle
from services.models.connectors.connector import build_connector
from services.models.lm.loading import LoadedModel, load_connectors, load_model
from services.models.lm.model import FeatureLayout


def test_tiny_preset_loads_frozen(loaded: LoadedModel) -> None:
    model = loaded.model
    assert not model.training and not model.lm.training
    assert not any(p.requires_grad for p in model.parameters())
    assert set(model.connectors) == {"image"}
    assert model.layouts == {"image": FeatureLayout("image", 16, 64, 1, None)}
    assert loaded.bundle.ref == "tiny@1"
    assert loaded.eos_ids == {loaded.tokenizer.eos_token_id}
    assert loaded.prompt_builder.modalities["image"].placeholder_id == loaded.tokenizer.convert_tokens_to_ids(
        "<image>"
    )
    assert loaded.max_context_tokens == 1024


def test_connector_weights_come_from_the_bundle(loaded: LoadedModel) -> None:
    weights = loaded.bundle.connectors["image"]
    for key, value in loaded.model.connectors["image"].state_dict().items():
        assert torch.equal(value, weights[key])


def good_weights() -> dict[str, dict[str, torch.Tensor]]:
    return {"image": build_connector("mlp2x_gelu", in_dim=64, out_dim=64).state_dict()}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: w.pop("image"), "no connector weights for 'image'; it has []"),
        (lambda w: w["image"].pop("fc2.bias"), "image connector: missing key 'fc2.bias'"),
        (lambda w: w["image"].update(extra=torch.zeros(1)), "image connector: unexpected key 'extra'"),
        (
            lambda w: w["image"].update({"fc1.weight": torch.zeros(64, 32)}),
            "image connector: fc1.weight: expected shape (64, 64), got (64, 32)",
        ),
    ],
)
def test_connector_weights_are_loaded_strictly(tiny_preset: Preset, edit, message: str) -> None:
    weights = good_weights()
    load_connectors(tiny_preset, weights, llm_dim=64, dtype=torch.float32)
    edit(weights)
    with pytest.raises(FailedPreconditionError) as e:
        load_connectors(tiny_preset, weights, llm_dim=64, dtype=torch.float32)
    assert message in e.value.message


def test_bundle_for_another_base_model_is_refused(tiny_preset: Preset, tmp_path: Path) -> None:
    bundle = write_bundle(
        tmp_path / "other" / "1", name="other", version="1", preset="tiny",
        base_fingerprint="0" * 64, connectors=good_weights(),
    )  # fmt: skip
    preset = tiny_preset.model_copy(update={"adapter": AdapterSpec(name="other", path=bundle)})
    with pytest.raises(FailedPreconditionError, match="built for base model 000000000000"):
        load_model(preset)


def test_context_is_capped_by_the_lm_positions(tiny_preset: Preset) -> None:
    llm = tiny_preset.llm.model_copy(update={"max_context_tokens": 4096})
    loaded = load_model(tiny_preset.model_copy(update={"llm": llm}))
    assert loaded.max_context_tokens == 1024
    assert loaded.prompt_builder.max_context_tokens == 1024


def test_qformer_connector_is_base_plus_bundle(twin) -> None:
    from safetensors.torch import load_file

    preset = twin("tiny-videochat")
    loaded = load_model(preset)
    conn = loaded.model.connectors["qformer"]
    base = load_file(str(preset.modalities["video"].connector.base))
    trained = loaded.bundle.connectors["qformer"]
    assert set(base) & set(trained) == set()
    assert set(base) | set(trained) == set(conn.state_dict())
    for key, value in {**base, **trained}.items():
        assert torch.equal(conn.state_dict()[key], value), key
    # a bundle that also holds trained base tensors overrides the base
    override = dict(trained) | {"ln_vision.weight": torch.full_like(base["ln_vision.weight"], 2.0)}
    conns = load_connectors(preset, {"qformer": override}, llm_dim=32, dtype=torch.float32)
    assert torch.equal(conns["qformer"].state_dict()["ln_vision.weight"], override["ln_vision.weight"])


def test_qformer_base_problems_are_named(twin, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    preset = twin("tiny-videochat")
    weights = {"qformer": load_model(preset).bundle.connectors["qformer"]}
    bad = tmp_path / "bad.safetensors"
    save_file({"query_tokens": torch.zeros(1, 3, 32)}, str(bad))
    for base, message in [
        (tmp_path / "missing.safetensors", "its base file"),
        (bad, "query_tokens: expected shape (1, 4, 32), got (1, 3, 32)"),
    ]:
        conn = preset.modalities["video"].connector.model_copy(update={"base": base})
        mods = {m: s.model_copy(update={"connector": conn}) for m, s in preset.modalities.items()}
        with pytest.raises(FailedPreconditionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_connectors(
                preset.model_copy(update={"modalities": mods}), weights, llm_dim=32, dtype=torch.float32
            )
    with pytest.raises(
        FailedPreconditionError, match=r"'video\.proj\.weight' is no connector of preset tiny-videochat"
    ):
        load_connectors(
            preset, weights | {"video": {"proj.weight": torch.zeros(1)}}, llm_dim=32, dtype=torch.float32
        )


def test_phi3_takes_lora_on_qkv_proj_and_o_proj(twin, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from services.llm.adapter_manager import AdapterManager
    from services.models.checkpoints.bundle import base_fingerprint

    preset = twin("tiny-etchat")
    loaded = load_model(preset)
    assert type(loaded.model.lm).__name__ == "Phi3ForCausalLM"
    assert loaded.tokenizer.convert_tokens_to_ids("<|end|>") in loaded.eos_ids
    lm = load_model(preset).model.lm  # a second copy: PEFT wraps it
    peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"]))
    for name, p in peft_lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    bundle = tmp_path / "2"
    peft_lm.save_pretrained(str(bundle / "lora"))
    write_bundle(
        bundle, name=preset.adapter.name, version="2", preset=preset.name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint), connectors=dict(loaded.bundle.connectors),
    )  # fmt: skip
    manager = AdapterManager(loaded)
    version = manager.load(bundle)
    assert version.lora_name is not None
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.inference_mode():
        manager.select(manager.start)
        plain = loaded.model.lm(input_ids=ids).logits
        manager.select(version)
        tuned = loaded.model.lm(input_ids=ids).logits
    assert not torch.allclose(plain, tuned)


def test_a_missing_lm_folder_is_named_not_taken_for_a_hub_id(tiny_preset: Preset, tmp_path: Path) -> None:
    for folder in (tmp_path / "absent", tmp_path):
        preset = tiny_preset.model_copy(
            update={"llm": tiny_preset.llm.model_copy(update={"checkpoint": folder})}
        )
        with pytest.raises(
            FailedPreconditionError, match=r"llm.checkpoint: expected a Hugging Face model folder"
        ):
            load_model(preset)


@pytest.mark.parametrize("setting", ["checkpoint", "none"])
def test_sliding_window_is_the_checkpoints_or_none(twin, tmp_path: Path, setting: str) -> None:
    """`llm.sliding_window: none` (E.T. Chat, whose eager Phi-3 on transformers 4.44 had no
    window) lets the last position see the first token past the config's window."""
    import json
    import shutil

    from services.models.lm.loading import load_lm

    preset = twin("tiny-etchat")
    folder = tmp_path / "llm"
    shutil.copytree(preset.llm.checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = window = 3
    (folder / "config.json").write_text(json.dumps(config))
    llm = preset.llm.model_copy(update={"checkpoint": folder, "sliding_window": setting})
    _, lm = load_lm(preset.model_copy(update={"llm": llm}), dtype=torch.float32)
    assert lm.config.sliding_window == (window if setting == "checkpoint" else None)
    length = (window - 1) * lm.config.num_hidden_layers + 2  # past what the window lets through
    ids = torch.arange(5, 5 + length).view(1, -1)
    other = ids.clone()
    other[0, 0] = 4
    with torch.inference_mode():
        last = lm(input_ids=ids).logits[0, -1]
        changed = lm(input_ids=other).logits[0, -1]
    assert torch.allclose(last, changed) is (setting == "checkpoint")
