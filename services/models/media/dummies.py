"""Small valid media files made in memory, for warm-up and health probes of each modality.

Each modality's registry record (`services.common.modalities`) names its function here
(`dummy`): `modalities.get(name).hook("dummy")()` is a valid item of that modality.
"""

from __future__ import annotations

import io

# PyAV before decord (see services.models.media.video).
import av
import numpy as np
from PIL import Image


def dummy_png(size: int = 32) -> bytes:
    """A small valid PNG (a colour gradient)."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), axis=-1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")  # (size, size, 3)
    return buf.getvalue()


def dummy_video(frames: int = 8, fps: int = 4, size: tuple[int, int] = (64, 48)) -> bytes:
    """An MP4 (MPEG-4 Part 2, which every FFmpeg build has) of a gradient moving frame by frame."""
    width, height = size
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        x = np.arange(width, dtype=np.int64)[None, :] + np.arange(height, dtype=np.int64)[:, None]
        for i in range(frames):
            gray = ((x * 4 + i * 16) % 256).astype(np.uint8)  # (H, W)
            rgb = np.stack([gray, 255 - gray, np.full_like(gray, i * 8 % 256)], axis=-1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def dummy_audio(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A WAV (16-bit PCM) of a 440 Hz tone."""
    import soundfile as sf

    t = np.arange(round(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(
        buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16"
    )
    return buf.getvalue()


def dummy_events(n: int = 1000, width: int = 32, height: int = 24) -> bytes:
    """An .npz event stream (x, y, t, p) of `n` events within 10 ms."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(
        buf,
        x=rng.integers(0, width, n).astype(np.uint16),
        y=rng.integers(0, height, n).astype(np.uint16),
        t=np.sort(rng.integers(0, 10_000, n)).astype(np.int64),
        p=rng.integers(0, 2, n).astype(np.uint8),
    )
    return buf.getvalue()
