"""VideoChat's modules against the seed's own outputs (tests/fixtures/parity/videochat/modules.*).

The fixture (scripts/parity/videochat_modules.py) ran VideoChat's `VideoChat.encode_img` at
reduced sizes on random weights: EVA-ViT-g cut at the penultimate block of its tower (no local
MHRA), the Global MHRA layers reading the last blocks' outputs, ln_vision, the BLIP-2 Q-Former
with its pretrained plus extra queries over all frames at once, and `llama_proj`, for a video
(B, T, 3, H, W) and an image (1, 1, 3, H, W).

Here the weights go the way a user's files go: VideoChat's `{'model': ...}` .pth read by the
encoder service's EVA loader (`build_backbone` -> `_checkpoints.load_eva_vit`, the
`visual_encoder.` prefix, the inflated Conv3d patch weight); the BLIP-2 Q-Former, its queries
and ln_vision renamed by the `blip2-qformer` key map into the connector's base file; the
trained tensors (Global MHRA, ln_vision, extra queries, llama_proj) read by the importer's
reader and renamed by the `videochat` key map into the LLM service's connector loader.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from services.models.backbones.build import build_backbone
from services.models.checkpoints.importers import BASE_LAYOUTS, LAYOUTS, read_state_dict
from services.models.lm.loading import load_connectors
from tests.helpers.module_parity import (
    assert_matches,
    load_fixture,
    preset_from_dict,
    save_seed_file,
    shipped_preset_dict,
)

FIX = load_fixture("videochat")
SIZES = FIX.meta["sizes"]
Q = SIZES["qformer"]
TRAINED = (
    "visual_encoder.gmhra",
    "ln_vision.",
    "extra_query_tokens",
    "llama_proj.",
)  # VideoChat trains these
BUFFERS = {"qformer.embeddings.position_ids"}  # LAVIS BERT's persistent buffer, no parameter of ours


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("videochat")
    release = save_seed_file(tmp / "videochat.pth", FIX.weights, wrap="model")
    raw = shipped_preset_dict("videochat")
    eva = {
        "num_layers": SIZES["eva_full_depth"],
        "width": SIZES["eva_width"],
        "heads": SIZES["eva_heads"],
        "mlp_dim": SIZES["eva_mlp"],
        "image_size": SIZES["image_size"],
        "patch_size": SIZES["patch"],
    }
    for spec in raw["modalities"].values():
        spec["encoder"] = {
            **spec["encoder"],
            "checkpoint": str(release),
            "config": eva,
            "taps": SIZES["gmhra_layers"],
            "tokens": (SIZES["image_size"] // SIZES["patch"]) ** 2 + 1,
            "dim": SIZES["eva_width"],
            "dtype": "float32",
        }
        spec["connector"] = {
            **spec["connector"],
            "base": str(tmp / "blip2_qformer.safetensors"),
            "qformer": {
                "width": Q["hidden_size"],
                "layers": Q["num_hidden_layers"],
                "heads": Q["num_attention_heads"],
                "mlp_dim": Q["intermediate_size"],
                "cross_attention_every": SIZES["cross_attention_freq"],
                "num_query_tokens": SIZES["num_query_token"],
                "num_extra_query_tokens": SIZES["extra_num_query_token"],
                "gmhra_layers": SIZES["gmhra_layers"],
                "gmhra_heads": SIZES["eva_heads"],
            },
        }
    preset = preset_from_dict(raw, tmp)
    assert (
        preset.modalities["video"].encoder.select_layer == -2
    )  # the shipped value, the seed's depth=39 of 40

    state = read_state_dict(release, unwrap="model")
    base_layout = BASE_LAYOUTS["blip2-qformer"]
    base = {
        base_layout.connector["qformer"].target(k): v
        for k, v in state.items()
        if k.startswith(base_layout.only or ())
    }
    assert set(base) - {k for k in base if not k.endswith("position_ids")} == BUFFERS
    save_file(
        {k: v.contiguous() for k, v in base.items() if k not in BUFFERS},
        str(preset.modalities["video"].connector.base),
    )
    rename = LAYOUTS["videochat"].connector["qformer"]
    trained = {rename.target(k): v for k, v in state.items() if k.startswith(TRAINED)}
    assert None not in trained
    (name,) = set(preset.connector_names().values())
    connector = load_connectors(preset, {name: trained}, llm_dim=SIZES["llm_hidden"], dtype=torch.float32)[
        name
    ]
    backbone = build_backbone(preset.modalities["video"].encoder, modalities=("video", "image"), device="cpu")
    return {"connector": connector, "backbone": backbone}


@pytest.mark.parametrize("item", ["video", "image"])
def test_eva_taps_are_the_seeds_last_blocks(setup, item: str) -> None:  # type: ignore[no-untyped-def]
    ours = setup["backbone"].forward_taps(FIX.inputs[item])  # (B, T, K, N, D)
    assert_matches(f"videochat eva taps {item}", ours, FIX.outputs[f"{item}.eva_taps"])


@pytest.mark.parametrize("item", ["video", "image"])
def test_global_mhra_gives_the_seeds_visual_encoder_output(setup, item: str) -> None:  # type: ignore[no-untyped-def]
    taps = FIX.outputs[f"{item}.eva_taps"]
    with torch.no_grad():
        ours = setup["connector"].gmhra(taps)  # (B, T*N + 1, D)
    assert_matches(f"videochat gmhra {item}", ours, FIX.outputs[f"{item}.visual_encoder"])


@pytest.mark.parametrize("item", ["video", "image"])
def test_pixels_to_llm_inputs_as_encode_img(setup, item: str) -> None:  # type: ignore[no-untyped-def]
    pixels = FIX.inputs[item]  # (B, T, 3, H, W)
    b, t = pixels.shape[:2]
    features = setup["backbone"].encode(item, pixels.flatten(0, 1))  # (B*T, K*N, D), as the encoder service
    with torch.no_grad():
        ours = setup["connector"](
            features.reshape(b, t * features.shape[1], -1).clone()
        )  # (B, 32+extra, hidden)
    assert_matches(f"videochat q-former + llama_proj {item}", ours, FIX.outputs[f"{item}.inputs_llama"])
