"""eva_vit and imagebind backbones from their checkpoints: the tiny twins' modalmesh folders,
the seeds' LAVIS-layout EVA file (a tiny state dict written in LAVIS names), imagebind .pth,
the selected layers and taps against transformers' hidden states, and the load-time errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from transformers import Blip2VisionConfig, Blip2VisionModel

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.presets import EncoderSpec, Preset
from services.models.backbones.build import build_backbone
from services.models.backbones.checkpoints import (
    imagebind_towers,
    load_imagebind,
    read_backbone_folder,
    resize_pos_embed,
)
from services.models.backbones.imagebind import ImageBindBackbone, build_imagebind
from services.models.backbones.tiny import write_tiny_backbone


def _pixels(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_tower(folder: Path) -> Blip2VisionModel:
    """The whole tiny EVA tower of a modalmesh folder, as a plain Blip2VisionModel."""
    config, weights = read_backbone_folder(folder, "eva_vit")
    hf = Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=config["width"],
            intermediate_size=config["mlp_dim"],
            num_hidden_layers=config["num_layers"],
            num_attention_heads=config["heads"],
            image_size=config["image_size"],
            patch_size=config["patch_size"],
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            qkv_bias=True,
        )
    ).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert unexpected == [] and all(k.startswith("post_layernorm.") for k in missing)
    return hf


@pytest.fixture(scope="module")
def videochat(twins: dict[str, Preset]) -> EncoderSpec:
    return twins["tiny-videochat"].modalities["video"].encoder  # cls_patch, block -2 of 4, 2 taps


@pytest.fixture(scope="module")
def etchat(twins: dict[str, Preset]) -> EncoderSpec:
    return twins["tiny-etchat"].modalities["video"].encoder  # patch, block -2 of 4, no taps


def test_eva_taps_are_the_blocks_up_to_the_selected_one(videochat: EncoderSpec) -> None:
    backbone = build_backbone(videochat, device="cpu")
    assert (backbone.image_size, backbone.tokens, backbone.tokens_per_frame) == (28, 5, 10)
    pixels = _pixels(3)
    out = backbone.encode("video", pixels)
    assert out.shape == (3, 2 * 5, 32)
    with torch.no_grad():
        hidden = _hf_tower(videochat.checkpoint)(pixel_values=pixels, output_hidden_states=True).hidden_states
    # block -2 of 4 = hidden_states[3]; taps = blocks 1, 2 = hidden_states[2], hidden_states[3]
    torch.testing.assert_close(out[:, :5], hidden[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], hidden[3], atol=1e-5, rtol=0)


def test_eva_patch_features_without_taps(etchat: EncoderSpec) -> None:
    backbone = build_backbone(etchat, device="cpu")
    pixels = _pixels(2, seed=1)
    out = backbone.encode("video", pixels)
    assert out.shape == (2, 4, 32)
    with torch.no_grad():
        hidden = _hf_tower(etchat.checkpoint)(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, hidden[-2][:, 1:], atol=1e-5, rtol=0)


def _to_lavis(folder: Path, *, grid: int | None = None) -> dict[str, torch.Tensor]:
    """A modalmesh EVA folder's weights renamed to LAVIS's eva_vit_g.pth layout (the inverse map)."""
    _, hf = read_backbone_folder(folder, "eva_vit")
    out: dict[str, torch.Tensor] = {}
    names = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.projection": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in hf.items():
        if key == "embeddings.class_embedding":
            out["cls_token"] = value
        elif key == "embeddings.position_embedding":
            out["pos_embed"] = value
        elif key == "embeddings.patch_embedding.weight":
            out["patch_embed.proj.weight"] = value[:, :, None]  # VideoChat's inflated Conv3d
        elif key == "embeddings.patch_embedding.bias":
            out["patch_embed.proj.bias"] = value
        else:
            _, _, i, rest = key.split(".", 3)
            if rest == "self_attn.qkv.weight":
                out[f"blocks.{i}.attn.qkv.weight"] = value
            elif rest == "self_attn.qkv.bias":
                q, _, v = value.chunk(3)
                out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = q, v
            else:
                name, _, param = rest.rpartition(".")
                out[f"blocks.{i}.{names[name]}.{param}"] = value
    out["norm.weight"] = torch.ones(32)  # not part of the tower: ignored
    return out


def test_eva_loads_the_lavis_layout(tmp_path: Path, videochat: EncoderSpec) -> None:
    lavis = _to_lavis(videochat.checkpoint)
    wrapped = {
        "model": {f"visual_encoder.{k}": v for k, v in lavis.items()} | {"llama_proj.weight": torch.ones(2)}
    }
    torch.save(wrapped, tmp_path / "videochat.pth")
    torch.save(lavis, tmp_path / "eva_vit_g.pth")
    want = build_backbone(videochat, device="cpu").encode("video", _pixels(2))
    for name in ("videochat.pth", "eva_vit_g.pth"):
        spec = videochat.model_copy(update={"checkpoint": tmp_path / name})
        got = build_backbone(spec, device="cpu").encode("video", _pixels(2))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    broken = dict(lavis)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(FailedPreconditionError) as info:
        build_backbone(videochat.model_copy(update={"checkpoint": tmp_path / "broken.pth"}))
    assert "encoder.layers.0.mlp.fc1.weight: expected (64, 32), got (3, 3)" in info.value.message
    assert "missing encoder.layers.1.mlp.fc2.bias (expected (32,))" in info.value.message
    del lavis["blocks.1.attn.q_bias"]
    torch.save(lavis, tmp_path / "no_q_bias.pth")
    with pytest.raises(
        InvalidArgumentError, match=r"blocks.1.attn: expected both q_bias and v_bias, got \['v'\]"
    ):
        build_backbone(videochat.model_copy(update={"checkpoint": tmp_path / "no_q_bias.pth"}))


def test_pos_embed_grid_is_resized_bicubic() -> None:
    pos = torch.randn(1, 1 + 9, 4)
    out = resize_pos_embed(pos, 4)
    assert out.shape == (1, 5, 4)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    assert resize_pos_embed(pos, 9) is pos
    with pytest.raises(InvalidArgumentError, match="square patch grids"):
        resize_pos_embed(pos, 5)


def test_code_in_a_pth_is_not_run(tmp_path: Path, videochat: EncoderSpec) -> None:
    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": Boom()}, f)
    with pytest.raises(InvalidArgumentError, match="not a readable torch state dict"):
        build_backbone(videochat.model_copy(update={"checkpoint": tmp_path / "evil.pth"}))
    assert not (tmp_path / "ran").exists()


def test_imagebind_image_video_audio_shapes(twins: dict[str, Preset]) -> None:
    spec = twins["tiny-pandagpt"].modalities["image"].encoder
    backbone = build_backbone(spec, modalities=("image", "video", "audio"), device="cpu")
    assert isinstance(backbone, ImageBindBackbone) and backbone.towers == ("vision", "audio")
    image = backbone.encode("image", _pixels(2))
    assert image.shape == (2, 1, 32)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2, 1))
    video = torch.randn(2, 15, 3, 2, 28, 28)
    assert backbone.encode("video", video).shape == (2, 1, 32)
    audio = torch.randn(2, 3, 1, 128, 204)
    assert backbone.encode("audio", audio).shape == (2, 1, 32)
    # one image = a 2-frame clip of it (ImageBind's PadIm2Video)
    clip = _pixels(1)[:, None, :, None].expand(1, 1, 3, 2, 28, 28)
    torch.testing.assert_close(backbone.encode("video", clip), image[:1], atol=1e-5, rtol=0)
    audio_only = build_backbone(spec, modalities=["audio"], device="cpu")
    assert audio_only.towers == ("audio",)  # type: ignore[attr-defined]
    every = build_backbone(spec, device="cpu")  # tiny-pandagpt's checkpoint holds the thermal tower too
    assert every.towers == ("vision", "audio", "thermal")  # type: ignore[attr-defined]
    thermal = every.encode("thermal", torch.rand(2, 1, 32, 32))
    assert thermal.shape == (2, 1, 32)
    torch.testing.assert_close(thermal.norm(dim=-1), torch.full((2, 1), 10.0))  # PandaGPT keeps the x10 scale


def test_imagebind_pth_loads_like_the_folder(tmp_path: Path, twins: dict[str, Preset]) -> None:
    spec = twins["tiny-nextgpt"].modalities["audio"].encoder
    _, weights = read_backbone_folder(spec.checkpoint, "imagebind")
    torch.save(
        weights | {"modality_trunks.text.blocks.0.attn.in_proj_weight": torch.ones(1)}, tmp_path / "ib.pth"
    )
    audio = torch.randn(1, 3, 1, 128, 204)
    want = build_backbone(spec, modalities=("audio",), device="cpu").encode("audio", audio)
    got = build_backbone(
        spec.model_copy(update={"checkpoint": tmp_path / "ib.pth"}), modalities=("audio",), device="cpu"
    )
    torch.testing.assert_close(got.encode("audio", audio), want, atol=1e-6, rtol=0)


def test_spec_config_must_agree_with_the_folder(etchat: EncoderSpec) -> None:
    wrong = etchat.model_copy(update={"config": {**etchat.config, "width": 64}})
    with pytest.raises(InvalidArgumentError, match="width: preset 64, checkpoint 32"):
        build_backbone(wrong)
    layered = etchat.model_copy(update={"config": {**etchat.config, "select_layer": -1}})
    with pytest.raises(InvalidArgumentError, match="set by the preset's encoder fields"):
        build_backbone(layered)


def test_tokens_mismatch_fails_at_load(videochat: EncoderSpec) -> None:
    with pytest.raises(
        InvalidArgumentError, match="expects 12 tokens of width 32 per frame, the backbone returns 10"
    ):
        build_backbone(videochat.model_copy(update={"tokens": 6}))


def test_tiny_weights_are_deterministic(tmp_path: Path, twins: dict[str, Preset]) -> None:
    for name, modality in [
        ("tiny-videochat", "video"),
        ("tiny-pandagpt", "audio"),
        ("tiny-eventgpt", "event"),
    ]:
        spec = twins[name].modalities[modality].encoder
        for folder, seed in [("a", 1), ("b", 1), ("c", 2)]:
            write_tiny_backbone(spec, tmp_path / name / folder, seed=seed)
        files = sorted(p.name for p in (tmp_path / name / "a").iterdir())
        assert files and files == sorted(p.name for p in (tmp_path / name / "b").iterdir())
        weights = next(f for f in files if f.endswith(".safetensors"))
        a, b, c = ((tmp_path / name / x / weights).read_bytes() for x in "abc")
        assert a == b and a != c
    clip = twins["tiny-eventgpt"].modalities["event"].encoder
    with pytest.raises(InvalidArgumentError, match=r"expects 16 tokens of width 64 per frame .* give 17"):
        write_tiny_backbone(clip.model_copy(update={"tokens": 16}), tmp_path / "bad", seed=0)


def test_imagebind_build_sizes_are_the_huge_defaults() -> None:
    with torch.device("meta"):
        model = build_imagebind()
    assert model.clip_shapes == {"vision": (3, 2, 224, 224), "audio": (1, 128, 204)}


# --- ImageBind's thermal tower ----------------------------------------------------------------

THERMAL_SIZES = {
    "thermal_embed_dim": 32,
    "thermal_num_blocks": 2,
    "thermal_num_heads": 2,
    "thermal_image_size": 32,
    "thermal_kernel": 16,
}


@pytest.fixture(scope="module")
def thermal_spec(twins: dict[str, Preset], tmp_path_factory: pytest.TempPathFactory) -> EncoderSpec:
    """tiny-pandagpt's ImageBind spec with thermal sizes, its folder written with the thermal tower."""
    image = twins["tiny-pandagpt"].modalities["image"].encoder
    folder = tmp_path_factory.mktemp("thermal") / "imagebind"
    spec = image.model_copy(update={"checkpoint": folder, "config": {**image.config, **THERMAL_SIZES}})
    write_tiny_backbone(spec, folder, seed=5, modalities=["image", "video", "audio", "thermal"])
    return spec


