"""Decoding and preprocessing of one modality's items: bytes -> the backbone's input and frame times.

`MediaPreprocessor.prepare(data)` is what the encoder service (`media.MediaEncoder`), the
trainer's feature precompute and the parity tests run on a file; it needs no backbone, only the
modality's `EncoderSpec` and the backbone's image size. Each modality's registry record
(`services.common.modalities`) names its function here (`prepare`: `prepare_image`, ...):

    image  decode_image -> one frame; times [0.0]
    video  decode_video with FrameSampling(num_frames | fps + max_frames | clips) -> N frames at
           their times; ImageBind: clips x frames_per_clip, ShortSideScale + Normalize +
           `crops` spatial crops (`imagebind_video`) -> one item, times [0.0]
    audio  decode_audio (channel 0 and the channels' mean, as ImageBind) -> imagebind_audio
           clips -> one item, times [0.0]
    event  parse_events -> event_frames (EventGPT's equal-count chunks) -> each frame through the
           checkpoint's CLIP image processor; times = each chunk's first event, seconds after
           the stream's first event

Pictures (images, video frames, event frames) go through a `ClipImagePreprocessor` at the
backbone's size: clip_vision's from its checkpoint's `preprocessor_config.json`, the others
CLIP style (shortest edge, centre crop, CLIP mean/std); `EncoderSpec.preprocess` then picks the
seed's resize, crop rounding, interpolation and transparency rules, and the event colours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from services.common import modalities
from services.common.errors import InvalidArgumentError
from services.common.presets import EncoderSpec
from services.common.settings import Settings
from services.models.media.audio import AudioLimits, decode_audio, imagebind_audio
from services.models.media.events import EventLimits, event_frames, parse_events
from services.models.media.image import ClipImagePreprocessor, CropRounding, crop_offset, decode_image
from services.models.media.video import FrameSampling, VideoLimits, decode_video

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
class Prepared:
    """One decoded, preprocessed item: the backbone's input for it and its frames' times."""

    inputs: np.ndarray  # frame backbones (F, 3, S, S); ImageBind one item's image/clips
    times: np.ndarray  # float32 (frames,)


def frame_sampling(spec: EncoderSpec) -> FrameSampling:
    """The video `FrameSampling` of a spec's sampling section."""
    s = spec.sampling
    if s is None:
        raise InvalidArgumentError(f"{spec.backbone} video: expected a sampling section, got none")
    if s.clips is not None:
        return FrameSampling(
            clips=s.clips,
            clip_seconds=s.clip_seconds,
            frames_per_clip=s.frames_per_clip,
            last_clip_at_end=s.last_clip_at_end,
        )
    return FrameSampling(num_frames=s.num_frames, fps=s.fps, max_frames=s.max_frames)


