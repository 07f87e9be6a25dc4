"""MediaEncoder per modality on generated media: feature shapes and times of every tiny twin,
items failing alone in a batch, results equal to the parts called directly, ImageBind's video
crops, and the limits from settings."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgumentError, ModalmeshError, PayloadTooLargeError
from services.common.presets import Preset
from services.common.settings import Settings
from services.encoders.events import EventLimits, event_frames, parse_events
from services.encoders.media import EncoderLimits, MediaEncoder, event_times, imagebind_video
from services.encoders.protocol import EncodedItem
from tests.helpers.media import make_audio, make_events, make_video, png_bytes

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


def _ok(result: EncodedItem | ModalmeshError) -> EncodedItem:
    assert isinstance(result, EncodedItem), result
    return result


@pytest.mark.parametrize("case", list(CASES), ids=["/".join(c) for c in CASES])
def test_features_and_times_per_modality(encoders, case) -> None:
    make, shape, frames = CASES[case]
    item = _ok(encoders[case].encode([make()])[0])
    assert item.features.shape == shape and item.features.dtype == np.float32
    assert item.features.flags.c_contiguous and np.isfinite(item.features).all()
    assert item.times.dtype == np.float32 and item.frames == frames
    encoders[case].warmup()


def test_video_times_follow_the_sampling(encoders) -> None:
    videochat = _ok(encoders["tiny-videochat", "video"].encode([make_video(16, 4)])[0])
    # VideoChat: 4 segments of 16 frames, seg 3.75, start 1 -> 1, 5, 9, 12 at 4 fps
    np.testing.assert_allclose(videochat.times, [0.25, 1.25, 2.25, 3.0])
    short, long = encoders["tiny-etchat", "video"].encode([make_video(8, 4), make_video(48, 4)])
    np.testing.assert_allclose(_ok(short).times, [0.0, 1.0])  # 1 fps
    assert _ok(long).frames == 8 and _ok(long).features.shape == (8 * 4, 32)  # max_frames 8


def test_a_bad_item_fails_alone(encoders) -> None:
    enc = encoders["tiny-etchat", "video"]
    good = make_video(8, 4)
    truncated = make_video(8, 4, faststart=True)[:600]
    results = enc.encode([good, b"not a video at all", truncated, b"", good])
    assert [type(r).__name__ for r in results] == [
        "EncodedItem",
        "InvalidArgumentError",
        "InvalidArgumentError",
        "InvalidArgumentError",
        "EncodedItem",
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
    assert _ok(unsorted_ok).frames == 5


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
    np.testing.assert_allclose(event_times(np.array([10, 20, 30, 40]), 2), [0.0, 2e-5], rtol=1e-6)


def _uniform_crop(x: np.ndarray, size: int, index: int) -> np.ndarray:
    """ImageBind's `uniform_crop` on (C, T, H, W), written out."""
    h, w = x.shape[2:]
    y0, x0 = int(np.ceil((h - size) / 2)), int(np.ceil((w - size) / 2))
    if h > w:
        y0 = {0: 0, 1: y0, 2: h - size}[index]
    else:
        x0 = {0: 0, 1: x0, 2: w - size}[index]
    return x[:, :, y0 : y0 + size, x0 : x0 + size]


@pytest.mark.parametrize("shape", [(36, 60), (60, 36)], ids=["landscape", "portrait"])
def test_imagebind_video_crops_match_a_direct_transform(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    h, w = shape
    frames = rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8)  # 2 clips x 2 frames
    out = imagebind_video(frames, clips=2, crops=3, size=28)
    assert out.shape == (6, 3, 2, 28, 28)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None, None]
    for k in range(2):
        clip = torch.from_numpy(frames[2 * k : 2 * k + 2]).permute(3, 0, 1, 2).float() / 255  # (C, T, H, W)
        new = (28, int(np.floor(w / h * 28))) if h <= w else (int(np.floor(h / w * 28)), 28)
        scaled = torch.nn.functional.interpolate(clip, size=new, mode="bilinear", align_corners=False)
        normed = (scaled.numpy() - mean) / std
        for c in range(3):
            np.testing.assert_allclose(out[3 * k + c], _uniform_crop(normed, 28, c), atol=1e-5)
    assert imagebind_video(frames, clips=2, crops=1, size=28).shape == (2, 3, 2, 28, 28)


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