def test_imagebind_towers_of_modalities() -> None:
    assert imagebind_towers(["thermal", "image"]) == ("vision", "thermal")
    assert imagebind_towers(["audio", "video", "thermal"]) == ("vision", "audio", "thermal")
    with pytest.raises(
        InvalidArgumentError, match=r"imagebind modalities: expected some of .*'thermal'\], got \['depth'\]"
    ):
        imagebind_towers(["depth"])


def test_thermal_backbone_from_a_folder(thermal_spec: EncoderSpec) -> None:
    backbone = load_imagebind(thermal_spec, ["thermal"])
    assert isinstance(backbone, ImageBindBackbone)
    assert backbone.towers == ("thermal",) and (backbone.image_size, backbone.thermal_size) == (0, 32)
    dummy = backbone.dummy_input("thermal")
    assert dummy.shape == (1, 1, 32, 32)
    out = backbone.encode("thermal", torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((2, 1), 10.0))
    both = load_imagebind(thermal_spec, ["image", "thermal"])
    assert both.towers == ("vision", "thermal") and both.image_size == 28
    torch.testing.assert_close(both.encode("thermal", dummy), backbone.encode("thermal", dummy))


def test_thermal_backbone_from_a_pth_with_every_tower(thermal_spec: EncoderSpec, tmp_path: Path) -> None:
    _, weights = read_backbone_folder(thermal_spec.checkpoint, "imagebind")
    extra = {"modality_trunks.imu.blocks.0.attn.bias_k": torch.ones(1, 1, 8)}
    torch.save(weights | extra, tmp_path / "imagebind_huge.pth")
    pth = thermal_spec.model_copy(update={"checkpoint": tmp_path / "imagebind_huge.pth"})
    x = torch.rand(1, 1, 32, 32)
    want = load_imagebind(thermal_spec, ["thermal"]).encode("thermal", x)
    torch.testing.assert_close(load_imagebind(pth, ["thermal"]).encode("thermal", x), want, atol=0, rtol=0)


