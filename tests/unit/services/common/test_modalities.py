"""The modality registry: records, lookups, hooks, and an import without torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.common import modalities
from services.common.errors import InvalidArgumentError
from services.common.modalities import Modality
from services.common.presets import BACKBONE_MODALITIES, MODALITIES, OUTPUT_MODALITIES

PRESETS = Path(__file__).parents[4] / "presets"


def test_the_modalities_and_their_names() -> None:
    assert modalities.input_names() == ("image", "video", "audio", "event", "thermal")
    assert modalities.output_names() == ("image", "video", "audio")
    assert modalities.input_names() == MODALITIES and modalities.output_names() == OUTPUT_MODALITIES


def test_get_names_the_known_modalities() -> None:
    assert modalities.get("video").url_part == "video_url"
    with pytest.raises(InvalidArgumentError) as info:
        modalities.get("smell", where="messages[0].content[0].input_media.modality")
    assert info.value.message == (
        "messages[0].content[0].input_media.modality: expected one of ['audio', 'event', 'image', 'thermal', "
        "'video'], "
        "got 'smell'"
    )
    assert info.value.param == "messages[0].content[0].input_media.modality"


def test_part_types_lead_to_their_modality() -> None:
    found = {
        p: modalities.by_part(p) for p in ("image_url", "audio_url", "input_audio", "input_event", "text")
    }
    assert {p: m.name if m else None for p, m in found.items()} == {
        "image_url": "image",
        "audio_url": "audio",
        "input_audio": "audio",
        "input_event": "event",
        "text": None,
    }


def test_backbones_read_what_the_records_say() -> None:
    assert BACKBONE_MODALITIES == {
        "clip_vision": ("image", "video", "event"),
        "eva_vit": ("image", "video"),
        "imagebind": ("image", "video", "audio", "thermal"),
    }


def test_every_hook_resolves_to_a_callable() -> None:
    for record in modalities.MODALITIES.values():
        for which in ("prepare", "dummy", "preset_rules"):
            if getattr(record, which) is not None:
                assert callable(record.hook(which)), (record.name, which)  # type: ignore[arg-type]
        if record.output is not None:
            behaviour = record.hook("behaviour")
            assert callable(behaviour.call_args) and callable(behaviour.outputs)


def test_a_missing_hook_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="modality image: has no preset_rules hook"):
        modalities.get("image").hook("preset_rules")
    with pytest.raises(InvalidArgumentError, match="modality event: has no behaviour hook"):
        modalities.get("event").hook("behaviour")


def test_every_dummy_is_an_item_its_preprocessing_takes() -> None:
    from services.common.presets import EncoderSpec, SamplingSpec
    from services.models.media.prepare import EncoderLimits, MediaPreprocessor, clip_preprocessor

    readers = {
        "image": ("eva_vit", None),
        "video": ("eva_vit", SamplingSpec(num_frames=2)),
        "audio": ("imagebind", SamplingSpec(clips=2)),
        "event": ("clip_vision", SamplingSpec(event_frames=3)),
        "thermal": ("imagebind", None),
    }
    assert set(readers) == set(modalities.input_names())
    for name, (backbone, sampling) in readers.items():
        spec = EncoderSpec(
            backbone=backbone,  # type: ignore[arg-type]
            checkpoint="unused",  # type: ignore[arg-type]
            select_feature="embedding" if backbone == "imagebind" else "patch",
            sampling=sampling,
            tokens=1,
            dim=8,
        )
        pictures = clip_preprocessor(32) if modalities.get(name).pictures else None
        pre = MediaPreprocessor(name, spec, pictures, limits=EncoderLimits())
        prepared = pre.prepare(modalities.get(name).hook("dummy")())
        assert prepared.inputs.size and prepared.times.ndim == 1, name


def test_register_refuses_a_taken_name_or_part_type() -> None:
    image = modalities.get("image")
    with pytest.raises(ValueError, match="'image' is registered already"):
        modalities.register(image)
    with pytest.raises(ValueError, match=r"part types \['video_url'\] are taken"):
        modalities.register(replace(image, name="smell", url_part="video_url"))
    with pytest.raises(ValueError, match=r"part types \['input_media'\] are taken"):
        modalities.register(Modality(name="smell", noun=("x", "xs"), inline_part="input_media"))
    assert "smell" not in modalities.MODALITIES


def test_count_in_words() -> None:
    assert modalities.get("audio").count(1) == "1 audio clip"
    assert modalities.get("image").count(3) == "3 images"


@pytest.mark.parametrize(
    ("modules", "heavy"),
    [
        (
            "services.common.modalities, services.common.presets",
            ("torch", "numpy", "av", "decord", "diffusers", "PIL"),
        ),
        ("gateway.protocol, gateway.media, gateway.grpc_chat", ("torch", "av", "decord", "diffusers")),
    ],
)
def test_the_registry_imports_without_torch_or_decoders(modules: str, heavy: tuple[str, ...]) -> None:
    code = f"import sys; import {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- a modality added by one record -----------------------------------------------------------


@pytest.fixture
def depth() -> Iterator[Modality]:
    """ImageBind's depth modality, registered for one test (a single-channel image, read by the
    generic parts only) and removed after it."""
    record = Modality(
        name="depth",
        noun=("depth map", "depth maps"),
        data_url_types=("image/",),
        limit_settings=("image_max_pixels",),
        backbones=("imagebind",),
        prepare=f"{modalities.PREPARE}:prepare_image",
        dummy=f"{modalities.DUMMIES}:dummy_png",
    )
    modalities.register(record)
    yield record
    del modalities._REGISTRY["depth"]


def test_a_registered_modality_is_taken_by_presets_and_the_gateway(depth: Modality, tmp_path: Path) -> None:
    from gateway.media import MediaFetcher
    from gateway.protocol import parse_chat_request
    from gateway.serving import _count
    from services.common.presets import parse_preset

    text = (PRESETS / "tiny-pandagpt.yaml").read_text()
    section = '  depth:\n    encoder: {<<: *imagebind, preprocess: {crop: floor}}\n    connector: *proj\n    placeholder: "<depth>"\n'
    text = text.replace("\nmedia_combine:", section + "\nmedia_combine:", 1)
    preset = parse_preset(text, cache_dir=tmp_path)
    assert list(preset.modalities) == ["image", "video", "audio", "thermal", "depth"]
    assert preset.triton_model("depth") == "depth_imagebind"

    clip = section.replace(
        "{<<: *imagebind, preprocess: {crop: floor}}",
        "{<<: *imagebind, backbone: clip_vision, select_feature: patch}",
    )
    with pytest.raises(
        InvalidArgumentError,
        match=r"modalities\.depth\.encoder\.backbone: clip_vision reads \['image', 'video', 'event'\], not depth",
    ):
        parse_preset(text.replace(section, clip), cache_dir=tmp_path)

    part = {"type": "input_media", "input_media": {"modality": "depth", "url": "data:image/png;base64,UE5H"}}
    request = parse_chat_request({"messages": [{"role": "user", "content": [part]}]})
    (item,) = request.to_domain("r").media()
    assert (item.modality, item.url) == ("depth", "data:image/png;base64,UE5H")
    bad_format = part | {"input_media": {"modality": "depth", "data": "UE5H", "format": "exr"}}
    with pytest.raises(InvalidArgumentError, match=r"input_media\.format: expected no format for depth"):
        parse_chat_request({"messages": [{"role": "user", "content": [bad_format]}]})

    fetcher = MediaFetcher(max_bytes=100, timeout_s=1.0)
    assert asyncio.run(fetcher.load("data:image/png;base64,UE5H", "depth")) == b"PNG"
    with pytest.raises(
        InvalidArgumentError, match=r"data URL media type: expected image/\*, got 'audio/wav'"
    ):
        asyncio.run(fetcher.load("data:audio/wav;base64,UE5H", "depth"))
    assert _count(2, "depth") == "2 depth maps"


def test_the_settings_a_record_names_exist() -> None:
    from services.common.settings import Settings

    fields = Settings.model_fields
    for record in modalities.MODALITIES.values():
        for name in (record.fetch_timeout_setting, *record.limit_settings):
            assert name in fields, (record.name, name)
