"""EventGPT's modules against the seed's own outputs (tests/fixtures/parity/eventgpt/modules.*).

The fixture (scripts/parity/eventgpt_modules.py) ran EventGPT's `EventChatModel` at reduced
sizes on random weights: per event frame the CLIP tower's `last_hidden_state` (the last layer,
before post_layernorm, CLS kept), `visual_projector` (Linear, GELU, Linear) and
`feature_adaptor`, then `get_spatio_temporal_features` (each frame's mean, then each token
position's mean over frames), as `prepare_inputs_labels_for_multimodal` splices them.

Here the CLIP tower goes the way the released folder does (config.json + model.safetensors,
read by the encoder service's `clip_vision` backbone at select_layer -1 with CLS), and
`model.visual_projector.*` / `model.feature_adaptor.*` through the importer's `eventgpt` key
map into the LLM service's connector loader (event_adaptor).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from services.models.backbones.build import build_backbone
from services.models.checkpoints.importers import LAYOUTS, read_state_dict
from services.models.lm.loading import load_connectors
from tests.helpers.module_parity import assert_matches, load_fixture, preset_from_dict, shipped_preset_dict

FIX = load_fixture("eventgpt")
SIZES = FIX.meta["sizes"]
CLIP_PREFIX = "model.visual_tower.visual_tower."


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import CLIPVisionConfig

    tmp = tmp_path_factory.mktemp("eventgpt")
    clip = tmp / "clip-vit"
    CLIPVisionConfig(**SIZES["clip"]).save_pretrained(clip)
    save_file(
        {k: v.contiguous() for k, v in FIX.weights_under(CLIP_PREFIX, strip=True).items()},
        str(clip / "model.safetensors"),
    )
    raw = shipped_preset_dict("eventgpt")
    event = raw["modalities"]["event"]
    event["encoder"] = {
        **event["encoder"],
        "checkpoint": str(clip),
        "tokens": SIZES["tokens_per_frame"],
        "dim": SIZES["clip"]["hidden_size"],
        "dtype": "float32",
    }
    assert (event["encoder"]["select_layer"], event["encoder"]["select_feature"]) == (-1, "cls_patch")
    assert event["encoder"]["sampling"]["event_frames"] == SIZES["event_frames"]
    preset = preset_from_dict(raw, tmp)

    release = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in FIX.weights.items()}, str(release))
    layout = LAYOUTS["eventgpt"]
    rename = layout.connector["event_adaptor"]
    trained = {rename.target(k): v for k, v in read_state_dict(release, only=layout.only).items()}
    (name,) = set(preset.connector_names().values())
    return {
        "backbone": build_backbone(preset.modalities["event"].encoder, device="cpu"),
        "connector": load_connectors(
            preset, {name: trained}, llm_dim=SIZES["llm_hidden"], dtype=torch.float32
        )[name],
    }


def test_clip_last_layer_with_cls_is_the_seeds(setup) -> None:  # type: ignore[no-untyped-def]
    frames = FIX.inputs["event_frames"]  # (P, F, 3, S, S)
    ours = setup["backbone"].encode("event", frames.flatten(0, 1))  # (P*F, 1 + N, C)
    assert_matches(
        "eventgpt clip last layer + CLS",
        ours.reshape(*frames.shape[:2], *ours.shape[1:]),
        FIX.outputs["clip_last_hidden_state"],
    )


def test_projector_adaptor_and_spatio_temporal_means_are_the_seeds(setup) -> None:  # type: ignore[no-untyped-def]
    frames = FIX.inputs["event_frames"]
    features = setup["backbone"].encode("event", frames.flatten(0, 1))  # (P*F, T, C), as the encoder service
    with torch.no_grad():
        ours = setup["connector"](
            features.reshape(frames.shape[0], -1, features.shape[-1]).clone()
        )  # (P, F + T, hidden)
    assert_matches("eventgpt projector + adaptor + aggregator", ours, FIX.outputs["event_features"])