def test_thermal_from_a_checkpoint_without_its_tower_is_refused(twins: dict[str, Preset]) -> None:
    image = twins["tiny-nextgpt"].modalities["image"].encoder  # its folder has vision and audio only
    spec = image.model_copy(update={"config": {**image.config, **THERMAL_SIZES}})
    with pytest.raises(FailedPreconditionError, match=r"does not fit the thermal towers") as info:
        load_imagebind(spec, ["thermal"])
    assert "missing modality_preprocessors.thermal.cls_token (expected (1, 1, 32))" in info.value.message


def test_tiny_writer_adds_the_thermal_tower_only_when_asked(
    thermal_spec: EncoderSpec, tmp_path: Path
) -> None:
    with_thermal = read_backbone_folder(thermal_spec.checkpoint, "imagebind")[1]
    write_tiny_backbone(thermal_spec, tmp_path / "plain", seed=5, modalities=["image", "audio"])
    plain = read_backbone_folder(tmp_path / "plain", "imagebind")[1]
    thermal_keys = {k for k in with_thermal if ".thermal." in k}
    assert len(thermal_keys) == 5 + 2 * 14 + 3 + 1  # stem + positions, 2 blocks, head, logit scale
    assert set(with_thermal) - set(plain) == thermal_keys
    for k, v in plain.items():  # vision and audio: the same weights with or without thermal
        assert torch.equal(with_thermal[k], v), k


def test_tiny_writer_wants_tiny_thermal_sizes(twins: dict[str, Preset], tmp_path: Path) -> None:
    image = twins["tiny-nextgpt"].modalities["image"].encoder
    with pytest.raises(InvalidArgumentError, match="tiny imagebind thermal: expected tiny thermal sizes"):
        write_tiny_backbone(image, tmp_path / "ib", seed=0, modalities=["image", "thermal"])


def test_thermal_size_must_be_the_preprocessings(thermal_spec: EncoderSpec) -> None:
    config = {k: v for k, v in thermal_spec.config.items() if k != "thermal_image_size"}
    unsized = thermal_spec.model_copy(update={"config": config})  # the folder says 32, the spec nothing
    with pytest.raises(
        InvalidArgumentError, match=r"tower reads 32 px, the preset's preprocessing makes 224"
    ):
        load_imagebind(unsized, ["thermal"])
