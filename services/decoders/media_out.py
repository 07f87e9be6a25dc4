"""Encoding of generated media into files: PNG (images), WAV (audio), MP4 or GIF (video).

Each encoder returns `EncodedMedia` (the file's bytes and its MIME type); `encode_media`
picks the format from the media type and an optional requested format. The formats of each
output modality are its registry record's `output.formats` (`FORMATS`), the default first.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

from services.common import modalities
from services.common.errors import InvalidArgumentError
from services.models.decoders.pipelines import AudioOut, ImageOut, Media, VideoOut

FORMATS: dict[str, tuple[str, ...]] = {
    name: out.formats for name, m in modalities.MODALITIES.items() if (out := m.output) is not None
}
MIME_TYPES = {"png": "image/png", "wav": "audio/wav", "mp4": "video/mp4", "gif": "image/gif"}


@dataclass(frozen=True)
class EncodedMedia:
    data: bytes
    mime_type: str


def encode_png(image: Image.Image) -> EncodedMedia:
    """An RGB PNG of `image`."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return EncodedMedia(buf.getvalue(), MIME_TYPES["png"])


def encode_wav(waveform: np.ndarray, sample_rate: int) -> EncodedMedia:
    """A mono 16-bit PCM WAV of `waveform` ((samples,), floats in [-1, 1], clipped)."""
    if waveform.ndim != 1:
        raise InvalidArgumentError(f"waveform: expected shape (samples,), got {waveform.shape}")
    pcm = (np.clip(waveform, -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return EncodedMedia(buf.getvalue(), MIME_TYPES["wav"])


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise InvalidArgumentError(
            f"video frames: expected (frames >= 1, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
        )


def encode_mp4(frames: np.ndarray, fps: int) -> EncodedMedia:
    """An H.264 (yuv420p) MP4 of `frames` ((F, H, W, 3) uint8, even H and W) at `fps`."""
    import av

    _check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise InvalidArgumentError(
            f"video frames: expected even height and width for yuv420p, got {height}x{width}"
        )
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return EncodedMedia(buf.getvalue(), MIME_TYPES["mp4"])


def encode_gif(frames: np.ndarray, fps: int) -> EncodedMedia:
    """A looping GIF of `frames` ((F, H, W, 3) uint8); GIF delays are in 10 ms units."""
    _check_frames(frames)
    images = [Image.fromarray(frame) for frame in frames]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        optimize=False,
    )
    return EncodedMedia(buf.getvalue(), MIME_TYPES["gif"])


def encode_media(media: Media, fmt: str | None = None) -> EncodedMedia:
    """Encode generated media; `fmt` defaults to png / wav / mp4 by the media's kind.

    Raises:
        InvalidArgumentError: `fmt` is not a format of this media's kind.
    """
    kind = media.modality
    output = modalities.get(kind).output
    formats = output.formats if output is not None else ()
    fmt = fmt or formats[0]
    if fmt not in formats:
        raise InvalidArgumentError(
            f"{kind} format: expected one of {list(formats)}, got {fmt!r}", param="format"
        )
    if isinstance(media, ImageOut):
        return encode_png(media.image)
    if isinstance(media, AudioOut):
        return encode_wav(media.waveform, media.sample_rate)
    assert isinstance(media, VideoOut)
    return encode_mp4(media.frames, media.fps) if fmt == "mp4" else encode_gif(media.frames, media.fps)
