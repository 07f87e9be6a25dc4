"""Small deterministic media files for tests, encoded in memory: random-pixel images, and videos
whose frames show their own index (PyAV)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

# PyAV before decord: decord loads its bundled FFmpeg 4 and libvpx 6 with RTLD_GLOBAL, and a PyAV
# loaded after it binds libvpx's unversioned symbols to that copy and cannot open the VP8 encoder.
import av
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


# Videos: each frame shows its own index as a grid of black/white cells (one bit per cell, most
# significant first, row by row), big enough to survive lossy codecs and chroma subsampling.
_INDEX_GRID = (4, 3)  # (columns, rows): 12 bits, frame indices 0..4095
_VIDEO_CODECS = {"mp4": ("libx264", "mpeg4"), "webm": ("libvpx", "libvpx-vp9"), "avi": ("mpeg4", "mjpeg")}


def video_codec(fmt: str) -> str:
    """The encoder `make_video` uses for container `fmt` (the first of its choices that PyAV has)."""
    return next(c for c in _VIDEO_CODECS[fmt] if c in av.codecs_available)


def index_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 frame that encodes `index` (see `read_frame_index`)."""
    cols, rows = _INDEX_GRID
    width, height = size
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    for bit in range(cols * rows):
        if index >> (cols * rows - 1 - bit) & 1:
            r, c = divmod(bit, cols)
            frame[
                r * height // rows : (r + 1) * height // rows, c * width // cols : (c + 1) * width // cols
            ] = 255
    return frame


def read_frame_index(frame: np.ndarray) -> int:
    """The index `index_frame` drew into a decoded (H, W, 3) frame (each cell's centre, thresholded)."""
    cols, rows = _INDEX_GRID
    height, width = frame.shape[:2]
    index = 0
    for bit in range(cols * rows):
        r, c = divmod(bit, cols)
        cell = frame[
            r * height // rows : (r + 1) * height // rows, c * width // cols : (c + 1) * width // cols
        ]
        h, w = cell.shape[:2]
        centre = cell[h // 4 : h - h // 4, w // 4 : w - w // 4]
        index = index << 1 | int(centre.mean() > 127)
    return index


def make_video(
    frames: int,
    fps: int,
    size: tuple[int, int] = (64, 48),
    fmt: str = "mp4",
    *,
    codec: str | None = None,
    faststart: bool = False,
) -> bytes:
    """An in-memory video of `frames` frames at `fps`, frame i drawn by `index_frame(i, size)`.

    Args:
        frames: Number of frames. With 0 the header is still written: an avi then declares a
            video stream with no frames; an mp4 drops the empty track (no video stream).
        fps: Frames per second (constant).
        size: (width, height); keep both even for the 4:2:0 codecs.
        fmt: Container: "mp4" (H.264, else MPEG-4 Part 2), "webm" (VP8) or "avi" (MPEG-4 Part 2).
        codec: An encoder name to use instead of the container's default.
        faststart: For mp4, put the index (moov) before the frames, as streaming files do; a
            file cut short then still announces all its frames.
    """
    codec = codec or video_codec(fmt)
    if faststart:  # the muxer rewrites the file to move the index forward: it needs a real file
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"video.{fmt}"
            _write_video(str(path), frames, fps, size, fmt, codec, {"movflags": "faststart"})
            return path.read_bytes()
    buf = io.BytesIO()
    _write_video(buf, frames, fps, size, fmt, codec, {})
    return buf.getvalue()


def _write_video(
    target: str | io.BytesIO,
    frames: int,
    fps: int,
    size: tuple[int, int],
    fmt: str,
    codec: str,
    options: dict[str, str],
) -> None:
    with av.open(target, "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.bit_rate = 2_000_000  # libvpx refuses to open without one
        if codec == "libx264":
            stream.options = {"crf": "18"}
        elif codec in ("mpeg4", "mjpeg"):
            stream.options = {"qscale": "2"}
        container.start_encoding()  # the header, even when no frame follows
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, size), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# Event-camera streams (EventGPT's format; see services/models/media/events.py).
EVENT_FORMS = ("pickle_dict", "structured", "array", "npz")


def make_events(n: int, width: int, height: int, *, form: str = "pickle_dict", seed: int = 0) -> bytes:
    """The bytes of a random event file: `n` events on a `width` x `height` sensor within 50 ms.

    Args:
        n: Number of events.
        width: Sensor width (x in [0, width)).
        height: Sensor height (y in [0, height)).
        form: "pickle_dict" (EventGPT's `np.save` of a dict), "structured" (.npy with fields
            x, y, t, p), "array" (.npy (N, 4) int64, columns x, y, t, p) or "npz".
        seed: Random seed.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, width, n).astype(np.uint16)
    y = rng.integers(0, height, n).astype(np.uint16)
    t = np.sort(rng.integers(0, 50_000, n)).astype(np.int64)
    p = rng.integers(0, 2, n).astype(np.uint8)
    buf = io.BytesIO()
    if form == "pickle_dict":
        np.save(buf, {"x": x, "y": y, "t": t, "p": p}, allow_pickle=True)  # type: ignore[arg-type]
    elif form == "structured":
        events = np.zeros(n, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])
        events["x"], events["y"], events["t"], events["p"] = x, y, t, p
        np.save(buf, events, allow_pickle=False)
    elif form == "array":
        np.save(buf, np.stack([x, y, t, p], axis=1).astype(np.int64), allow_pickle=False)
    elif form == "npz":
        np.savez(buf, x=x, y=y, t=t, p=p)
    else:
        raise ValueError(f"form: expected one of {EVENT_FORMS}, got {form!r}")
    return buf.getvalue()


def make_audio(
    seconds: float,
    rate: int,
    fmt: str = "wav",
    freq: float = 440.0,
    *,
    channels: int = 1,
    amplitude: float = 0.5,
) -> bytes:
    """A sine tone of `freq` Hz encoded with libsndfile: fmt "wav" (PCM_16), "flac", "ogg" (Vorbis) or "mp3"."""
    import soundfile as sf

    t = np.arange(round(seconds * rate)) / rate
    tone = amplitude * np.sin(2 * np.pi * freq * t)
    samples = np.repeat(tone[:, None], channels, axis=1).astype(np.float32)  # (N, channels)
    subtype = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}[fmt]
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt.upper(), subtype=subtype)
    return buf.getvalue()
