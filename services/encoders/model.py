"""The image encoder of one modality: decoding + preprocessing + a frozen backbone.

`ImageEncoder.encode` takes the compressed files of a batch and returns, per item, either its
float32 (tokens, dim) features or the error that item met. Items are decoded independently
(on a small thread pool), so one bad file fails only itself; the good ones go through the
backbone together in one forward pass. This is the library the Triton binding serves and the
trainer imports; it knows nothing of transports.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.presets import EncoderSpec
from services.encoders.backbones import Backbone, build_backbone
from services.encoders.preprocess import ClipImagePreprocessor, decode_image

logger = logging.getLogger(__name__)

EncodeResult = np.ndarray | ModalmeshError


def dummy_png(size: int = 32) -> bytes:
    """A small valid PNG (a colour gradient) for warm-up and health probes."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), axis=-1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")  # (size, size, 3)
    return buf.getvalue()


class ImageEncoder:
    """Preprocessor + backbone for one image modality.

    Args:
        preprocessor: Turns RGB images into (3, H, W) float32 pixels.
        backbone: Maps (B, 3, H, W) to (B, tokens, dim); frozen.
        max_pixels: Largest width * height accepted per image.
        decode_workers: Threads decoding a batch's files in parallel (1 = decode inline).
    """

    def __init__(
        self,
        preprocessor: ClipImagePreprocessor,
        backbone: Backbone,
        *,
        max_pixels: int,
        decode_workers: int | None = None,
    ) -> None:
        out = preprocessor.output_size
        if out != (backbone.image_size, backbone.image_size):
            raise InvalidArgumentError(
                f"image encoder: the preprocessor makes {out} images, the backbone expects "
                f"({backbone.image_size}, {backbone.image_size})"
            )
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.max_pixels = max_pixels
        workers = decode_workers if decode_workers is not None else min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 1 else None

    @classmethod
    def from_spec(
        cls, spec: EncoderSpec, *, max_pixels: int, decode_workers: int | None = None
    ) -> ImageEncoder:
        """Load the preprocessor and backbone a preset's `EncoderSpec` names (from its checkpoint)."""
        preprocessor = ClipImagePreprocessor.from_pretrained(spec.checkpoint)
        backbone = build_backbone(spec)
        return cls(preprocessor, backbone, max_pixels=max_pixels, decode_workers=decode_workers)

    @property
    def tokens(self) -> int:
        """Tokens per encoded item."""
        return self.backbone.tokens

    @property
    def dim(self) -> int:
        """Width of each token."""
        return self.backbone.dim

    def _pixels(self, data: bytes) -> np.ndarray | ModalmeshError:
        """Decode and preprocess one file into (3, H, W), or the error it met."""
        try:
            return self.preprocessor.preprocess_one(decode_image(data, max_pixels=self.max_pixels))
        except ModalmeshError as e:
            return e
        except Exception as e:  # a bug, not bad input: keep it to this item, log the trace
            logger.exception("preprocessing an item failed")
            return ModalmeshError(f"internal error while preprocessing: {type(e).__name__}")

    def encode(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Encode compressed image files; one result per item, in order.

        Args:
            items: The files' bytes (PNG, JPEG, ...).

        Returns:
            Per item, float32 C-contiguous (tokens, dim) features, or the `ModalmeshError`
            (usually `InvalidArgumentError`) that kept it from being encoded.
        """
        if self._pool is not None and len(items) > 1:
            decoded = list(self._pool.map(self._pixels, items))
        else:
            decoded = [self._pixels(data) for data in items]
        results: list[EncodeResult] = list(decoded)
        good = [(i, d) for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        if good:
            pixels = torch.from_numpy(np.stack([d for _, d in good]))  # (N, 3, H, W)
            features = self.backbone(pixels).float().cpu().numpy()  # (N, T, D)
            for row, (i, _) in enumerate(good):
                results[i] = np.ascontiguousarray(features[row])  # (T, D)
        return results

    def warmup(self) -> None:
        """Encode a dummy image once (first-call allocations, lazy kernels)."""
        size = self.backbone.image_size
        (result,) = self.encode([dummy_png(size)])
        if isinstance(result, ModalmeshError):
            raise result
        logger.info("warm-up done: features %s", tuple(result.shape))

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
