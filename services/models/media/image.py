"""Image decoding and CLIP preprocessing, with PIL and numpy only (no torchvision).

`decode_image` turns the compressed bytes a client sent into an RGB `PIL.Image`, checking the
pixel count from the header before decoding and decoding in full so that truncated or corrupt
files fail here with a message that says what was expected and what came. Transparency
(RGBA, LA, P with a transparent colour) is either flattened onto white, as current Hugging Face
image processors and vLLM do, or dropped as PIL's `convert("RGB")` does, which is what every
seed system runs (`transparency`). EXIF orientation is not applied (none of them applies it).
`load_image` is the same decoding without the conversion, for pictures that are not RGB to
the model (thermal images, `services.models.media.thermal`).

`ClipImagePreprocessor` reproduces Hugging Face's `CLIPImageProcessor` (its PIL backend) from
a checkpoint's `preprocessor_config.json`: resize the shortest edge, centre crop, rescale,
normalise, HWC -> CHW. The unit tests hold it to the reference within 1e-5. Two options cover
the seeds that preprocess otherwise (`EncoderSpec.preprocess`): `crop_rounding`, where an odd
centre-crop margin goes (HF floors, torchvision's CenterCrop rounds halves to even, ImageBind's
video crop takes the ceiling), and `tensor_resize`, E.T. Chat's float-tensor pipeline (/255,
torch bilinear resize with antialias, crop, normalise) instead of PIL's resize of uint8 pixels.
The parity fixtures of tests/unit/parity hold each seed's choice to its own pipeline.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

from services.common.errors import InvalidArgumentError, NotFoundError

logger = logging.getLogger(__name__)

# Formats PIL may open; anything else is refused before decoding.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_WHITE = (255, 255, 255, 255)
Transparency = Literal["white", "drop"]
CropRounding = Literal["floor", "round", "ceil"]
# Longest edge / shortest edge accepted (as Qwen2-VL's processor): resizing the shortest edge of
# a 1 x 60000 strip up to 336 px would allocate gigabytes.
MAX_ASPECT_RATIO = 200
# File signatures, to tell a damaged file of an accepted format from something else.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_PNG_END = b"IEND"


def _sniff(data: bytes) -> str | None:
    """The accepted format whose signature the bytes start with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _expected() -> str:
    return f"the bytes of an image file ({', '.join(ACCEPTED_FORMATS[:-1])} or {ACCEPTED_FORMATS[-1]})"


