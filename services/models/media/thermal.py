"""Thermal images for ImageBind's thermal tower, as PandaGPT's demo reads them.

PandaGPT (`encode_thermal` in code/model/openllama.py) reads each thermal file with ImageBind's
`load_and_transform_thermal_data` (code/model/ImageBind/data.py):

    Image.open(f).convert("L")                      8-bit grey, PIL's ITU-R 601 luma for colour
    transforms.Resize(224, InterpolationMode.BICUBIC)   the shorter side to 224 (PIL bicubic),
                                                    the longer int(224 * long / short)
    transforms.CenterCrop(224)                      top-left at int(round(margin / 2.0))
    transforms.ToTensor()                           (1, 224, 224) float32 = uint8 / 255

and nothing else: no mean/std normalisation, no colour map undone. `prepare_thermal` does the
same with PIL and numpy (no torchvision): PIL's resize is what torchvision's Resize calls on a PIL
image (and, like it, skipped when the size is already right), the crop offset is
`image.crop_offset` ("round" is torchvision's; the preset's `preprocess.crop` picks it), and
the division is float32 as ToTensor's. tests/unit/parity/test_pandagpt_thermal.py holds it to
the seed's output within 1e-5.

Decoding goes through `image.load_image` (the formats, pixel limit, truncation and corruption
checks of the image modality); then PIL's `convert("L")`, which drops an alpha channel
(transparency "drop", the seed's) unless transparency "white" composites it onto white first.
Images more elongated than `image.MAX_ASPECT_RATIO` are refused before resizing.

`prepare_thermal_item(preprocessor, data)` is the same as the modality registry's prepare hook
(`(MediaPreprocessor, bytes) -> Prepared`): the spec's `preprocess` rules, the image pixel
limit, and the tower's side from the spec (`thermal_input_size`: `config.thermal_image_size`,
else imagebind_huge's 224; the backbone loader refuses a checkpoint whose tower reads another).
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.common.presets import EncoderSpec
from services.models.media.image import (
    MAX_ASPECT_RATIO,
    CropRounding,
    Transparency,
    convert_decoded,
    crop_offset,
    load_image,
    to_rgb,
)
from services.models.media.prepare import EncoderLimits, Prepared

THERMAL_SIZE = 224  # imagebind_huge's thermal tower reads 224 x 224 (1 channel)


def decode_thermal(data: bytes, *, max_pixels: int, transparency: Transparency = "drop") -> Image.Image:
    """Decode the bytes of a thermal image file into an 8-bit grey (mode "L") PIL image.

    Args:
        data: The compressed file (PNG, JPEG, WEBP, GIF, BMP or TIFF); any mode PIL converts
            to "L" (grey, colour, palette, 16-bit grey, with or without alpha).
        max_pixels: Largest width * height accepted; checked on the header, before decoding.
        transparency: "drop" (PIL's `convert("L")` ignores alpha: the seed's) or "white"
            (composite onto white first).

    Raises:
        InvalidArgumentError: Empty input, not an accepted image format, too many pixels, or a
            truncated or corrupt file.
    """
    image = load_image(data, max_pixels=max_pixels)
    if transparency == "white":
        return convert_decoded(image, data, lambda im: to_rgb(im, "white").convert("L"))
    return convert_decoded(image, data, lambda im: im.convert("L"))


def thermal_pixels(
    image: Image.Image, *, size: int = THERMAL_SIZE, crop: CropRounding = "round"
) -> np.ndarray:
    """A grey PIL image -> float32 (1, size, size) in [0, 1]: ImageBind's Resize, CenterCrop, ToTensor.

    Raises:
        InvalidArgumentError: A size under 1, or an image more elongated than MAX_ASPECT_RATIO.
    """
    if size < 1:
        raise InvalidArgumentError(f"thermal size: expected a positive side, got {size}")
    if image.mode != "L":
        raise InvalidArgumentError(f"thermal image: expected a grey (mode L) image, got mode {image.mode}")
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidArgumentError(
            f"thermal image aspect ratio: expected at most {MAX_ASPECT_RATIO}:1, got {width}x{height}"
        )
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)  # torchvision's _compute_resized_output_size
    new = (size, new_long) if width <= height else (new_long, size)  # (W, H)
    if new != image.size:  # torchvision returns the image as it is when the size is right
        image = image.resize(new, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (H, W)
    top, left = crop_offset(new[1] - size, crop), crop_offset(new[0] - size, crop)
    array = array[top : top + size, left : left + size]  # (size, size)
    pixels = array.astype(np.float32) / np.float32(255.0)  # ToTensor: float32 division
    return np.ascontiguousarray(pixels[None])  # (1, size, size)


def prepare_thermal(
    data: bytes,
    *,
    max_pixels: int,
    size: int = THERMAL_SIZE,
    crop: CropRounding = "round",
    transparency: Transparency = "drop",
) -> np.ndarray:
    """The bytes of a thermal image file -> the thermal tower's input, float32 (1, size, size).

    ImageBind's `load_and_transform_thermal_data` for one file (see the module docstring);
    `size` is the tower's side (`ImageBindBackbone.thermal_size`; 224 for imagebind_huge),
    `crop` and `transparency` the preset's `preprocess` rules ("round" and "drop" are the seed's).

    Raises:
        InvalidArgumentError: The file is refused (`decode_thermal`) or too elongated.
    """
    return thermal_pixels(
        decode_thermal(data, max_pixels=max_pixels, transparency=transparency), size=size, crop=crop
    )


def thermal_input_size(spec: EncoderSpec) -> int:
    """The side of the thermal tower `spec` names: `config.thermal_image_size`, else 224."""
    return int(spec.config.get("thermal_image_size", THERMAL_SIZE))


class ItemPreprocessing(Protocol):
    """What `prepare_thermal_item` reads of a `prepare.MediaPreprocessor`."""

    spec: EncoderSpec
    limits: EncoderLimits


def prepare_thermal_item(pre: ItemPreprocessing, data: bytes) -> Prepared:
    """One thermal file -> `Prepared`: float32 (1, S, S) for the thermal tower, time 0.

    Raises:
        InvalidArgumentError: The file is refused (see `prepare_thermal`).
    """
    rules = pre.spec.preprocess
    pixels = prepare_thermal(
        data,
        max_pixels=pre.limits.image_max_pixels,
        size=thermal_input_size(pre.spec),
        crop=rules.crop,
        transparency=rules.transparency,
    )
    return Prepared(pixels, np.zeros(1, dtype=np.float32))  # (1, S, S), one item at time 0


def dummy_thermal(size: int = 32) -> bytes:
    """A small valid grey PNG (a warm disc on a cooler gradient), for warm-up and probes."""
    yy, xx = np.mgrid[0:size, 0:size]
    grey = (40 + 100 * xx / max(size - 1, 1)).astype(np.uint8)  # (size, size)
    grey[(xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 4) ** 2] = 230
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()
