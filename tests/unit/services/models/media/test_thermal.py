"""prepare_thermal: ImageBind's thermal transform on every picture mode, and the refusals.

tests/unit/parity/test_pandagpt_thermal.py holds it to the seed's own data.py; here the modes
PIL converts to grey, the resize and crop geometry, and each bad input's message.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.common.presets import EncoderSpec, PreprocessSpec
from services.models.media.image import MAX_ASPECT_RATIO
from services.models.media.prepare import EncoderLimits
from services.models.media.thermal import (
    THERMAL_SIZE,
    decode_thermal,
    dummy_thermal,
    prepare_thermal,
    prepare_thermal_item,
    thermal_input_size,
    thermal_pixels,
)
from tests.helpers.media import encode_image, png_bytes, random_image

LIMIT = 64 * 1024 * 1024


def _prepare(data: bytes, **kw: object) -> np.ndarray:
    return prepare_thermal(data, max_pixels=LIMIT, **kw)  # type: ignore[arg-type]


def test_output_is_one_channel_in_unit_range() -> None:
    out = _prepare(png_bytes(300, 250))
    assert out.shape == (1, THERMAL_SIZE, THERMAL_SIZE) and out.dtype == np.float32
    assert out.flags.c_contiguous and out.min() >= 0.0 and out.max() <= 1.0
    assert _prepare(png_bytes(40, 60), size=32).shape == (1, 32, 32)


def test_a_square_image_of_the_right_size_is_only_rescaled() -> None:
    grey = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 256
    data = encode_image(Image.fromarray(grey.astype(np.uint8)))
    out = _prepare(data, size=32)
    assert np.array_equal(out[0], grey.astype(np.float32) / np.float32(255))


def test_resize_shortest_edge_bicubic_then_crop_round() -> None:
    image = random_image(50, 63, mode="L", seed=3)  # -> 32 x 40 (int(32 * 63 / 50)), margin 8
    ours = _prepare(encode_image(image), size=32)
    resized = np.asarray(image.resize((32, 40), resample=Image.Resampling.BICUBIC))  # (40, 32)
    assert np.array_equal(ours[0], resized[4:36].astype(np.float32) / np.float32(255))


@pytest.mark.parametrize(("crop", "left"), [("round", 6), ("floor", 5), ("ceil", 6)])
def test_crop_rule_moves_an_odd_margin(crop: str, left: int) -> None:
    image = random_image(43, 32, mode="L", seed=4)  # already 32 high: margin 11 across
    ours = _prepare(encode_image(image), size=32, crop=crop)
    want = np.asarray(image)[:, left : left + 32].astype(np.float32) / np.float32(255)
    assert np.array_equal(ours[0], want)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "I;16", "LA", "RGBA"])
def test_every_mode_is_pils_grey_conversion(mode: str) -> None:
    image = random_image(32, 32, mode="RGB", seed=5)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 3)  # I;16
    elif mode != "RGB":
        image = image.convert(mode)
    ours = _prepare(encode_image(image), size=32)
    want = np.asarray(Image.open(io.BytesIO(encode_image(image))).convert("L"))  # the seed's call
    assert np.array_equal(ours[0], want.astype(np.float32) / np.float32(255))


def test_transparency_drop_is_the_seeds_and_white_composites() -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 40
    rgba[:, 16:, 3] = 255  # left half transparent
    data = encode_image(Image.fromarray(rgba))
    dropped = _prepare(data, size=32)
    white = _prepare(data, size=32, transparency="white")
    assert np.allclose(dropped, 40 / 255)  # convert("L") ignores alpha
    assert np.allclose(white[0, :, :16], 1.0) and np.allclose(white[0, :, 16:], 40 / 255)
    assert decode_thermal(data, max_pixels=LIMIT).mode == "L"


def test_jpeg_and_dummy_decode() -> None:
    grey = encode_image(random_image(40, 30, mode="L"), "JPEG", quality=90)
    assert _prepare(grey, size=16).shape == (1, 16, 16)
    assert _prepare(dummy_thermal(), size=16).shape == (1, 16, 16)
    assert Image.open(io.BytesIO(dummy_thermal())).mode == "L"


def test_empty_input_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="empty image: expected the bytes of an image file"):
        _prepare(b"")


def test_not_an_image_is_refused() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"not an image: expected .* got 11 bytes starting with 68 65"
    ):
        _prepare(b"hello world")


def test_truncated_png_is_refused() -> None:
    data = png_bytes(64, 64)
    with pytest.raises(
        InvalidArgumentError, match="corrupt or truncated image: expected a complete PNG file"
    ):
        _prepare(data[: len(data) // 2])
    with pytest.raises(InvalidArgumentError, match="no IEND chunk"):
        _prepare(data[:-12])


def test_too_many_pixels_is_refused() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"image too large: expected at most 1000 pixels, got 48x40"
    ):
        prepare_thermal(png_bytes(48, 40), max_pixels=1000)


def test_too_elongated_is_refused() -> None:
    data = encode_image(Image.new("L", (MAX_ASPECT_RATIO * 2 + 2, 2)))
    with pytest.raises(
        InvalidArgumentError, match=r"thermal image aspect ratio: expected at most 200:1, got 402x2"
    ):
        _prepare(data)


def test_bad_size_and_mode_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="thermal size: expected a positive side, got 0"):
        _prepare(png_bytes(), size=0)
    with pytest.raises(InvalidArgumentError, match="expected a grey \\(mode L\\) image, got mode RGB"):
        thermal_pixels(Image.new("RGB", (8, 8)), size=8)


@dataclass(frozen=True)
class _Preprocessing:
    """The two fields of a MediaPreprocessor that the prepare hook reads."""

    spec: EncoderSpec
    limits: EncoderLimits


def _spec(**update: object) -> EncoderSpec:
    spec = EncoderSpec(
        backbone="imagebind",
        checkpoint="imagebind_huge.pth",
        select_feature="embedding",
        preprocess=PreprocessSpec(crop="round"),
        tokens=1,
        dim=1024,
    )
    return spec.model_copy(update=update)


def test_the_prepare_hook_reads_the_spec_and_limits() -> None:
    data = png_bytes(50, 63)
    item = prepare_thermal_item(_Preprocessing(_spec(), EncoderLimits()), data)
    assert item.inputs.shape == (1, 224, 224) and item.times.tolist() == [0.0]
    assert np.array_equal(item.inputs, _prepare(data))
    tiny = _spec(config={"thermal_image_size": 32}, preprocess=PreprocessSpec(crop="floor"))
    assert thermal_input_size(tiny) == 32 and thermal_input_size(_spec()) == 224
    small = prepare_thermal_item(_Preprocessing(tiny, EncoderLimits()), data)
    assert np.array_equal(small.inputs, _prepare(data, size=32, crop="floor"))
    with pytest.raises(InvalidArgumentError, match="image too large: expected at most 100 pixels"):
        prepare_thermal_item(_Preprocessing(_spec(), EncoderLimits(image_max_pixels=100)), data)