def _corrupt(fmt: str, data: bytes, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"corrupt or truncated image: expected a complete {fmt} file, got {len(data)} bytes "
        f"that fail to decode: {why}"
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidArgumentError(
            f"image too large: expected at most {max_pixels} pixels, got {e}"
        ) from None
    except Exception as e:  # PIL raises many types for bad headers
        fmt = _sniff(data)
        if fmt is not None:
            detail = "" if isinstance(e, UnidentifiedImageError) else f" ({e})"
            raise _corrupt(fmt, data, f"unreadable header{detail}") from None
        raise InvalidArgumentError(
            f"not an image: expected {_expected()}, got {len(data)} bytes starting with {data[:16].hex(' ')}"
        ) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgumentError(f"empty image: expected a positive width and height, got {width}x{height}")
    if width * height > max_pixels:
        raise InvalidArgumentError(
            f"image too large: expected at most {max_pixels} pixels, got {width}x{height} "
            f"({width * height} pixels)"
        )
    return image


def to_rgb(image: Image.Image, transparency: Transparency = "white") -> Image.Image:
    """Convert to RGB: "white" composites any transparency (RGBA, LA, P/L with `transparency`)
    onto white; "drop" is PIL's `convert("RGB")`, which keeps the colour under the alpha."""
    if image.mode == "RGB":
        return image
    if transparency == "white" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode the bytes of an image file fully, in the mode it is stored in, refusing bad input.

    The checks of `decode_image` without the conversion: for callers that convert otherwise
    (thermal images become grey with PIL's `convert("L")`, as ImageBind does).

    Raises:
        InvalidArgumentError: Empty input, bytes that are not an accepted image format, too many
            pixels, or a truncated or corrupt file.
    """
    if not data:
        raise InvalidArgumentError(f"empty image: expected {_expected()}, got 0 bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process turned it on; truncated files would decode as grey padding.
        logger.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was on; turning it off")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    image = _open(data, max_pixels)
    fmt = image.format or "image"
    try:
        image.load()
    except Exception as e:  # OSError, SyntaxError, struct.error, EOFError, ValueError...
        image.close()
        raise _corrupt(fmt, data, str(e) or type(e).__name__) from None
    # PIL stops quietly at a PNG cut after its last pixel row; the end chunk must be there.
    if fmt == "PNG" and data.rfind(_PNG_END) < 0:
        raise _corrupt(fmt, data, "no IEND chunk (the file ends early)")
    return image


def convert_decoded(
    image: Image.Image, data: bytes, convert: Callable[[Image.Image], Image.Image]
) -> Image.Image:
    """`convert(image)` for an image `load_image` returned; a failure is the file's fault (a
    corrupt palette, say), reported as `decode_image` reports a corrupt file."""
    try:
        return convert(image)
    except Exception as e:
        raise _corrupt(image.format or "image", data, str(e) or type(e).__name__) from None


def decode_image(data: bytes, *, max_pixels: int, transparency: Transparency = "white") -> Image.Image:
    """Decode the bytes of an image file into an RGB image, fully, refusing bad input.

    Args:
        data: The compressed file (PNG, JPEG, WEBP, GIF, BMP or TIFF); GIFs give their first frame.
        max_pixels: Largest width * height accepted; checked on the header, before decoding.
        transparency: "white" (composite onto white) or "drop" (PIL's convert, the seeds'); see `to_rgb`.

    Returns:
        The decoded image in mode RGB.

    Raises:
        InvalidArgumentError: Empty input, bytes that are not an accepted image format, too many
            pixels, or a truncated or corrupt file.
    """
    image = load_image(data, max_pixels=max_pixels)
    return convert_decoded(image, data, lambda im: to_rgb(im, transparency))


def _size_dict(value: Any, what: str, *, default_to_square: bool) -> dict[str, int]:
    """Normalise HF's size forms (int, [h, w], dict) as `get_size_dict` does."""
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        if "shortest_edge" in value and "longest_edge" not in value:
            return {"shortest_edge": int(value["shortest_edge"])}
        if "height" in value and "width" in value:
            return {"height": int(value["height"]), "width": int(value["width"])}
    raise InvalidArgumentError(
        f"preprocessor {what}: expected an int, [height, width], {{'shortest_edge'}} or "
        f"{{'height', 'width'}}, got {value!r}"
    )


def crop_offset(margin: int, rounding: CropRounding) -> int:
    """Where a centre crop starts when `margin` (>= 0) pixels are left over: margin / 2 rounded.

    "floor": HF's `center_crop` ((h - crop) // 2) and E.T. Chat's int((h - s) / 2); "round":
    torchvision's `center_crop`, int(round(margin / 2.0)) with Python's halves-to-even, so a
    margin of 3 starts at 2 but 5 at 2; "ceil": ImageBind's `uniform_crop`, ceil(margin / 2).
    """
    if rounding == "floor":
        return margin // 2
    if rounding == "ceil":
        return -(-margin // 2)
    return round(margin / 2.0)  # Python rounds halves to even, as torchvision relies on


def _center_crop(array: np.ndarray, height: int, width: int, rounding: CropRounding = "floor") -> np.ndarray:
    """Centre crop an (H, W, C) array, zero-padding where it is smaller (HF's `center_crop`)."""
    h, w = array.shape[:2]
    if h >= height and w >= width:
        top, left = crop_offset(h - height, rounding), crop_offset(w - width, rounding)
        return array[top : top + height, left : left + width]
    # Smaller than the crop (a resize to another size than the crop): pad as HF does.
    top, left = (h - height) // 2, (w - width) // 2
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((new_h, new_w, array.shape[2]), dtype=array.dtype)  # (H', W', C)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


@dataclass(frozen=True)
class ClipImagePreprocessor:
    """CLIP image preprocessing (resize shortest edge, centre crop, rescale, normalise).

    Build it with `from_pretrained(folder)`; call it on RGB images to get float32 (B, 3, H, W).
    Images are always converted to RGB (the backbones take three channels), whatever
    `do_convert_rgb` says. Images more elongated than `MAX_ASPECT_RATIO` are refused.

    Beyond the Hugging Face keys: `crop_rounding` (see `crop_offset`), `transparency` (see
    `to_rgb`, for images that are not RGB yet) and `tensor_resize`: instead of PIL resizing
    uint8 pixels with `resample`, rescale to float32 first and resize with torch's bilinear
    interpolation with antialias, as torchvision's tensor `Resize(antialias=True)` does (E.T.
    Chat); its crop, when the picture is smaller than the crop, is E.T. Chat's
    `CenterResizedCrop` (the largest centred square, resized to the crop size).
    """

    size: dict[str, int]
    crop_size: dict[str, int]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    crop_rounding: CropRounding = "floor"
    transparency: Transparency = "white"
    tensor_resize: bool = False

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipImagePreprocessor:
        """Read `preprocessor_config.json` from a checkpoint folder.

        Raises:
            NotFoundError: The folder has no preprocessor_config.json.
            InvalidArgumentError: The file is not valid JSON or has unusable values.
        """
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise NotFoundError(f"image preprocessor: expected {path}, it does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"image preprocessor {path}: not valid JSON: {e}") from None
        return cls.from_dict(cfg, source=str(path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, source: str = "<dict>") -> ClipImagePreprocessor:
        """Build from the keys of a `preprocessor_config.json` (defaults are CLIP's)."""
        mean = tuple(float(v) for v in cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
        std = tuple(float(v) for v in cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
        if len(mean) != 3 or len(std) != 3:
            raise InvalidArgumentError(
                f"image preprocessor {source}: expected 3 image_mean and image_std values, "
                f"got {len(mean)} and {len(std)}"
            )
        resample = int(cfg.get("resample", 3))
        if resample not in {int(r) for r in Image.Resampling}:
            raise InvalidArgumentError(
                f"image preprocessor {source}: resample expected a PIL filter 0-5, got {resample}"
            )
        return cls(
            size=_size_dict(cfg.get("size", 224), f"{source} size", default_to_square=False),
            crop_size=_size_dict(cfg.get("crop_size", 224), f"{source} crop_size", default_to_square=True),
            image_mean=mean,
            image_std=std,
            resample=resample,
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None when it depends on the input."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def _resize_to(self, width: int, height: int) -> tuple[int, int]:
        """Target (width, height), rounded as HF's `get_resize_output_image_size` (truncation)."""
        if "shortest_edge" not in self.size:
            return self.size["width"], self.size["height"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target, int(target * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def squashed(self) -> ClipImagePreprocessor:
        """The same preprocessing resizing straight to the crop size, without a crop (VideoChat's images)."""
        size = {"height": self.crop_size["height"], "width": self.crop_size["width"]}
        return replace(self, size=size, do_resize=True, do_center_crop=False)

    def preprocess_one(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> float32 (3, H, W)."""
        image = to_rgb(image, self.transparency)  # always 3 channels; the model takes nothing else
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InvalidArgumentError(
                f"image aspect ratio: expected at most {MAX_ASPECT_RATIO}:1, got {width}x{height}"
            )
        if self.tensor_resize:
            return self._preprocess_tensor(np.array(image, dtype=np.uint8))  # writable, for torch
        if self.do_resize:
            image = image.resize(self._resize_to(*image.size), resample=Image.Resampling(self.resample))
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        if self.do_center_crop:
            array = _center_crop(array, self.crop_size["height"], self.crop_size["width"], self.crop_rounding)
        # HF rescales in float64 and casts to float32, then normalises in float32.
        pixels = array.astype(np.float64) * self.rescale_factor if self.do_rescale else array
        pixels = pixels.astype(np.float32)  # (H, W, 3)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std  # (H, W, 3)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, H, W)

    def _preprocess_tensor(self, array: np.ndarray) -> np.ndarray:
        """E.T. Chat's `clip_center_224` on one (H, W, 3) uint8 picture -> float32 (3, h, w).

        ToTensor (float32 / 255), torchvision `Resize(size, antialias=True)` (bilinear; skipped
        at the same size), `CenterResizedCrop(size)` (crop at `crop_rounding`, and resize if
        the square was smaller), `Normalize(mean, std)` in float32.
        """
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        if self.do_rescale:
            x = x / (1.0 / self.rescale_factor)  # E.T. Chat divides by 255
        height, width = x.shape[-2:]
        if self.do_resize:
            new_w, new_h = self._resize_to(width, height)
            if (new_h, new_w) != (height, width):
                x = F.interpolate(
                    x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
                )
        if self.do_center_crop:
            x = self._tensor_crop(x)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x[0].numpy()  # (3, h, w)

    def _tensor_crop(self, x: torch.Tensor) -> torch.Tensor:
        """E.T. Chat's `CenterResizedCrop`: a centred s x s square (s = min(crop, h, w)), resized to the crop."""
        height, width = x.shape[-2:]
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        side = min(crop_h, height, width)
        top, left = (
            crop_offset(height - side, self.crop_rounding),
            crop_offset(width - side, self.crop_rounding),
        )
        x = x[..., top : top + side, left : left + side]  # (1, 3, s, s)
        if (side, side) != (crop_h, crop_w):
            x = F.interpolate(x, size=(crop_h, crop_w), mode="bilinear", align_corners=False, antialias=True)
        return x

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> float32 (B, 3, H, W); they must come out the same size (crop or fixed size)."""
        arrays = [self.preprocess_one(image) for image in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InvalidArgumentError(
                f"image preprocessor: expected one output size for a batch, got {sorted(shapes)}"
            )
        return np.stack(arrays)  # (B, 3, H, W)