def clip_preprocessor(size: int) -> ClipImagePreprocessor:
    """Resize the shortest edge to `size` (bicubic), centre crop `size`, CLIP mean/std."""
    return ClipImagePreprocessor.from_dict(
        {"size": {"shortest_edge": size}, "crop_size": size, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    )


def frame_preprocessor(spec: EncoderSpec, image_size: int) -> ClipImagePreprocessor | None:
    """The picture preprocessing of a spec: clip_vision's own config, else CLIP style at
    `image_size` (None when there is no picture: ImageBind's audio tower alone, size 0), with
    the spec's `preprocess` rules applied."""
    if spec.backbone == "clip_vision":
        base = ClipImagePreprocessor.from_pretrained(spec.checkpoint)
    elif image_size <= 0:
        return None
    else:
        base = clip_preprocessor(image_size)
    rules = spec.preprocess
    out = replace(
        base,
        crop_rounding=rules.crop,
        transparency=rules.transparency,
        tensor_resize=rules.interpolation == "torch_bilinear_antialias",
    )
    return out.squashed() if rules.resize == "squash" else out


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of one axis of torch's bilinear resize (align_corners=False).

    As ATen's CPU `upsample_bilinear2d` computes them in float32: scale = in / out, src =
    scale * (i + 0.5) - 0.5 clamped at 0, i0 = int(src), l1 = src - i0, l0 = 1 - l1, i1 =
    min(i0 + 1, in - 1).
    """
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = src.astype(np.int64)
    l1: np.ndarray = (src - i0.astype(f32)).astype(f32)
    return i0, np.minimum(i0 + 1, n_in - 1), (f32(1) - l1).astype(f32), l1


def short_side_scale(frames: np.ndarray, size: int) -> np.ndarray:
    """pytorchvideo's `ShortSideScale(size)` of uint8 (N, H, W, 3) frames / 255 -> float32 (N, h, w, 3).

    The shorter side becomes `size`, the longer floor(long / short * size); bilinear without
    antialias (align_corners=False), computed as torch's CPU kernel did through torch 2.9 (the
    weights above, the rows' width interpolation first): torch 2.13 moves its results by up to
    5e-6, so it is not called here (tests/unit/parity/test_pandagpt_preprocess.py).
    """
    _, height, width = frames.shape[:3]
    if width < height:
        new_h, new_w = int(np.floor(height / width * size)), size
    else:
        new_h, new_w = size, int(np.floor(width / height * size))
    x = frames.astype(np.float32) / np.float32(255.0)  # (N, H, W, 3)
    y0, y1, wy0, wy1 = _linear_taps(height, new_h)
    x0, x1, wx0, wx1 = _linear_taps(width, new_w)
    wx0, wx1 = wx0[None, None, :, None], wx1[None, None, :, None]
    top, bottom = x[:, y0], x[:, y1]  # (N, h, W, 3)
    top = top[:, :, x0] * wx0 + top[:, :, x1] * wx1  # (N, h, w, 3)
    bottom = bottom[:, :, x0] * wx0 + bottom[:, :, x1] * wx1
    return top * wy0[None, :, None, None] + bottom * wy1[None, :, None, None]  # (N, h, w, 3)


def imagebind_video(
    frames: np.ndarray, *, clips: int, crops: int, size: int, crop: CropRounding = "ceil"
) -> np.ndarray:
    """ImageBind's video transform of sampled frames: float32 (clips * crops, 3, m, size, size).

    `frames` is uint8 (clips * m, H, W, 3), clip by clip. Per clip, as ImageBind's
    `load_and_transform_video_data`: /255, pytorchvideo's ShortSideScale(size)
    (`short_side_scale`), CLIP normalisation, then SpatialCrop(size, crops): the centre crop,
    or for 3 crops left/centre/right (top/centre/bottom for portrait frames). The centre
    crop's odd margin rounds by `crop`: "ceil" is ImageBind's `uniform_crop`.
    """
    n = frames.shape[0]
    m = n // clips
    scaled = short_side_scale(frames, size)  # (N, h, w, 3)
    new_h, new_w = scaled.shape[1:3]
    mean, std = np.asarray(CLIP_MEAN, dtype=np.float32), np.asarray(CLIP_STD, dtype=np.float32)
    x = (scaled - mean) / std  # (N, h, w, 3)
    x = x.reshape(clips, m, new_h, new_w, 3).transpose(0, 4, 1, 2, 3)  # (K, 3, m, h, w)
    top, left = crop_offset(new_h - size, crop), crop_offset(new_w - size, crop)
    out = []
    for k in range(clips):
        for index in range(crops) if crops == 3 else (1,):
            y0, x0 = top, left
            if index != 1 and new_h > new_w:
                y0 = 0 if index == 0 else new_h - size
            elif index != 1:
                x0 = 0 if index == 0 else new_w - size
            out.append(x[k, :, :, y0 : y0 + size, x0 : x0 + size])
    return np.ascontiguousarray(np.stack(out))  # (K * crops, 3, m, size, size)


def event_times(t: np.ndarray, num_frames: int) -> np.ndarray:
    """float32 (num_frames,): seconds from the first event to the first event of each chunk."""
    per = len(t) // num_frames
    return ((t[np.arange(num_frames) * per] - t[0]) / 1e6).astype(np.float32)


class MediaPreprocessor:
    """Bytes of one modality -> `Prepared` (the backbone's input and the frames' times).

    Args:
        modality: A registered modality ("image", "video", "audio", "event"...); its record's
            `prepare` hook does the work.
        spec: The modality's encoder spec (backbone, sampling, preprocess rules).
        frames: The picture preprocessing (`frame_preprocessor`); None only for a modality
            without pictures (audio).
        limits: What items are accepted.

    Raises:
        InvalidArgumentError: An unknown modality, or a picture modality without picture
            preprocessing.
    """

    def __init__(
        self,
        modality: str,
        spec: EncoderSpec,
        frames: ClipImagePreprocessor | None,
        *,
        limits: EncoderLimits,
    ) -> None:
        record = modalities.get(modality)
        if record.pictures and frames is None:
            raise InvalidArgumentError(f"{modality} preprocessing: expected a picture preprocessor, got none")
        self.modality, self.spec, self.frames, self.limits = modality, spec, frames, limits
        self.joint_embedding = spec.backbone == "imagebind"  # one item in, one embedding out
        self.sampling = frame_sampling(spec) if record.frame_sampled else None
        self._prepare: Callable[[MediaPreprocessor, bytes], Prepared] = record.hook("prepare")

    @classmethod
    def from_spec(
        cls, modality: str, spec: EncoderSpec, *, image_size: int, limits: EncoderLimits | None = None
    ) -> MediaPreprocessor:
        """The preprocessing of a spec for a backbone reading `image_size` pixels square."""
        return cls(modality, spec, frame_preprocessor(spec, image_size), limits=limits or EncoderLimits())

    def prepare(self, data: bytes) -> Prepared:
        """Decode and preprocess one file.

        Raises:
            InvalidArgumentError: The file is refused (see the decoders), or a video holds more
                frames than the sampling's `max_frames`.
        """
        return self._prepare(self, data)

    def pictures(self, frames: Sequence[Image.Image | np.ndarray] | np.ndarray) -> np.ndarray:
        """RGB pictures (PIL or uint8 (H, W, 3)) -> float32 (F, 3, S, S)."""
        assert self.frames is not None
        images = [Image.fromarray(f) if isinstance(f, np.ndarray) else f for f in frames]
        return np.stack([self.frames.preprocess_one(im) for im in images])  # (F, 3, S, S)


# --- each modality's `prepare` hook (named by its registry record) ---------------------------


def prepare_image(pre: MediaPreprocessor, data: bytes) -> Prepared:
    """One image -> one frame (ImageBind: the image itself), time 0."""
    image = decode_image(
        data, max_pixels=pre.limits.image_max_pixels, transparency=pre.spec.preprocess.transparency
    )
    pixels = pre.pictures([image])  # (1, 3, S, S)
    return Prepared(pixels[0] if pre.joint_embedding else pixels, _ZERO_TIME)


def prepare_video(pre: MediaPreprocessor, data: bytes) -> Prepared:
    """One video -> its sampled frames at their times (ImageBind: clips x crops, time 0)."""
    assert pre.sampling is not None and pre.frames is not None
    video = decode_video(data, sampling=pre.sampling, limits=pre.limits.video)
    if pre.joint_embedding:
        assert pre.spec.sampling is not None and pre.spec.sampling.clips is not None
        clips = imagebind_video(
            video.frames,
            clips=pre.spec.sampling.clips,
            crops=pre.spec.sampling.crops,
            size=pre.frames.crop_size["height"],
            crop=pre.spec.preprocess.crop,
        )
        return Prepared(clips, _ZERO_TIME)
    return Prepared(pre.pictures(video.frames), video.timestamps.astype(np.float32))


def prepare_audio(pre: MediaPreprocessor, data: bytes) -> Prepared:
    """One sound -> ImageBind's fbank clips, time 0."""
    sampling = pre.spec.sampling
    assert sampling is not None and sampling.clips is not None
    wave = decode_audio(data, fmt_hint=None, limits=pre.limits.audio, mix="first_and_mean")
    mels = imagebind_audio(
        wave.samples,
        wave.sample_rate,
        channel_mean=wave.channel_mean,
        clip_seconds=sampling.clip_seconds,
        num_clips=sampling.clips,
        last_clip_at_end=sampling.last_clip_at_end,
    )
    return Prepared(mels, _ZERO_TIME)  # (clips, 1, 128, 204)


def prepare_event(pre: MediaPreprocessor, data: bytes) -> Prepared:
    """One event stream -> EventGPT's event frames, each at its first event's time."""
    assert pre.spec.sampling is not None
    n = pre.spec.sampling.event_frames
    stream = parse_events(data, limits=pre.limits.event)
    frames = event_frames(stream, num_frames=n, negative=pre.spec.preprocess.negative_polarity)
    return Prepared(pre.pictures(frames), event_times(stream.t, n))
