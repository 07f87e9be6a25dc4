"""Image decoding and CLIP preprocessing: parity with transformers' CLIPImageProcessorPil and
every kind of bad input."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import CLIPImageProcessorPil

from services.common.errors import InvalidArgumentError, NotFoundError
from services.models.media.image import ClipImagePreprocessor, crop_offset, decode_image
from tests.helpers.media import encode_image, jpeg_bytes, png_bytes, random_image

MAX_PIXELS = 10_000_000
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# (shortest_edge, crop (h, w), resample): the tiny preset's, a real one, a non-square crop
# taken from a larger resize, and a resize smaller than the crop (zero padding).
CONFIGS = [
    (32, (32, 32), 3),
    (224, (224, 224), 3),
    (40, (32, 30), 2),
    (24, (32, 32), 3),
]
# (width, height): square, landscape, portrait, tiny, smaller than the crop, extreme ratios.
SIZES = [(32, 32), (64, 48), (17, 50), (100, 33), (10, 10), (1, 40), (3, 1), (99, 101), (640, 480)]


def _save_config(folder: Path, shortest: int, crop: tuple[int, int], resample: int) -> Path:
    CLIPImageProcessorPil(
        size={"shortest_edge": shortest},
        crop_size={"height": crop[0], "width": crop[1]},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=resample,
        do_convert_rgb=True,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"edge{c[0]}-crop{c[1][0]}x{c[1][1]}")
def processors(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = _save_config(tmp_path_factory.mktemp("pre"), *request.param)
    return ClipImagePreprocessor.from_pretrained(folder), CLIPImageProcessorPil.from_pretrained(folder)


def _reference(ref: CLIPImageProcessorPil, image: Image.Image) -> np.ndarray:
    return ref(images=[image], return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_clip_image_processor_pil(processors, size: tuple[int, int]) -> None:
    ours, ref = processors
    image = random_image(*size, seed=size[0] * 1000 + size[1])
    got = ours([image])
    want = _reference(ref, image)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (1, 3, *ours.output_size)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_tiny_checkpoint_config_matches(tiny_preset) -> None:
    folder = tiny_preset.modalities["image"].encoder.checkpoint
    ours = ClipImagePreprocessor.from_pretrained(folder)
    ref = CLIPImageProcessorPil.from_pretrained(folder)
    images = [random_image(50, 30, seed=1), random_image(30, 50, seed=2)]
    got = ours(images)
    assert got.shape == (2, 3, 32, 32) and got.flags.c_contiguous
    np.testing.assert_allclose(got, ref(images=images, return_tensors="np")["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_decode_and_preprocess_matches_reference_for_every_mode(processors, mode: str) -> None:
    ours, ref = processors
    image = random_image(45, 37, mode=mode, seed=7)
    data = encode_image(image, "PNG", **({"transparency": 3} if mode == "P" else {}))
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    want = _reference(ref, Image.open(io.BytesIO(data)))  # HF composites alpha onto white itself
    np.testing.assert_allclose(ours([decoded]), want, atol=1e-5, rtol=0)


def test_transparency_is_flattened_onto_white_or_dropped() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    half = Image.new("LA", (8, 8), (0, 128))
    palette = Image.new("P", (8, 8), 0)
    for image, kw in [(clear, {}), (half, {}), (palette, {"transparency": 0})]:
        out = np.asarray(decode_image(encode_image(image, "PNG", **kw), max_pixels=MAX_PIXELS))
        assert out.shape == (8, 8, 3)
        expected = 127 if image.mode == "LA" else 255  # 0 over white at alpha 128 -> 127
        assert abs(int(out.min()) - expected) <= 1 and abs(int(out.max()) - expected) <= 1
        # "drop" is PIL's convert("RGB"), what every seed runs: the colour under the alpha.
        dropped = decode_image(encode_image(image, "PNG", **kw), max_pixels=MAX_PIXELS, transparency="drop")
        np.testing.assert_array_equal(np.asarray(dropped), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decodes_accepted_formats(fmt: str) -> None:
    image = random_image(20, 12, seed=3)
    decoded = decode_image(encode_image(image, fmt), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.size == (20, 12)


def test_empty_input() -> None:
    with pytest.raises(
        InvalidArgumentError,
        match=r"empty image: expected the bytes of an image "
        r"file \(PNG, JPEG.*\), got 0 bytes",
    ):
        decode_image(b"", max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("data", [b"hello, this is text", b"\x00" * 64, b"%PDF-1.4 ..."])
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        decode_image(data, max_pixels=MAX_PIXELS)
    message = info.value.message
    assert message.startswith("not an image: expected the bytes of an image file (PNG, JPEG")
    assert f"got {len(data)} bytes starting with {data[:4].hex(' ')}" in message


@pytest.mark.parametrize("drop", [6000, 100, 16])  # bytes cut off the end (16: the IEND chunk)
def test_truncated_png(drop: int) -> None:
    data = png_bytes(64, 64)
    cut = data[:-drop]
    with pytest.raises(
        InvalidArgumentError,
        match=r"corrupt or truncated image: expected a "
        rf"complete PNG file, got {len(cut)} bytes",
    ):
        decode_image(cut, max_pixels=MAX_PIXELS)


def test_png_cut_in_header() -> None:
    with pytest.raises(InvalidArgumentError, match=r"corrupt or truncated image: .* PNG"):
        decode_image(png_bytes()[:30], max_pixels=MAX_PIXELS)


def test_truncated_jpeg() -> None:
    data = jpeg_bytes(64, 64)
    with pytest.raises(InvalidArgumentError, match=r"corrupt or truncated image: .* JPEG file"):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)


def test_corrupt_png_body() -> None:
    data = bytearray(png_bytes(64, 64))
    middle = len(data) // 2
    data[middle : middle + 200] = bytes(200)
    with pytest.raises(InvalidArgumentError, match="corrupt or truncated image"):
        decode_image(bytes(data), max_pixels=MAX_PIXELS)


def test_truncation_detected_even_if_pil_was_told_to_allow_it(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = png_bytes(64, 64)
    with pytest.raises(InvalidArgumentError, match="corrupt or truncated image"):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_many_pixels_is_checked_before_decoding(monkeypatch) -> None:
    data = png_bytes(64, 48)

    def no_decode(self):  # pragma: no cover - must not run
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(
        InvalidArgumentError,
        match=r"image too large: expected at most 3000 pixels, "
        r"got 64x48 \(3072 pixels\)",
    ):
        decode_image(data, max_pixels=3000)


def test_at_the_pixel_limit_is_accepted() -> None:
    assert decode_image(png_bytes(64, 48), max_pixels=64 * 48).size == (64, 48)


def test_from_pretrained_missing_config(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"preprocessor_config\.json"):
        ClipImagePreprocessor.from_pretrained(tmp_path)


def test_from_dict_old_int_sizes() -> None:
    pre = ClipImagePreprocessor.from_dict({"size": 224, "crop_size": 224})
    assert pre.size == {"shortest_edge": 224}
    assert pre.output_size == (224, 224)


def test_from_dict_rejects_bad_size() -> None:
    with pytest.raises(InvalidArgumentError, match="size: expected"):
        ClipImagePreprocessor.from_dict({"size": {"longest_edge": 3}})


def test_extreme_aspect_ratio_is_refused(processors) -> None:
    ours, _ = processors
    with pytest.raises(InvalidArgumentError, match=r"aspect ratio: expected at most 200:1, got 1x201"):
        ours.preprocess_one(random_image(1, 201))
    assert ours.preprocess_one(random_image(200, 1)).shape == (3, *ours.output_size)


def test_from_dict_rejects_unknown_resample() -> None:
    with pytest.raises(InvalidArgumentError, match="resample expected a PIL filter 0-5, got 9"):
        ClipImagePreprocessor.from_dict({"resample": 9})


def test_crop_offset_rules() -> None:
    """floor: HF and E.T. Chat; round: torchvision's int(round(margin / 2.0)), halves to even;
    ceil: ImageBind's uniform_crop."""
    margins = range(12)
    assert [crop_offset(m, "floor") for m in margins] == [m // 2 for m in margins]
    assert [crop_offset(m, "round") for m in margins] == [round(m / 2.0) for m in margins]  # torchvision
    assert [crop_offset(m, "ceil") for m in margins] == [math.ceil(m / 2) for m in margins]
    assert [crop_offset(m, "round") for m in (3, 5, 7, 11)] == [2, 2, 4, 6]  # 1.5, 2.5, 3.5, 5.5


@pytest.mark.parametrize(("rounding", "top"), [("floor", 5), ("round", 6), ("ceil", 6)])
def test_crop_rounding_moves_the_crop(rounding: str, top: int) -> None:
    image = Image.fromarray(np.arange(32 * 43, dtype=np.uint8).reshape(43, 32).repeat(3).reshape(43, 32, 3))
    pre = ClipImagePreprocessor.from_dict(
        {"size": 32, "crop_size": 32, "do_normalize": False, "do_rescale": False}
    )
    out = replace(pre, crop_rounding=rounding).preprocess_one(image)  # (3, 32, 32), margin 11 rows
    np.testing.assert_array_equal(out[0], np.asarray(image)[top : top + 32, :, 0])


def test_tensor_resize_is_torchvision_on_float_pixels() -> None:
    """E.T. Chat's clip_center_224 at size 16: /255, Resize(16, antialias=True) (bilinear),
    centre crop at the floor, normalise, all in torch float32."""
    array = np.random.default_rng(3).integers(0, 256, (27, 40, 3), dtype=np.uint8)
    pre = replace(
        ClipImagePreprocessor.from_dict(
            {"size": 16, "crop_size": 16, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        ),
        tensor_resize=True,
    )
    got = pre.preprocess_one(Image.fromarray(array))
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(
        x, size=(16, 23), mode="bilinear", align_corners=False, antialias=True
    )
    x = x[..., :, 3:19]  # margin 7: floor 3
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    np.testing.assert_array_equal(got, x[0].numpy())
    assert not np.allclose(
        got, replace(pre, tensor_resize=False).preprocess_one(Image.fromarray(array)), atol=1e-3
    )


def test_squashed_resizes_without_a_crop() -> None:
    pre = ClipImagePreprocessor.from_dict({"size": 16, "crop_size": 16}).squashed()
    assert pre.output_size == (16, 16) and not pre.do_center_crop
    assert pre.preprocess_one(random_image(50, 20)).shape == (3, 16, 16)
