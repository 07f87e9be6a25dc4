"""Media generators of the synthetic dataset beyond images: video clips, tones and event streams.

Each generator draws one item from a `random.Random`, writes it under the output folder and
returns what it shows as words and as a machine-readable answer. `synth.synthesize` turns those
into caption pairs and LLaVA conversations; it imports this module only when a modality other
than "image" is asked for, so image-only runs never load PyAV or soundfile. The words, the
scene drawing and the timed videos' timing come from the leaf `_synth_scene`, not from `synth`.

- video: an mp4 (H.264 via PyAV, MPEG-4 Part 2 where libx264 is missing) of one coloured
  shape crossing a plain background left to right or right to left;
- audio: a 16-bit wav of a pure tone whose pitch is low, medium or high, sometimes with a
  short silence;
- event: EventGPT's pickled-dict .npy of a bright bar sweeping left or right across the
  sensor: its leading edge fires positive events, its trailing edge negative ones, plus a
  little noise;
- timed video (`write_timed_videos`, for the E.T. Instruct-style set): an 8 s mp4 at 2 fps of
  an empty background on which one coloured shape appears at a whole second `start`, moves
  right, and is gone from a later whole second `end` on.

The same seed writes the same bytes (x264 is run single-threaded for that).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# PyAV before decord: decord loads its FFmpeg 4.1 and libvpx 6 with RTLD_GLOBAL, and a PyAV
# loaded after it binds libvpx's unversioned symbols to that copy.
import av
import numpy as np
from PIL import Image

from services.trainer._synth_scene import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    PITCHES,
    SHAPES,
    TIMED_FPS,
    TIMED_MIN_VISIBLE,
    TIMED_SECONDS,
    Scene,
    draw,
)

VIDEO_FRAMES = 16
VIDEO_FPS = 8
VIDEO_SIZE = 64
AUDIO_RATE = 16_000
AUDIO_SECONDS = 2.0
EVENT_SENSOR = (64, 48)  # (width, height)
EVENT_SPAN_US = 50_000  # EventGPT refuses streams of 100 ms or more
EVENT_BAR = 6  # bar width in pixels
EXTENSIONS = {"video": "mp4", "audio": "wav", "event": "npy"}


@dataclass(frozen=True)
class SynthFile:
    """One written file: `rel` under the output folder, `words` ("red circle moving left")
    and `answer` ({"color": "red", "shape": "circle", "direction": "left"})."""

    rel: str
    words: str
    answer: dict[str, str]


def settings() -> dict[str, dict[str, object]]:
    """The fixed settings of each generator, for meta.json."""
    return {
        "video": {"frames": VIDEO_FRAMES, "fps": VIDEO_FPS, "size": VIDEO_SIZE, "codec": _video_codec()},
        "audio": {"sample_rate": AUDIO_RATE, "seconds": AUDIO_SECONDS, "pitches_hz": dict(PITCHES)},
        "event": {"width": EVENT_SENSOR[0], "height": EVENT_SENSOR[1], "span_us": EVENT_SPAN_US},
        "timestamps": {
            "seconds": TIMED_SECONDS,
            "fps": TIMED_FPS,
            "size": VIDEO_SIZE,
            "min_visible_s": TIMED_MIN_VISIBLE,
            "codec": _video_codec(),
        },
    }


def write_media(out_dir: Path, modality: str, prefix: str, count: int, rng: random.Random) -> list[SynthFile]:
    """Write `count` items of `modality` as `<modality>/<prefix>_00000.<ext>` ... under `out_dir`."""
    make = _GENERATORS[modality]
    (out_dir / modality).mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        rel = f"{modality}/{prefix}_{i:05d}.{EXTENSIONS[modality]}"
        words, answer = make(out_dir / rel, rng)
        items.append(SynthFile(rel, words, answer))
    return items


def _video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _write_mp4(path: Path, frames: list[np.ndarray], fps: int) -> None:
    codec = _video_codec()
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.video.stream.VideoStream)  # a video codec gives a video stream
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = (
            {"crf": "18", "preset": "ultrafast", "threads": "1"}
            if codec == "libx264"
            else {"qscale": "2", "threads": "1"}
        )
        for frame in frames:  # (H, W, 3) uint8
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def write_timed_videos(out_dir: Path, prefix: str, count: int, rng: random.Random) -> list[SynthFile]:
    """Write `count` timed videos as `timestamps/<prefix>_00000.mp4` ... under `out_dir`.

    Each item's answer holds "color", "shape", "start" and "end" (whole seconds; the shape is
    visible in [start, end)).
    """
    (out_dir / "timestamps").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        rel = f"timestamps/{prefix}_{i:05d}.mp4"
        color, shape, background = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        start = rng.randint(0, TIMED_SECONDS - TIMED_MIN_VISIBLE)
        end = rng.randint(start + TIMED_MIN_VISIBLE, TIMED_SECONDS)
        side = rng.randint(VIDEO_SIZE * 4 // 10, VIDEO_SIZE * 5 // 10)
        top = (VIDEO_SIZE - side) // 2
        shown = (end - start) * TIMED_FPS
        lefts = np.linspace(0, VIDEO_SIZE - side, shown).round().astype(int)
        empty = np.asarray(Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), BACKGROUNDS[background]))
        frames = []
        for k in range(TIMED_SECONDS * TIMED_FPS):
            j = k - start * TIMED_FPS
            if 0 <= j < shown:
                scene = Scene(color, shape, background, (int(lefts[j]), top, side))
                frames.append(np.asarray(draw(scene, VIDEO_SIZE)))
            else:
                frames.append(empty)
        _write_mp4(out_dir / rel, frames, TIMED_FPS)
        words = f"{color} {shape}"
        items.append(
            SynthFile(rel, words, {"color": color, "shape": shape, "start": str(start), "end": str(end)})
        )
    return items


def _video(path: Path, rng: random.Random) -> tuple[str, dict[str, str]]:
    color, shape, background = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    direction = rng.choice(DIRECTIONS)
    side = rng.randint(VIDEO_SIZE * 3 // 10, VIDEO_SIZE * 4 // 10)
    top = rng.randint(0, VIDEO_SIZE - side)
    lefts = np.linspace(0, VIDEO_SIZE - side, VIDEO_FRAMES).round().astype(int)
    if direction == "left":
        lefts = lefts[::-1]
    frames = [
        np.asarray(draw(Scene(color, shape, background, (int(left), top, side)), VIDEO_SIZE))
        for left in lefts
    ]
    _write_mp4(path, frames, VIDEO_FPS)
    return f"{color} {shape} moving {direction}", {"color": color, "shape": shape, "direction": direction}


def _audio(path: Path, rng: random.Random) -> tuple[str, dict[str, str]]:
    import soundfile as sf

    pitch = rng.choice(list(PITCHES))
    amplitude = rng.uniform(0.3, 0.6)
    n = round(AUDIO_SECONDS * AUDIO_RATE)
    tone = amplitude * np.sin(2 * np.pi * PITCHES[pitch] * np.arange(n) / AUDIO_RATE)  # (N,)
    if rng.random() < 0.5:  # a short silence somewhere after the first half second
        gap = rng.randint(AUDIO_RATE // 10, AUDIO_RATE * 3 // 10)
        start = rng.randint(AUDIO_RATE // 2, n - gap - AUDIO_RATE // 2)
        tone[start : start + gap] = 0.0
    sf.write(str(path), tone.astype(np.float32), AUDIO_RATE, format="WAV", subtype="PCM_16")
    return f"{pitch} tone", {"pitch": pitch}


def _event(path: Path, rng: random.Random) -> tuple[str, dict[str, str]]:
    direction = rng.choice(DIRECTIONS)
    gen = np.random.default_rng(rng.getrandbits(64))
    width, height = EVENT_SENSOR
    step_us = EVENT_SPAN_US // width
    k = np.arange(width)  # the bar's leading edge reaches column k (from its start side) at k * step_us
    lead = k if direction == "right" else width - 1 - k
    trail = lead - EVENT_BAR if direction == "right" else lead + EVENT_BAR
    x = np.concatenate([lead, trail])[:, None].repeat(height, axis=1)  # (2 * width, height)
    y = np.arange(height)[None, :].repeat(2 * width, axis=0)
    t = np.concatenate([k, k])[:, None] * step_us + gen.integers(0, step_us, x.shape)
    p = np.repeat([1, 0], width)[:, None].repeat(height, axis=1)  # leading edge brighter, trailing darker
    keep = (gen.random(x.shape) < 0.4) & (x >= 0) & (x < width)
    noise = int(gen.integers(20, 60))
    xs = [x[keep], gen.integers(0, width, noise)]
    ys = [y[keep], gen.integers(0, height, noise)]
    ts = [t[keep], gen.integers(0, EVENT_SPAN_US, noise)]
    ps = [p[keep], gen.integers(0, 2, noise)]
    t = np.concatenate(ts)
    order = np.argsort(t, kind="stable")
    events = {
        "x": np.concatenate(xs)[order].astype(np.uint16),
        "y": np.concatenate(ys)[order].astype(np.uint16),
        "t": t[order].astype(np.int64),
        "p": np.concatenate(ps)[order].astype(np.uint8),
        "width": width,
        "height": height,
    }
    np.save(path, np.array(events, dtype=object), allow_pickle=True)
    return f"edge moving {direction}", {"direction": direction}


_GENERATORS: dict[str, Callable[[Path, random.Random], tuple[str, dict[str, str]]]] = {
    "video": _video,
    "audio": _audio,
    "event": _event,
}
