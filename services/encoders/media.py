"""The encoder of one modality: decode -> preprocess -> frozen backbone -> features and times.

`MediaEncoder.encode` takes the files of a batch and returns, per item, an `EncodedItem`
(float32 (frames * tokens_per_frame, dim) features, frame-major, and each frame's time in
seconds) or the error that item met. Decoding and preprocessing run on a thread pool, item by
item, so one bad file fails only itself; the good items then go through the backbone together.

Per modality (the spec's backbone and sampling decide the details):

    image  decode_image -> one frame; times [0.0]
    video  decode_video with FrameSampling(num_frames | fps + max_frames) -> N frames at their
           times; ImageBind: clips x frames_per_clip, ShortSideScale + Normalize + `crops`
           spatial crops (SEEDS_SPEC 2.A) -> one embedding, times [0.0]
    audio  decode_audio (channel 0, as ImageBind) -> imagebind_audio clips -> one embedding, times [0.0]
    event  parse_events -> event_frames (EventGPT's equal-count chunks) -> each frame through the
           checkpoint's CLIP image processor; times = each chunk's first event, seconds after
           the stream's first event

Frames are preprocessed CLIP style at the backbone's image size: clip_vision by its checkpoint's
`preprocessor_config.json`; eva_vit and ImageBind images by resize shortest edge (bicubic),
centre crop, CLIP mean/std (the seeds' inference transforms). This is the library the Triton
binding serves and the trainer imports; it knows nothing of transports.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.presets import EncoderSpec
from services.common.settings import Settings
from services.encoders._dummies import DUMMIES
from services.encoders.audio import AudioLimits, decode_audio, imagebind_audio
from services.encoders.backbones import Backbone, build_backbone
from services.encoders.events import EventLimits, event_frames, parse_events
from services.encoders.preprocess import ClipImagePreprocessor, decode_image
from services.encoders.protocol import EncodedItem
from services.encoders.video import FrameSampling, VideoLimits, decode_video

logger = logging.getLogger(__name__)

EncodeResult = EncodedItem | ModalmeshError
FRAMES_PER_FORWARD = 64  # frame backbones run at most this many frames at once
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, as the seeds use
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ZERO_TIME = np.zeros(1, dtype=np.float32)


@dataclass(frozen=True)
class EncoderLimits:
    """What the encoders accept per item, by modality."""

    image_max_pixels: int = 64 * 1024 * 1024
    video: VideoLimits = field(default_factory=VideoLimits)
    audio: AudioLimits = field(default_factory=AudioLimits)
    event: EventLimits = field(default_factory=EventLimits)

    @classmethod
    def from_settings(cls, settings: Settings) -> EncoderLimits:
        """The limits of the MODALMESH_* settings (image, video, audio and event fields)."""
        return cls(
            image_max_pixels=settings.image_max_pixels,
            video=VideoLimits(
                max_bytes=settings.video_max_bytes,
                max_seconds=settings.video_max_seconds,
                max_frames=settings.video_max_frames,
                max_pixels=settings.video_max_pixels,
            ),
            audio=AudioLimits(max_bytes=settings.audio_max_bytes, max_seconds=settings.audio_max_seconds),
            event=EventLimits(max_bytes=settings.event_max_bytes, max_events=settings.event_max_events),
        )


@dataclass(frozen=True, eq=False)
class _Prepared:
    """One decoded, preprocessed item: the backbone's input for it and its frames' times."""

    inputs: np.ndarray  # frame backbones (F, 3, S, S); ImageBind one item's image/clips
    times: np.ndarray  # float32 (frames,)


def frame_sampling(spec: EncoderSpec) -> FrameSampling:
    """The video `FrameSampling` of a spec's sampling section."""
    s = spec.sampling
    if s is None:
        raise InvalidArgumentError(f"{spec.backbone} video: expected a sampling section, got none")
    if s.clips is not None:
        return FrameSampling(clips=s.clips, clip_seconds=s.clip_seconds, frames_per_clip=s.frames_per_clip)
    return FrameSampling(num_frames=s.num_frames, fps=s.fps, max_frames=s.max_frames)


