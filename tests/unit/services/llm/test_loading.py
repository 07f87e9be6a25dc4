"""Loading a preset: frozen LM, strict connector weights, bundle checks, context cap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPreconditionError
from services.common.presets import AdapterSpec, Preset
from services.llm.adapters import write_bundle
from services.llm.connectors import build_connector
from services.llm.loading import LoadedModel, load_connectors, load_model


def test_tiny_preset_loads_frozen(loaded: LoadedModel) -> None:
    model = loaded.model
    assert not model.training and not model.lm.training
    assert not any(p.requires_grad for p in model.parameters())
    assert set(model.connectors) == {"image"}
    assert model.feature_shapes == {"image": (16, 64)}
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
