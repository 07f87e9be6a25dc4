"""Backbones: shapes, layer/feature selection against the Hugging Face model called directly,
full CLIPModel folders, and the load-time checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.presets import EncoderSpec
from services.models.backbones.base import ClipVisionBackbone
from services.models.backbones.build import BACKBONES, build_backbone


@pytest.fixture(scope="module")
def spec(tiny_preset) -> EncoderSpec:
    return tiny_preset.modalities["image"].encoder


@pytest.fixture(scope="module")
def hf_model(spec: EncoderSpec) -> CLIPVisionModel:
    return CLIPVisionModel.from_pretrained(spec.checkpoint).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def test_build_backbone_from_the_tiny_preset(spec: EncoderSpec, pixels: torch.Tensor) -> None:
    backbone = build_backbone(spec)
    assert isinstance(backbone, ClipVisionBackbone)
    assert (backbone.image_size, backbone.tokens, backbone.dim) == (32, 16, 64)
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    out = backbone(pixels)
    assert out.shape == (3, 16, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_selection_matches_the_hf_model(
    hf_model, spec, pixels, select_layer: int, select_feature: str
) -> None:
    backbone = ClipVisionBackbone.from_pretrained(
        spec.checkpoint, select_layer=select_layer, select_feature=select_feature
    )  # type: ignore[arg-type]
    with torch.no_grad():
        hidden = hf_model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    want = hidden[:, 1:] if select_feature == "patch" else hidden  # (B, T, D)
    got = backbone(pixels)
    assert got.shape == want.shape == (3, 16 + (select_feature == "cls_patch"), 64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_items_are_independent_of_their_batch(spec, pixels) -> None:
    backbone = ClipVisionBackbone.from_pretrained(spec.checkpoint)
    together = backbone(pixels)
    alone = torch.cat([backbone(pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_loads_the_vision_tower_of_a_full_clip_model(tmp_path: Path, pixels) -> None:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 99,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    backbone = ClipVisionBackbone.from_pretrained(tmp_path, select_layer=-2)
    with torch.no_grad():
        want = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert (backbone.tokens, backbone.dim) == (16, 48)
    torch.testing.assert_close(backbone(pixels), want, atol=1e-6, rtol=0)


def test_half_precision_weights_give_close_features(spec, pixels) -> None:
    full = ClipVisionBackbone.from_pretrained(spec.checkpoint)(pixels)
    half = ClipVisionBackbone.from_pretrained(spec.checkpoint, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half(pixels).float(), full, atol=0.1, rtol=0.05)


def test_preset_shape_mismatch_fails_at_load(spec: EncoderSpec) -> None:
    wrong = spec.model_copy(update={"tokens": 17})
    with pytest.raises(
        InvalidArgumentError,
        match="expects 17 tokens of width 64 per frame, the backbone returns 16 tokens of width 64",
    ):
        build_backbone(wrong)
    cls = spec.model_copy(update={"select_feature": "cls_patch"})
    with pytest.raises(InvalidArgumentError, match="returns 17 tokens"):
        build_backbone(cls)
    assert build_backbone(cls.model_copy(update={"tokens": 17})).tokens == 17


def test_select_layer_out_of_range(spec: EncoderSpec) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"expected an index into 3 hidden states \(-3..2\), got 3"
    ):
        ClipVisionBackbone.from_pretrained(spec.checkpoint, select_layer=3)


def test_missing_checkpoint(spec: EncoderSpec, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"found no config\.json"):
        build_backbone(spec.model_copy(update={"checkpoint": tmp_path / "nope"}))


def test_unknown_backbone_names_the_known_ones(spec: EncoderSpec) -> None:
    bogus = EncoderSpec.model_construct(**{**spec.model_dump(), "backbone": "nope"})
    with pytest.raises(
        InvalidArgumentError, match=r"expected one of \['clip_vision', 'eva_vit', 'imagebind'\], got 'nope'"
    ):
        build_backbone(bogus)
    assert set(BACKBONES) == {"clip_vision", "eva_vit", "imagebind"}