def clip_preprocessor(size: int) -> ClipImagePreprocessor:
    """Resize the shortest edge to `size` (bicubic), centre crop `size`, CLIP mean/std."""
    return ClipImagePreprocessor.from_dict(
        {"size": {"shortest_edge": size}, "crop_size": size, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    )


def imagebind_video(frames: np.ndarray, *, clips: int, crops: int, size: int) -> np.ndarray:
    """ImageBind's video transform of sampled frames: float32 (clips * crops, 3, m, size, size).

    `frames` is uint8 (clips * m, H, W, 3), clip by clip. Per clip, as ImageBind's
    `load_and_transform_video_data`: /255, pytorchvideo's ShortSideScale(size) (bilinear,
    floor of the long side), CLIP normalisation, then SpatialCrop(size, crops): the centre
    crop, or for 3 crops left/centre/right (top/centre/bottom for portrait frames).
    """
    n, height, width = frames.shape[:3]
    m = n // clips
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    if width < height:
        new_h, new_w = int(np.floor(height / width * size)), size
    else:
        new_h, new_w = size, int(np.floor(width / height * size))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)  # (N, 3, h, w)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = ((x - mean) / std).reshape(clips, m, 3, new_h, new_w).transpose(1, 2)  # (K, 3, m, h, w)
    top, left = -(-(new_h - size) // 2), -(-(new_w - size) // 2)  # ceil, as uniform_crop
    out = []
    for k in range(clips):
        for index in range(crops) if crops == 3 else (1,):
            y0, x0 = top, left
            if index != 1 and new_h > new_w:
                y0 = 0 if index == 0 else new_h - size
            elif index != 1:
                x0 = 0 if index == 0 else new_w - size
            out.append(x[k, :, :, y0 : y0 + size, x0 : x0 + size])
    return torch.stack(out).numpy()  # (K * crops, 3, m, size, size)


def event_times(t: np.ndarray, num_frames: int) -> np.ndarray:
    """float32 (num_frames,): seconds from the first event to the first event of each chunk."""
    per = len(t) // num_frames
    return ((t[np.arange(num_frames) * per] - t[0]) / 1e6).astype(np.float32)


class MediaEncoder:
    """Decoding + preprocessing + a frozen backbone for one modality of a preset.

    Args:
        modality: "image", "video", "audio" or "event".
        spec: The modality's encoder spec (sampling, tokens, dim).
        backbone: Built for `spec` (may be shared with other modalities of the same backbone).
        preprocessor: CLIP-style frame preprocessing at the backbone's image size (unused for audio).
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
        self.preprocessor = preprocessor
        self.limits = limits
        if modality != "audio":
            out = preprocessor.output_size if preprocessor is not None else None
            if out != (backbone.image_size, backbone.image_size):
                raise InvalidArgumentError(
                    f"{modality} encoder: the preprocessor makes {out} images, the backbone expects "
                    f"({backbone.image_size}, {backbone.image_size})"
                )
        if modality == "video" and backbone.joint_embedding:
            clip_frames = getattr(backbone, "clip_frames", None)
            if spec.sampling is None or spec.sampling.frames_per_clip != clip_frames:
                got = spec.sampling.frames_per_clip if spec.sampling else None
                raise InvalidArgumentError(
                    f"imagebind video: expected sampling.frames_per_clip = {clip_frames} (the vision "
                    f"stem's clip length), got {got}"
                )
        self._sampling = frame_sampling(spec) if modality == "video" else None
        self._prepare: Callable[[bytes], _Prepared] = getattr(self, f"_prepare_{modality}")
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

    # --- decoding and preprocessing (thread pool) ---------------------------------------

    def _frames(self, frames: Sequence[Image.Image | np.ndarray] | np.ndarray) -> np.ndarray:
        assert self.preprocessor is not None
        images = [Image.fromarray(f) if isinstance(f, np.ndarray) else f for f in frames]
        return np.stack([self.preprocessor.preprocess_one(im) for im in images])  # (F, 3, S, S)

    def _prepare_image(self, data: bytes) -> _Prepared:
        image = decode_image(data, max_pixels=self.limits.image_max_pixels)
        pixels = self._frames([image])  # (1, 3, S, S)
        return _Prepared(pixels[0] if self.backbone.joint_embedding else pixels, _ZERO_TIME)

    def _prepare_video(self, data: bytes) -> _Prepared:
        assert self._sampling is not None
        video = decode_video(data, sampling=self._sampling, limits=self.limits.video)
        if self.backbone.joint_embedding:
            assert self.spec.sampling is not None and self.spec.sampling.clips is not None
            clips = imagebind_video(
                video.frames,
                clips=self.spec.sampling.clips,
                crops=self.spec.sampling.crops,
                size=self.backbone.image_size,
            )
            return _Prepared(clips, _ZERO_TIME)
        return _Prepared(self._frames(video.frames), video.timestamps.astype(np.float32))

    def _prepare_audio(self, data: bytes) -> _Prepared:
        sampling = self.spec.sampling
        assert sampling is not None and sampling.clips is not None
        wave = decode_audio(data, fmt_hint=None, limits=self.limits.audio, mix="first")
        mels = imagebind_audio(
            wave.samples, wave.sample_rate, clip_seconds=sampling.clip_seconds, num_clips=sampling.clips
        )
        return _Prepared(mels, _ZERO_TIME)  # (clips, 1, 128, 204)

    def _prepare_event(self, data: bytes) -> _Prepared:
        assert self.spec.sampling is not None
        n = self.spec.sampling.event_frames
        stream = parse_events(data, limits=self.limits.event)
        frames = event_frames(stream, num_frames=n)
        return _Prepared(self._frames(frames), event_times(stream.t, n))

    def _safe_prepare(self, data: bytes) -> _Prepared | ModalmeshError:
        try:
            return self._prepare(data)
        except ModalmeshError as e:
            return e
        except Exception as e:  # a bug, not bad input: keep it to this item, log the trace
            logger.exception("preprocessing a %s item failed", self.modality)
            return ModalmeshError(f"internal error while preprocessing: {type(e).__name__}")

    # --- the backbone ---------------------------------------------------------------------

    def _forward_frames(self, items: list[_Prepared]) -> list[np.ndarray]:
        counts = [len(p.inputs) for p in items]
        pixels = torch.from_numpy(np.concatenate([p.inputs for p in items]))  # (sum F, 3, S, S)
        out = [
            self.backbone.encode(self.modality, chunk).float().cpu().numpy()  # (n, rows, D)
            for chunk in pixels.split(FRAMES_PER_FORWARD)
        ]
        rows = np.concatenate(out)  # (sum F, tokens_per_frame, D)
        bounds = np.cumsum([0, *counts])
        return [rows[a:b].reshape(-1, rows.shape[-1]) for a, b in itertools.pairwise(bounds)]

    def _forward_joint(self, items: list[_Prepared]) -> list[np.ndarray]:
        inputs = torch.from_numpy(np.stack([p.inputs for p in items]))  # (B, ...)
        out = self.backbone.encode(self.modality, inputs).float().cpu().numpy()  # (B, 1, D)
        return list(out)

    def encode(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """Encode files of this modality; one result per item, in order.

        Returns:
            Per item, an `EncodedItem` (float32 C-contiguous features (frames * tokens_per_frame,
            dim), float32 times (frames,)), or the `ModalmeshError` (usually
            `InvalidArgumentError`) that kept it from being encoded.
        """
        if self._pool is not None and len(items) > 1:
            prepared = list(self._pool.map(self._safe_prepare, items))
        else:
            prepared = [self._safe_prepare(data) for data in items]
        good = [p for p in prepared if isinstance(p, _Prepared)]
        encoded: list[np.ndarray] = []
        if good:
            forward = self._forward_joint if self.backbone.joint_embedding else self._forward_frames
            encoded = forward(good)
        features = iter(encoded)
        return [
            p if isinstance(p, ModalmeshError) else EncodedItem(np.ascontiguousarray(next(features)), p.times)
            for p in prepared
        ]

    def warmup(self) -> None:
        """Encode a generated item once (first-call allocations, lazy kernels); raises if it fails."""
        (result,) = self.encode([DUMMIES[self.modality]()])
        if isinstance(result, ModalmeshError):
            raise result
        logger.info(
            "%s warm-up done: features %s, %d frame(s)", self.modality, result.features.shape, result.frames
        )

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def preprocessor_for(spec: EncoderSpec, backbone: Backbone) -> ClipImagePreprocessor | None:
    """The frame preprocessing of a backbone: clip_vision's own config, else CLIP style at its size."""
    if spec.backbone == "clip_vision":
        return ClipImagePreprocessor.from_pretrained(spec.checkpoint)
    if backbone.image_size <= 0:  # ImageBind built with the audio tower only
        return None
    return clip_preprocessor(backbone.image_size)
