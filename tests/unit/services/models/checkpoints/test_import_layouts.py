"""The seed key layouts alone: renames both ways, and how `split_keys` sorts a state dict.

The layouts against real releases (each seed's save code's file forms) are tested through
`import_checkpoint` in test_importers.py and test_import_full.py; these pin the pure sorting.
"""

from __future__ import annotations

import pytest
import torch

from services.models.checkpoints.import_layouts import BASE_LAYOUTS, LAYOUTS, Rename, split_keys

RENAMES = [
    pytest.param(rename, id=f"{system}-{ctype}")
    for system, layout in {**LAYOUTS, **BASE_LAYOUTS}.items()
    for ctype, rename in layout.connector.items()
]


@pytest.mark.parametrize("rename", RENAMES)
def test_every_rule_maps_a_seed_key_there_and_back(rename: Rename) -> None:
    for src, _dst in rename.rules:
        key = src + ("0.attention.self.query.weight" if src.endswith(".") else "")
        target = rename.target(key)
        assert target is not None, key
        assert ".attention.self." not in target or not rename.subs, target
        assert rename.source(target) == key, (key, target)


def test_a_key_no_rule_knows_has_no_target() -> None:
    assert LAYOUTS["pandagpt"].connector["linear"].target("visual_encoder.blocks.0.weight") is None


def test_split_keys_sorts_connector_lora_heads_skipped_and_unplaced() -> None:
    layout = LAYOUTS["nextgpt"]
    t = torch.zeros(1)
    lora = "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    split = split_keys(
        layout,
        layout.connector["linear"],
        {
            "llama_proj.weight": t,
            lora: t,
            "gen_text_hidden_fcs.0.fc.weight": t,
            "llama_model.lm_head.weight": t,
            "image_encoder.trunk.weight": t,
        },
    )
    assert list(split.connector) == ["proj.weight"]
    assert list(split.lora) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert list(split.heads) == ["gen_text_hidden_fcs.0.fc.weight"]
    ((reason, skipped),) = split.skipped.items()
    assert skipped == ["llama_model.lm_head.weight"] and "add-tokens" in reason
    assert split.unplaced == ["image_encoder.trunk.weight"]


def test_split_keys_skips_the_persistent_buffers_a_seed_saves_by_name() -> None:
    layout = LAYOUTS["videochat"]
    t = torch.zeros(1)
    split = split_keys(
        layout,
        layout.connector["qformer"],
        {
            "llama_model.model.layers.3.self_attn.rotary_emb.inv_freq": t,
            "Qformer.bert.embeddings.position_ids": t,
            "visual_encoder.gmhra.0.attn.weight": t,
        },
    )
    assert list(split.connector) == ["gmhra.layers.0.attn.weight"]
    assert sorted(k for keys in split.skipped.values() for k in keys) == [
        "Qformer.bert.embeddings.position_ids",
        "llama_model.model.layers.3.self_attn.rotary_emb.inv_freq",
    ]
    assert not split.unplaced and not split.lora
