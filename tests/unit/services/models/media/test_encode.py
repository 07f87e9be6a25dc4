"""MediaEncoder per modality on generated media: feature shapes and times of every tiny twin,
items failing alone in a batch, results equal to the parts called directly, the limits from
settings and a bfloat16 CLIP tower (EventGPT's) on the CPU. The image modality in detail:
per-item errors inside a batch, batched results equal to single ones, all-bad and empty
batches, size limits, internal preprocessing failures kept to their item, warm-up, and the
preprocessor/backbone size check."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.content import MediaFeatures
from services.common.errors import InvalidArgumentError, ModalmeshError, PayloadTooLargeError
from services.common.presets import EncoderSpec, Preset
from services.common.settings import Settings
from services.models.backbones.build import build_backbone
from services.models.media.dummies import dummy_png
from services.models.media.encode import EncoderLimits, MediaEncoder
from services.models.media.events import EventLimits, event_frames, parse_events
from services.models.media.image import ClipImagePreprocessor, decode_image
from tests.helpers.media import jpeg_bytes, make_audio, make_events, make_video, png_bytes

CASES = {
    # (preset, modality): (media, features shape, frames)
    ("tiny", "image"): (lambda: png_bytes(48, 40), (16, 64), 1),
    ("tiny-pandagpt", "image"): (lambda: png_bytes(48, 40), (1, 32), 1),
    ("tiny-pandagpt", "video"): (lambda: make_video(24, 4), (1, 32), 1),
    ("tiny-pandagpt", "audio"): (lambda: make_audio(3.0, 22050), (1, 32), 1),
    ("tiny-videochat", "video"): (lambda: make_video(16, 4), (4 * 2 * 5, 32), 4),
    ("tiny-videochat", "image"): (lambda: png_bytes(48, 40), (2 * 5, 32), 1),
    ("tiny-etchat", "video"): (lambda: make_video(12, 4), (3 * 4, 32), 3),
    ("tiny-eventgpt", "event"): (lambda: make_events(3000, 64, 48), (5 * 17, 64), 5),
}


@pytest.fixture(scope="module")
def encoders(twins: dict[str, Preset]) -> Iterator[dict[tuple[str, str], MediaEncoder]]:
    out = {
        (name, modality): MediaEncoder.from_spec(
            modality, twins[name].modalities[modality].encoder, device="cpu", decode_workers=2
        )
        for name, modality in CASES
    }
    yield out
    for encoder in out.values():
        encoder.close()


def _ok(result: MediaFeatures[np.ndarray] | ModalmeshError) -> MediaFeatures[np.ndarray]:
    assert isinstance(result, MediaFeatures), result
    return result


@pytest.mark.parametrize("case", list(CASES), ids=["/".join(c) for c in CASES])
def test_features_and_times_per_modality(encoders, case) -> None:
    make, shape, frames = CASES[case]
    item = _ok(encoders[case].encode([make()])[0])
    assert item.features.shape == shape and item.features.dtype == np.float32
    assert item.features.flags.c_contiguous and np.isfinite(item.features).all()
    assert item.modality == case[1] and len(item.times) == frames  # one time per frame
    encoders[case].warmup()


def test_video_times_follow_the_sampling(encoders) -> None:
    videochat = _ok(encoders["tiny-videochat", "video"].encode([make_video(16, 4)])[0])
    # VideoChat: 4 segments of 16 frames, seg 3.75, start 1 -> 1, 5, 9, 12 at 4 fps
    np.testing.assert_allclose(videochat.times, [0.25, 1.25, 2.25, 3.0])
    short, at_cap, long = encoders["tiny-etchat", "video"].encode(
        [make_video(8, 4), make_video(32, 4), make_video(48, 4)]
    )
    np.testing.assert_allclose(_ok(short).times, [0.0, 1.0])  # 1 fps
    assert len(_ok(at_cap).times) == 8 and _ok(at_cap).features.shape == (8 * 4, 32)  # max_frames 8
    assert isinstance(long, InvalidArgumentError) and "max_frames = 8" in long.message  # 12 s: refused


def test_a_bad_item_fails_alone(encoders) -> None:
    enc = encoders["tiny-etchat", "video"]
    good = make_video(8, 4)
    truncated = make_video(8, 4, faststart=True)[:600]
    results = enc.encode([good, b"not a video at all", truncated, b"", good])
    assert [type(r).__name__ for r in results] == [
        "MediaFeatures",
        "InvalidArgumentError",
        "InvalidArgumentError",
        "InvalidArgumentError",
        "MediaFeatures",
    ]
    assert results[1].message.startswith("not a video")  # type: ignore[union-attr]
    assert results[2].message.startswith("corrupt or truncated video")  # type: ignore[union-attr]
    assert results[3].message.startswith("empty video")  # type: ignore[union-attr]
    (alone,) = enc.encode([good])
    np.testing.assert_allclose(_ok(results[0]).features, _ok(alone).features, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_ok(results[4]).features, _ok(alone).features, atol=1e-5, rtol=0)

    audio = encoders["tiny-pandagpt", "audio"]
    silent, ok = audio.encode([make_audio(1.0, 16000, amplitude=0.0), make_audio(1.0, 16000)])
    assert isinstance(silent, InvalidArgumentError) and "silent" in silent.message
    assert _ok(ok).features.shape == (1, 32)
    event = encoders["tiny-eventgpt", "event"]
    few, unsorted_ok = event.encode([make_events(3, 10, 10), make_events(100, 10, 10)])
    assert isinstance(few, InvalidArgumentError) and "at least 5 events" in few.message
    assert len(_ok(unsorted_ok).times) == 5


def test_event_features_are_the_clip_frames(encoders) -> None:
    enc = encoders["tiny-eventgpt", "event"]
    data = make_events(2000, 40, 30, form="npz", seed=3)
    item = _ok(enc.encode([data])[0])
    stream = parse_events(data, limits=EventLimits())
    frames = event_frames(stream, num_frames=5)
    assert enc.preprocessor is not None
    pixels = torch.from_numpy(np.stack([enc.preprocessor.preprocess_one(Image.fromarray(f)) for f in frames]))
    want = enc.backbone.encode("event", pixels).reshape(-1, 64).numpy()  # (5 * 17, 64)
    np.testing.assert_allclose(item.features, want, atol=1e-5, rtol=0)
    per = len(stream) // 5
    np.testing.assert_allclose(
        item.times, (stream.t[[0, per, 2 * per, 3 * per, 4 * per]] - stream.t[0]) / 1e6
    )


def test_event_tower_in_bfloat16_on_the_cpu(twins: dict[str, Preset], encoders) -> None:
    """EventGPT runs its CLIP tower in bfloat16; the same spec must serve on a CPU-only host."""
    spec = twins["tiny-eventgpt"].modalities["event"].encoder
    bf16 = MediaEncoder.from_spec(
        "event", spec.model_copy(update={"dtype": "bfloat16"}), device="cpu", decode_workers=1
    )
    try:
        data = make_events(2000, 40, 30, seed=5)
        got = _ok(bf16.encode([data])[0])
        assert next(bf16.backbone.parameters()).dtype == torch.bfloat16
        assert got.features.dtype == np.float32 and np.isfinite(got.features).all()
        want = _ok(encoders["tiny-eventgpt", "event"].encode([data])[0]).features  # float32 tower
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got.features, want, atol=0.05 * scale, rtol=0)  # bfloat16: 8 bits
    finally:
        bf16.close()


def test_limits_come_from_settings(twins: dict[str, Preset]) -> None:
    settings = Settings(video_max_seconds=1.0, audio_max_bytes=1000, event_max_events=50)
    limits = EncoderLimits.from_settings(settings)
    assert (limits.video.max_seconds, limits.audio.max_bytes, limits.event.max_events) == (1.0, 1000, 50)
    spec = twins["tiny-etchat"].modalities["video"].encoder
    enc = MediaEncoder.from_spec("video", spec, limits=limits, device="cpu", decode_workers=1)
    try:
        (too_long,) = enc.encode([make_video(8, 4)])
        assert isinstance(too_long, InvalidArgumentError) and too_long.message.startswith("video too long")
    finally:
        enc.close()
    audio = twins["tiny-pandagpt"].modalities["audio"].encoder
    enc = MediaEncoder.from_spec("audio", audio, limits=limits, device="cpu", decode_workers=1)
    try:
        (too_big,) = enc.encode([make_audio(1.0, 16000)])
        assert isinstance(too_big, PayloadTooLargeError)
    finally:
        enc.close()


def test_imagebind_video_needs_its_clip_length(twins: dict[str, Preset]) -> None:
    spec = twins["tiny-pandagpt"].modalities["video"].encoder
    assert spec.sampling is not None
    three = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"frames_per_clip": 3})})
    with pytest.raises(InvalidArgumentError, match=r"frames_per_clip = 2 .* got 3"):
        MediaEncoder.from_spec("video", three, device="cpu")


# --- the image modality in detail (the `tiny` preset: clip_vision, 32x32 -> (16, 64)) ---------


@pytest.fixture(scope="module")
def image_spec(twins: dict[str, Preset]) -> EncoderSpec:
    return twins["tiny"].modalities["image"].encoder


@pytest.fixture
def image_encoder(encoders) -> MediaEncoder:
    return encoders["tiny", "image"]  # decode_workers=2, default limits


def test_image_one_bad_item_does_not_fail_its_batch(image_encoder: MediaEncoder) -> None:
    good = [png_bytes(48, 40, seed=1), jpeg_bytes(30, 70, seed=2), png_bytes(33, 33, seed=3)]
    truncated = good[0][: len(good[0]) // 2]
    batch = [good[0], b"not an image at all", good[1], truncated, good[2], b""]
    results = image_encoder.encode(batch)
    assert len(results) == len(batch)
    for i, why in [(1, "not an image"), (3, "corrupt or truncated image"), (5, "empty image")]:
        assert isinstance(results[i], InvalidArgumentError), results[i]
        assert results[i].message.startswith(why)  # type: ignore[union-attr]
    for i, data in [(0, good[0]), (2, good[1]), (4, good[2])]:
        got = _ok(results[i])
        assert got.features.shape == (16, 64) and got.features.dtype == np.float32
        assert got.features.flags.c_contiguous
        np.testing.assert_array_equal(got.times, np.zeros(1, dtype=np.float32))
        (alone,) = image_encoder.encode([data])
        np.testing.assert_allclose(got.features, _ok(alone).features, atol=1e-5, rtol=0)


def test_image_matches_preprocessor_and_backbone_called_directly(
    image_encoder: MediaEncoder, image_spec: EncoderSpec
) -> None:
    data = jpeg_bytes(50, 20, seed=4)
    pre = ClipImagePreprocessor.from_pretrained(image_spec.checkpoint)
    backbone = build_backbone(image_spec, modalities=["image"], device="cpu")
    pixels = torch.from_numpy(pre([decode_image(data, max_pixels=10**6)]))  # (1, 3, 32, 32)
    want = backbone.encode("image", pixels)[0].numpy()  # (16, 64)
    np.testing.assert_allclose(_ok(image_encoder.encode([data])[0]).features, want, atol=1e-6, rtol=0)


def test_image_all_bad_batch_and_empty_batch(image_encoder: MediaEncoder) -> None:
    assert image_encoder.encode([]) == []
    results = image_encoder.encode([b"x", b"y"])
    assert len(results) == 2 and all(isinstance(r, InvalidArgumentError) for r in results)


def test_image_too_large_is_an_item_error(image_spec: EncoderSpec) -> None:
    small = MediaEncoder.from_spec(
        "image", image_spec, limits=EncoderLimits(image_max_pixels=1000), device="cpu", decode_workers=1
    )
    try:
        big, ok = small.encode([png_bytes(64, 64), png_bytes(20, 20)])
        assert isinstance(big, InvalidArgumentError) and "image too large" in big.message
        assert _ok(ok).features.shape == (16, 64)
    finally:
        small.close()


def test_image_unexpected_preprocessing_failure_stays_with_its_item(
    image_encoder: MediaEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert image_encoder.preprocessor is not None
    real = image_encoder.preprocessor.preprocess_one
    calls = {"n": 0}

    def flaky(image: Image.Image) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(image)

    stub = type("FlakyPreprocessor", (), {"preprocess_one": staticmethod(flaky)})()
    monkeypatch.setattr(image_encoder.media, "frames", stub)  # MediaPreprocessor.pictures calls it per frame
    monkeypatch.setattr(image_encoder, "_pool", None)  # sequential, so the first item is the one failing
    first, second = image_encoder.encode([png_bytes(seed=5), png_bytes(seed=6)])
    assert type(first) is ModalmeshError and "RuntimeError" in first.message
    assert _ok(second).features.shape == (16, 64)


def test_image_warmup_and_properties(image_encoder: MediaEncoder) -> None:
    image_encoder.warmup()
    assert (image_encoder.tokens_per_frame, image_encoder.dim) == (16, 64)
    assert (image_encoder.backbone.tokens, image_encoder.backbone.dim) == (16, 64)
    assert decode_image(dummy_png(32), max_pixels=10**4).size == (32, 32)


def test_image_preprocessor_and_backbone_sizes_must_agree(image_encoder: MediaEncoder, image_spec) -> None:
    pre = ClipImagePreprocessor.from_dict({"size": 64, "crop_size": 64})
    with pytest.raises(
        InvalidArgumentError,
        match=r"image encoder: the preprocessor makes \(64, 64\) images, the backbone expects \(32, 32\)",
    ):
        MediaEncoder("image", image_spec, image_encoder.backbone, pre, limits=EncoderLimits())
    with pytest.raises(InvalidArgumentError, match=r"makes None images"):
        MediaEncoder("image", image_spec, image_encoder.backbone, None, limits=EncoderLimits())
