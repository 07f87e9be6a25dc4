"""What trains: LoRA targets and injection, and the one place that decides what trains
(freezing, learning rate per group, refusal of empty or overlapping groups)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from services.common.presets import LoraSpec
from services.models.lm.training_params import ParamGroup, add_lora, lora_target_names, select_trainable
from tests.unit.services.models.lm.training_support import WIDTH, make_model

# -- LoRA -----------------------------------------------------------------------------------------


def test_lora_target_names_are_full_paths_of_the_llms_linear_modules(base_lm: nn.Module) -> None:
    names = lora_target_names(base_lm, ["q_proj", "down_proj"])
    assert sorted(names) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert all(isinstance(base_lm.get_submodule(n), nn.Linear) for n in names)


def test_a_lora_target_that_matches_nothing_is_named(base_lm: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"LoRA targets \['qkv', 'wq'\] match no Linear module .* 'q_proj'"):
        lora_target_names(base_lm, ["q_proj", "wq", "qkv"])
    with pytest.raises(ValueError, match=r"\['embed_tokens'\]"):  # an Embedding is not a Linear
        lora_target_names(base_lm, ["embed_tokens"])


def test_add_lora_wraps_only_the_targets_and_starts_as_the_base_model(base_lm: nn.Module) -> None:
    lm = copy.deepcopy(base_lm)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    peft_lm = add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]))
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_lm.named_parameters() if ".lora_A." in n}
    assert len(lora_modules) == 4
    assert {m.rsplit(".", 1)[-1] for m in lora_modules} == {"q_proj", "v_proj"}
    peft_lm.eval()
    with torch.no_grad():
        after = peft_lm(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-6)  # lora_B starts at zero


# -- select_trainable -----------------------------------------------------------------------------


def test_select_trainable_freezes_everything_else_with_a_learning_rate_per_group(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    model.lm = add_lora(model.lm, LoraSpec(r=2, alpha=4, dropout=0.0, targets=["q_proj"]))
    groups, counts = select_trainable(
        model,
        [
            ParamGroup("connectors", ("connectors.*",), 2e-5),
            ParamGroup("lora", ("*.lora_A.*", "*.lora_B.*"), 2e-4),
        ],
        weight_decay=0.01,
    )
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("connectors", 2e-5, 0.01),
        ("lora", 2e-4, 0.01),
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.startswith("connectors.") or ".lora_" in n
    }
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)
    connector_numel = sum(p.numel() for p in model.connectors.parameters())
    lora_numel = 2 * (2 * WIDTH + 2 * WIDTH)  # 2 layers x q_proj x (A: r x in + B: out x r), r=2
    assert counts == {"connectors": connector_numel, "lora": lora_numel}
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [connector_numel, lora_numel]


def test_select_trainable_refreezes_what_an_earlier_call_unfroze(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    select_trainable(model, [ParamGroup("all", ("*",), 1.0)], weight_decay=0.0)
    select_trainable(model, [ParamGroup("connectors", ("connectors.*",), 1e-3)], weight_decay=0.0)
    assert not any(p.requires_grad for p in model.lm.parameters())
    assert all(p.requires_grad for p in model.connectors.parameters())


def test_a_group_that_selects_nothing_is_refused(base_lm: nn.Module) -> None:
    model = make_model(base_lm)  # no LoRA injected: the stage-3 bug of training nothing
    with pytest.raises(
        ValueError, match=r"trainable group 'lora': patterns \['\*lora_\*'\] select no parameter"
    ):
        select_trainable(
            model,
            [ParamGroup("connectors", ("connectors.*",), 1e-3), ParamGroup("lora", ("*lora_*",), 2e-4)],
            weight_decay=0.0,
        )


def test_a_parameter_in_two_groups_is_refused(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    with pytest.raises(
        ValueError, match=r"parameter connectors\.image\.\S+ is selected by groups all and connectors"
    ):
        select_trainable(
            model,
            [ParamGroup("all", ("*",), 1e-4), ParamGroup("connectors", ("connectors.*",), 1e-3)],
            weight_decay=0.0,
        )
