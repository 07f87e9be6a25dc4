"""ImageEncoder: per-item errors inside a batch, batched results equal to single ones."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.presets import EncoderSpec
from services.encoders.backbones import ClipVisionBackbone
from services.encoders.model import ImageEncoder, dummy_png
from services.encoders.preprocess import ClipImagePreprocessor, decode_image
from tests.helpers.media import jpeg_bytes, png_bytes


@pytest.fixture(scope="module")
def spec(tiny_preset) -> EncoderSpec:
    return tiny_preset.modalities["image"].encoder


@pytest.fixture(scope="module")
def encoder(spec: EncoderSpec) -> Iterator[ImageEncoder]:
    enc = ImageEncoder.from_spec(spec, max_pixels=1_000_000, decode_workers=2)
    yield enc
    enc.close()


def _ok(result: np.ndarray | ModalmeshError) -> np.ndarray:
    assert isinstance(result, np.ndarray), result
    return result


def test_one_bad_item_does_not_fail_its_batch(encoder: ImageEncoder) -> None:
    good = [png_bytes(48, 40, seed=1), jpeg_bytes(30, 70, seed=2), png_bytes(33, 33, seed=3)]
    truncated = good[0][: len(good[0]) // 2]
    batch = [good[0], b"not an image at all", good[1], truncated, good[2], b""]
    results = encoder.encode(batch)
    assert len(results) == len(batch)
    for i, why in [(1, "not an image"), (3, "corrupt or truncated image"), (5, "empty image")]:
        assert isinstance(results[i], InvalidArgumentError), results[i]
        assert results[i].message.startswith(why)  # type: ignore[union-attr]
    for i, data in [(0, good[0]), (2, good[1]), (4, good[2])]:
        got = _ok(results[i])
        assert got.shape == (16, 64) and got.dtype == np.float32 and got.flags.c_contiguous
        (alone,) = encoder.encode([data])
        np.testing.assert_allclose(got, _ok(alone), atol=1e-5, rtol=0)


def test_matches_preprocessor_and_backbone_called_directly(encoder, spec) -> None:
    data = jpeg_bytes(50, 20, seed=4)
    pre = ClipImagePreprocessor.from_pretrained(spec.checkpoint)
    backbone = ClipVisionBackbone.from_pretrained(spec.checkpoint)
    pixels = torch.from_numpy(pre([decode_image(data, max_pixels=10**6)]))  # (1, 3, 32, 32)
    want = backbone(pixels)[0].numpy()  # (16, 64)
    np.testing.assert_allclose(_ok(encoder.encode([data])[0]), want, atol=1e-6, rtol=0)


def test_all_bad_batch_and_empty_batch(encoder: ImageEncoder) -> None:
    assert encoder.encode([]) == []
    results = encoder.encode([b"x", b"y"])
    assert all(isinstance(r, InvalidArgumentError) for r in results)


def test_too_large_image_is_an_item_error(spec: EncoderSpec) -> None:
    small = ImageEncoder.from_spec(spec, max_pixels=1000, decode_workers=1)
    try:
        big, ok = small.encode([png_bytes(64, 64), png_bytes(20, 20)])
        assert isinstance(big, InvalidArgumentError) and "image too large" in big.message
        assert _ok(ok).shape == (16, 64)
    finally:
        small.close()


def test_unexpected_preprocessing_failure_stays_with_its_item(encoder, monkeypatch) -> None:
    real = encoder.preprocessor.preprocess_one
    calls = {"n": 0}

    def flaky(image):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(image)

    monkeypatch.setattr(encoder, "preprocessor", type("P", (), {"preprocess_one": staticmethod(flaky)})())
    monkeypatch.setattr(encoder, "_pool", None)  # sequential, so the first item is the one failing
    first, second = encoder.encode([png_bytes(seed=5), png_bytes(seed=6)])
    assert type(first) is ModalmeshError and "RuntimeError" in first.message
    assert _ok(second).shape == (16, 64)


def test_warmup_and_properties(encoder: ImageEncoder) -> None:
    encoder.warmup()
    assert (encoder.tokens, encoder.dim) == (16, 64)
    assert decode_image(dummy_png(32), max_pixels=10**4).size == (32, 32)


def test_preprocessor_and_backbone_sizes_must_agree(spec: EncoderSpec) -> None:
    pre = ClipImagePreprocessor.from_dict({"size": 64, "crop_size": 64})
    backbone = ClipVisionBackbone.from_pretrained(spec.checkpoint)
    with pytest.raises(
        InvalidArgumentError, match=r"makes \(64, 64\) images, the backbone expects \(32, 32\)"
    ):
        ImageEncoder(pre, backbone, max_pixels=10**6)
