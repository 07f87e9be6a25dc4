"""ImageBind towers: the huge layout against ImageBind's published one, tiny forward shapes and
clip averaging, strict per-tower loading with named errors, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.models.backbones.imagebind import (
    ImageBindEncoder,
    build_imagebind,
    imagebind_huge_shapes,
    load_imagebind_state_dict,
)

LAYOUT = Path(__file__).parent / "data" / "imagebind_huge_vision_audio_keys.json"
TINY = dict(
    out_embed_dim=16,
    vision_embed_dim=32,
    vision_num_blocks=2,
    vision_num_heads=2,
    image_size=28,
    patch=14,
    audio_embed_dim=32,
    audio_num_blocks=2,
    audio_num_heads=2,
    audio_mel_bins=26,  # (26 - 16) // 10 + 1 = 2 rows
    audio_frames=36,  # 3 columns -> 6 patches
)


def _tiny(seed: int = 0, **kw: object) -> ImageBindEncoder:
    torch.manual_seed(seed)
    return build_imagebind(**{**TINY, **kw}).eval()  # type: ignore[arg-type]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny() -> ImageBindEncoder:
    return _tiny()


def test_huge_layout_is_imagebinds() -> None:
    want = {k: tuple(v) for k, v in json.loads(LAYOUT.read_text())["keys"].items()}
    got = imagebind_huge_shapes()
    assert set(got) - set(want) == set(), "keys ImageBind does not have"
    assert set(want) - set(got) == set(), "ImageBind keys we lack"
    assert [k for k in want if got[k] != want[k]] == []
    assert len(got) == 569
    assert got["modality_preprocessors.vision.pos_embedding_helper.pos_embed"] == (1, 257, 1280)
    assert got["modality_preprocessors.audio.pos_embedding_helper.pos_embed"] == (1, 229, 768)


def test_huge_single_tower_layouts() -> None:
    vision = imagebind_huge_shapes(("vision",))
    assert vision and all(".vision." in k for k in vision)
    assert set(vision) | set(imagebind_huge_shapes(("audio",))) == set(imagebind_huge_shapes())


def test_tiny_forward_shapes_and_norms(tiny: ImageBindEncoder) -> None:
    g = _gen()
    with torch.no_grad():
        image = tiny("image", torch.randn(3, 3, 28, 28, generator=g))  # (B, 3, H, W)
        one_clip = tiny("video", torch.randn(2, 3, 2, 28, 28, generator=g))  # (B, 3, T, H, W)
        video = tiny("video", torch.randn(2, 5, 3, 2, 28, 28, generator=g))  # (B, S, 3, T, H, W)
        audio = tiny("audio", torch.randn(2, 3, 1, 26, 36, generator=g))  # (B, S, 1, mel, frames)
        audio_one = tiny("audio", torch.randn(4, 1, 26, 36, generator=g))  # (B, 1, mel, frames)
    assert image.shape == (3, 16) and one_clip.shape == video.shape == audio.shape == (2, 16)
    assert audio_one.shape == (4, 16)
    for unit in (image, one_clip, audio_one):
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(unit)))
    for averaged in (video, audio):  # a mean of unit vectors, not renormalised
        assert (averaged.norm(dim=-1) < 1 - 1e-4).all()


@pytest.mark.parametrize(("modality", "clip"), [("video", (3, 2, 28, 28)), ("audio", (1, 26, 36))])
def test_clips_average_their_normalised_embeddings(tiny: ImageBindEncoder, modality, clip) -> None:
    x = torch.randn(2, 3, *clip, generator=_gen(1))  # (B, S, ...)
    tower = "vision" if modality == "video" else "audio"
    with torch.no_grad():
        per_clip = tiny.embed_clips(tower, x.flatten(0, 1)).reshape(2, 3, -1)  # (B, S, out)
        got = tiny(modality, x)
    torch.testing.assert_close(per_clip.norm(dim=-1), torch.ones(2, 3))
    torch.testing.assert_close(got, per_clip.mean(dim=1))


def test_an_image_is_its_repeated_two_frame_clip(tiny: ImageBindEncoder) -> None:
    img = torch.randn(2, 3, 28, 28, generator=_gen(2))
    with torch.no_grad():
        as_image = tiny("image", img)
        as_clip = tiny("video", img.unsqueeze(2).repeat(1, 1, 2, 1, 1))
    torch.testing.assert_close(as_image, as_clip)


def test_audio_logit_scale_is_opt_in() -> None:
    x = torch.randn(2, 3, 1, 26, 36, generator=_gen(3))
    plain, scaled = _tiny(), _tiny(audio_logit_scale=True)
    with torch.no_grad():
        torch.testing.assert_close(scaled("audio", x), 20 * plain("audio", x))


@pytest.mark.parametrize(
    ("modality", "shape", "match"),
    [
        ("image", (2, 3, 32, 32), r"expected \(B, 3, 28, 28\) with B >= 1, got \(2, 3, 32, 32\)"),
        ("image", (2, 3, 2, 28, 28), r"image: expected \(B, 3, 28, 28\)"),
        ("video", (2, 3, 4, 28, 28), r"expected \(B, 3, 2, 28, 28\) or \(B, S, 3, 2, 28, 28\)"),
        ("video", (2, 0, 3, 2, 28, 28), r"B, S >= 1, got \(2, 0, 3, 2, 28, 28\)"),
        ("audio", (2, 3, 1, 128, 204), r"expected \(B, 1, 26, 36\) or \(B, S, 1, 26, 36\)"),
        ("text", (2, 77), r"expected one of \['image', 'video', 'audio'\], got 'text'"),
    ],
)
def test_bad_inputs_are_refused(tiny: ImageBindEncoder, modality, shape, match) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        tiny(modality, torch.zeros(shape))


def test_an_unbuilt_tower_is_refused() -> None:
    vision_only = _tiny(towers=("vision",))
    with pytest.raises(InvalidArgumentError, match=r"expected one of \['image', 'video'\], got 'audio'"):
        vision_only("audio", torch.zeros(1, 1, 26, 36))


def test_builder_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="not divisible by 5 heads"):
        build_imagebind(**{**TINY, "vision_num_heads": 5})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="towers"):
        build_imagebind(towers=("text",))


def test_state_dict_round_trip_loads_strictly(tmp_path: Path) -> None:
    source, target = _tiny(0), _tiny(1)
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    load_imagebind_state_dict(target, torch.load(tmp_path / "tiny.pth", weights_only=True))
    x = torch.randn(2, 3, 1, 26, 36, generator=_gen(4))
    with torch.no_grad():
        torch.testing.assert_close(target("audio", x), source("audio", x))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_other_towers_keys_are_dropped() -> None:
    source, target = _tiny(0), _tiny(1, towers=("vision",))
    full = dict(source.state_dict())
    full["modality_preprocessors.text.token_embedding.weight"] = torch.zeros(10, 32)
    full["modality_heads.imu.3.weight"] = torch.zeros(16, 32)
    load_imagebind_state_dict(target, full)  # audio, text and imu keys dropped
    torch.testing.assert_close(
        target.state_dict()["modality_heads.vision.2.weight"], full["modality_heads.vision.2.weight"]
    )


def test_loading_one_of_the_built_towers_keeps_the_other() -> None:
    source, target = _tiny(0), _tiny(1)
    audio_before = target.state_dict()["modality_heads.audio.2.weight"].clone()
    vision_only = {k: v for k, v in source.state_dict().items() if ".vision." in k}
    load_imagebind_state_dict(target, vision_only, towers=("vision",))
    assert torch.equal(target.state_dict()["modality_heads.audio.2.weight"], audio_before)
    assert torch.equal(
        target.state_dict()["modality_heads.vision.2.weight"],
        source.state_dict()["modality_heads.vision.2.weight"],
    )
    with pytest.raises(InvalidArgumentError, match="expected a subset of"):
        load_imagebind_state_dict(_tiny(towers=("vision",)), vision_only, towers=("audio",))


def _load_fails(state: dict[str, torch.Tensor]) -> str:
    target = _tiny(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FailedPreconditionError) as info:
        load_imagebind_state_dict(target, state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "partly loaded"
    return info.value.message


def test_missing_key_is_named() -> None:
    state = dict(_tiny(0).state_dict())
    del state["modality_trunks.audio.blocks.1.attn.bias_k"]
    msg = _load_fails(state)
    assert "missing modality_trunks.audio.blocks.1.attn.bias_k (expected (1, 1, 32))" in msg


def test_extra_keys_are_named() -> None:
    state = dict(_tiny(0).state_dict())
    state["modality_trunks.vision.blocks.2.norm_1.weight"] = torch.zeros(32)
    state["llama_proj.weight"] = torch.zeros(4, 16)
    msg = _load_fails(state)
    assert "unexpected modality_trunks.vision.blocks.2.norm_1.weight (32,)" in msg
    assert "unexpected llama_proj.weight (not an ImageBind tower key)" in msg
    assert "(2 problems)" in msg


def test_wrong_shape_is_named_with_expected_and_got() -> None:
    state = dict(_tiny(0).state_dict())
    state["modality_preprocessors.vision.pos_embedding_helper.pos_embed"] = torch.zeros(1, 257, 32)
    msg = _load_fails(state)
    assert (
        "modality_preprocessors.vision.pos_embedding_helper.pos_embed: expected (1, 5, 32), got (1, 257, 32)"
        in msg
    )


def test_eval_is_deterministic(tiny: ImageBindEncoder) -> None:
    x = torch.randn(2, 2, 3, 2, 28, 28, generator=_gen(5))
    with torch.no_grad():
        first, second = tiny("video", x), tiny("video", x.clone())
        alone = tiny("video", x[1:])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first[1:])
    assert torch.equal(
        _tiny(7).state_dict()["modality_heads.vision.2.weight"],
        _tiny(7).state_dict()["modality_heads.vision.2.weight"],
    )


# --- the thermal tower (PandaGPT's thermal input) ---------------------------------------------

THERMAL_LAYOUT = Path(__file__).parent / "data" / "imagebind_huge_thermal_keys.json"
TINY_THERMAL = dict(
    out_embed_dim=16,
    thermal_embed_dim=32,
    thermal_num_blocks=2,
    thermal_num_heads=2,
    thermal_image_size=32,
    thermal_kernel=16,  # 2 x 2 patches
)


def _thermal(seed: int = 0, **kw: object) -> ImageBindEncoder:
    torch.manual_seed(seed)
    return build_imagebind(towers=("thermal",), **{**TINY_THERMAL, **kw}).eval()  # type: ignore[arg-type]


def test_huge_thermal_layout_is_imagebinds() -> None:
    want = {k: tuple(v) for k, v in json.loads(THERMAL_LAYOUT.read_text())["keys"].items()}
    got = imagebind_huge_shapes(("thermal",))
    assert set(got) - set(want) == set(), "keys ImageBind does not have"
    assert set(want) - set(got) == set(), "ImageBind keys we lack"
    assert [k for k in want if got[k] != want[k]] == []
    assert len(got) == 177
    assert got["modality_preprocessors.thermal.rgbt_stem.proj.weight"] == (768, 1, 16, 16)
    assert got["modality_preprocessors.thermal.pos_embedding_helper.pos_embed"] == (1, 197, 768)
    assert got["modality_postprocessors.thermal.1.log_logit_scale"] == ()


def test_default_towers_stay_vision_and_audio() -> None:
    with torch.device("meta"):
        assert build_imagebind().towers == ("vision", "audio")
        assert build_imagebind(towers=("thermal", "vision")).towers == ("vision", "thermal")


def test_thermal_embedding_is_ten_times_a_unit_vector() -> None:
    model = _thermal()
    x = torch.rand(3, 1, 32, 32, generator=_gen(6))  # (B, 1, H, W) in [0, 1]
    with torch.no_grad():
        out = model("thermal", x)
        alone = model("thermal", x[1:2])
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((3,), 10.0))
    torch.testing.assert_close(alone, out[1:2])
    assert model.modality_postprocessors["thermal"][1].log_logit_scale.exp().item() == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 1, 28, 28), r"thermal: expected \(B, 1, 32, 32\) with B >= 1, got \(2, 1, 28, 28\)"),
        ((2, 3, 32, 32), r"expected \(B, 1, 32, 32\)"),
        ((2, 2, 1, 32, 32), r"expected \(B, 1, 32, 32\)"),  # no clips: one picture per item
        ((0, 1, 32, 32), r"B >= 1, got \(0, 1, 32, 32\)"),
    ],
)
def test_bad_thermal_inputs_are_refused(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        _thermal()("thermal", torch.zeros(shape))


def test_thermal_is_refused_without_its_tower(tiny: ImageBindEncoder) -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"expected one of \['image', 'video', 'audio'\], got 'thermal'"
    ):
        tiny("thermal", torch.zeros(1, 1, 32, 32))


def test_thermal_builder_checks_its_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="thermal: embed dim 32 is not divisible by 3 heads"):
        _thermal(thermal_num_heads=3)
    with pytest.raises(InvalidArgumentError, match="thermal_image_size 8 is under one patch"):
        _thermal(thermal_image_size=8)


def _thermal_load_fails(state: dict[str, torch.Tensor]) -> str:
    target = _thermal(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FailedPreconditionError) as info:
        load_imagebind_state_dict(target, state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "partly loaded"
    return info.value.message


def test_thermal_tower_loads_strictly_from_a_full_checkpoint(tmp_path: Path) -> None:
    source, target = _thermal(0), _thermal(1)
    full = dict(source.state_dict()) | dict(_tiny(2).state_dict())  # + vision and audio
    full["modality_trunks.depth.blocks.0.attn.bias_k"] = torch.zeros(1, 1, 8)
    torch.save(full, tmp_path / "ib.pth")
    load_imagebind_state_dict(target, torch.load(tmp_path / "ib.pth", weights_only=True))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_thermal_missing_unexpected_and_misshaped_keys_are_named() -> None:
    state = dict(_thermal(0).state_dict())
    del state["modality_trunks.thermal.blocks.1.attn.bias_v"]
    state["modality_trunks.thermal.blocks.2.norm_1.weight"] = torch.zeros(32)
    state["modality_preprocessors.thermal.pos_embedding_helper.pos_embed"] = torch.zeros(1, 197, 32)
    msg = _thermal_load_fails(state)
    assert "missing modality_trunks.thermal.blocks.1.attn.bias_v (expected (1, 1, 32))" in msg
    assert "unexpected modality_trunks.thermal.blocks.2.norm_1.weight (32,)" in msg
    assert "pos_embed: expected (1, 5, 32), got (1, 197, 32)" in msg
    assert "(3 problems)" in msg and "thermal towers" in msg


def test_thermal_logit_scale_buffer_is_required() -> None:
    state = dict(_thermal(0).state_dict())
    del state["modality_postprocessors.thermal.1.log_logit_scale"]
    assert "missing modality_postprocessors.thermal.1.log_logit_scale (expected ())" in _thermal_load_fails(
        state
    )
