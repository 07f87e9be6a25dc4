"""The encoder of one modality: decode -> preprocess -> frozen backbone -> features and times.

`MediaEncoder.encode` takes the files of a batch and returns, per item, its `MediaFeatures`
(float32 (frames * tokens_per_frame, dim) features, frame-major, and each frame's time in
seconds) or the error that item met. Decoding and preprocessing (`prepare.MediaPreprocessor`:
per modality, the seed's frame sampling, resize, crop, audio clips and event frames, chosen by
the spec's `sampling` and `preprocess`) run on a thread pool, item by item, so one bad file
fails only itself; the good items then go through the backbone together.

This is the library the Triton binding serves and the trainer imports; it knows nothing of
transports.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from services.common import modalities
from services.common.content import MediaFeatures
from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.presets import EncoderSpec
from services.models.backbones.base import Backbone
from services.models.backbones.build import build_backbone
from services.models.media.image import ClipImagePreprocessor
from services.models.media.prepare import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderLimits,
    MediaPreprocessor,
    Prepared,
    frame_preprocessor,
)

__all__ = ["CLIP_MEAN", "CLIP_STD", "EncodeResult", "EncoderLimits", "MediaEncoder", "preprocessor_for"]

logger = logging.getLogger(__name__)

EncodeResult = MediaFeatures[np.ndarray] | ModalmeshError
FRAMES_PER_FORWARD = 64  # frame backbones run at most this many frames at once


class MediaEncoder:
    """Decoding + preprocessing + a frozen backbone for one modality of a preset.

    Args:
        modality: A registered modality ("image", "video", "audio", "event"...): its record
            says whether items become pictures, how they are prepared and the warm-up item.
        spec: The modality's encoder spec (sampling, tokens, dim).
        backbone: Built for `spec` (may be shared with other modalities of the same backbone).
        preprocessor: The picture preprocessing at the backbone's image size (`preprocessor_for`;
            None for a modality without pictures, audio).
        limits: What items are accepted.
        decode_workers: Threads decoding a batch's files in parallel (1 = decode inline).
    """

    def __init__(
        self,
        modality: str,
        spec: EncoderSpec,
        backbone: Backbone,
        preprocessor: ClipImagePreprocessor | None,
        *,
        limits: EncoderLimits,
        decode_workers: int | None = None,
    ) -> None:
        self.modality, self.spec, self.backbone = modality, spec, backbone
        self.limits = limits
        record = modalities.get(modality)
        if record.pictures:
            out = preprocessor.output_size if preprocessor is not None else None
            if out != (backbone.image_size, backbone.image_size):
                raise InvalidArgumentError(
                    f"{modality} encoder: the preprocessor makes {out} images, the backbone expects "
                    f"({backbone.image_size}, {backbone.image_size})"
                )
        if record.pictures and spec.sampling is not None and spec.sampling.clips and backbone.joint_embedding:
            # picture clips go through the vision stem, which reads clips of a fixed length
            clip_frames = getattr(backbone, "clip_frames", None)
            if spec.sampling is None or spec.sampling.frames_per_clip != clip_frames:
                got = spec.sampling.frames_per_clip if spec.sampling else None
                raise InvalidArgumentError(
                    f"imagebind {modality}: expected sampling.frames_per_clip = {clip_frames} (the vision "
                    f"stem's clip length), got {got}"
                )
        self.media = MediaPreprocessor(modality, spec, preprocessor, limits=limits)
        workers = decode_workers if decode_workers is not None else min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 1 else None

    @classmethod
    def from_spec(
        cls,
        modality: str,
        spec: EncoderSpec,
        *,
        limits: EncoderLimits | None = None,
        backbone: Backbone | None = None,
        decode_workers: int | None = None,
        device: str | torch.device | None = None,
    ) -> MediaEncoder:
        """Load the backbone (unless given) and the preprocessing a spec names."""
        if backbone is None:
            backbone = build_backbone(spec, modalities=[modality], device=device)
        return cls(
            modality,
            spec,
            backbone,
            preprocessor_for(spec, backbone),
            limits=limits or EncoderLimits(),
            decode_workers=decode_workers,
        )

    @property
    def tokens_per_frame(self) -> int:
        return self.spec.tokens_per_frame()

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def preprocessor(self) -> ClipImagePreprocessor | None:
        """The picture preprocessing (None for a modality without pictures, audio)."""
        return self.media.frames

    # --- decoding and preprocessing (thread pool) ---------------------------------------

    def _safe_prepare(self, data: bytes) -> Prepared | ModalmeshError:
        try:
            return self.media.prepare(data)
        except ModalmeshError as e:
            return e
        except Exception as e:  # a bug, not bad input: keep it to this item, log the trace
            logger.exception("preprocessing a %s item failed", self.modality)
            return ModalmeshError(f"internal error while preprocessing: {type(e).__name__}")

    # --- the backbone ---------------------------------------------------------------------

    def _forward_frames(self, items: list[Prepared]) -> list[np.ndarray]:
        counts = [len(p.inputs) for p in items]
        pixels = torch.from_numpy(np.concatenate([p.inputs for p in items]))  # (sum F, 3, S, S)
        out = [
            self.backbone.encode(self.modality, chunk).float().cpu().numpy()  # (n, rows, D)
            for chunk in pixels.split(FRAMES_PER_FORWARD)
        ]
        rows = np.concatenate(out)  # (sum F, tokens_per_frame, D)
        bounds = np.cumsum([0, *counts])
        return [rows[a:b].reshape(-1, rows.shape[-1]) for a, b in itertools.pairwise(bounds)]

    def _forward_joint(self, items: list[Prepared]) -> list[np.ndarray]:
        inputs = torch.from_numpy(np.stack([p.inputs for p in items]))  # (B, ...)
        out = self.backbone.encode(self.modality, inputs).float().cpu().numpy()  # (B, 1, D)
        return list(out)

    def encode(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Encode files of this modality; one result per item, in order.

        Returns:
            Per item, its `MediaFeatures` (float32 C-contiguous features (frames * tokens_per_frame,
            dim), float32 times (frames,)), or the `ModalmeshError` (usually
            `InvalidArgumentError`) that kept it from being encoded.
        """
        if self._pool is not None and len(items) > 1:
            prepared = list(self._pool.map(self._safe_prepare, items))
        else:
            prepared = [self._safe_prepare(data) for data in items]
        good = [p for p in prepared if isinstance(p, Prepared)]
        encoded: list[np.ndarray] = []
        if good:
            forward = self._forward_joint if self.backbone.joint_embedding else self._forward_frames
            encoded = forward(good)
        features = iter(encoded)
        return [
            p
            if isinstance(p, ModalmeshError)
            else MediaFeatures(self.modality, np.ascontiguousarray(next(features)), tuple(p.times.tolist()))
            for p in prepared
        ]

    def warmup(self) -> None:
        """Encode a generated item once (first-call allocations, lazy kernels); raises if it fails."""
        (result,) = self.encode([modalities.get(self.modality).hook("dummy")()])
        if isinstance(result, ModalmeshError):
            raise result
        logger.info(
            "%s warm-up done: features %s, %d frame(s)",
            self.modality,
            result.features.shape,
            len(result.times),
        )

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def preprocessor_for(spec: EncoderSpec, backbone: Backbone) -> ClipImagePreprocessor | None:
    """The picture preprocessing of a backbone: clip_vision's own config, else CLIP style at its
    size, with the spec's `preprocess` rules (see `prepare.frame_preprocessor`)."""
    return frame_preprocessor(spec, backbone.image_size)
