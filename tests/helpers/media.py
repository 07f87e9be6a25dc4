"""Small deterministic media files for tests (random-pixel images encoded in memory)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def random_image(width: int, height: int, *, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-pixel image of the given size and PIL mode ("RGB", "RGBA", "L", "LA", ...)."""
    rng = np.random.default_rng(seed)
    base = mode if mode in ("RGB", "RGBA", "L", "LA") else "RGB"
    bands = len(base)
    shape = (height, width, bands) if bands > 1 else (height, width)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))  # mode from the shape
    return image if image.mode == mode else image.convert(mode)


def encode_image(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    """The bytes of `image` saved in format `fmt`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def png_bytes(width: int = 48, height: int = 40, *, seed: int = 0) -> bytes:
    """A random RGB PNG."""
    return encode_image(random_image(width, height, seed=seed), "PNG")


def jpeg_bytes(width: int = 48, height: int = 40, *, seed: int = 0) -> bytes:
    """A random RGB JPEG."""
    return encode_image(random_image(width, height, seed=seed), "JPEG", quality=90)
