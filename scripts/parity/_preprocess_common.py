"""Shared by the `scripts/parity/*_preprocess.py` scripts: input media and small, strict digests.

A seed pipeline's output (ImageBind video is 15 x 3 x 2 x 224 x 224 floats) is too large to
commit whole. `digest` keeps, per output:

    <name>.values   the exact float32 values at a fixed pseudo-random subset of elements
    <name>.idx      their flat indices (int64), drawn from the output's name and size
    <name>.sum      float64 sums over each plane (the last two axes: one per frame x channel)
    <name>.sumsq    float64 sums of squares over the same planes

`tests/helpers/preprocess_parity.py` checks our output against these: every kept value within
the tolerance, and every plane sum within what that tolerance allows. A one-pixel shift of a
crop changes most kept values, so it cannot pass. `write_fixture` writes the tensors
(safetensors) and the JSON record (versions, seed commit, command line) side by side.

Run only in the scratch environment (torch, safetensors); nothing here is imported by the project.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = 4096  # kept values per output


def sample_indices(name: str, size: int, count: int = SAMPLES) -> np.ndarray:
    """The flat indices kept for output `name` of `size` elements (sorted, int64)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return np.sort(rng.choice(size, size=min(count, size), replace=False)).astype(np.int64)


def digest(name: str, x: Any) -> dict[str, np.ndarray]:
    """The tensors that stand for output `x` (a torch tensor or array) in the fixture."""
    array = np.ascontiguousarray(np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x))
    array = array.astype(np.float32)
    idx = sample_indices(name, array.size)
    planes = array.reshape(-1, array.shape[-2] * array.shape[-1]).astype(np.float64)
    return {
        f"{name}.shape": np.array(array.shape, dtype=np.int64),
        f"{name}.idx": idx,
        f"{name}.values": array.reshape(-1)[idx],
        f"{name}.sum": planes.sum(axis=1),
        f"{name}.sumsq": (planes**2).sum(axis=1),
    }


def git_commit(repo: Path) -> str:
    """The checked-out commit of a seed repository."""
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def versions(*names: str) -> dict[str, str]:
    """Python and the named packages' versions, as the fixture JSON records them."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_fixture(out_dir: Path, part: str, tensors: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Write `<part>.safetensors` and `<part>.json` into `out_dir`."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, str(out_dir / f"{part}.safetensors")
    )
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), **record}
    (out_dir / f"{part}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


# --- input media ----------------------------------------------------------------------------
# Sizes are chosen so that every crop rule gives a different offset: a shortest-edge resize to
# 224 leaves an odd margin of 11 (image) or 11 (video) pixels, which floor (HF, E.T. Chat),
# round-half-even (torchvision CenterCrop) and ceil (ImageBind's uniform_crop) split as 5, 6, 6,
# and (margin 7) 3, 4, 4 for the squares where they differ.


def pattern(width: int, height: int, phase: float = 0.0, *, seed: int = 0) -> np.ndarray:
    """A smooth but detailed (H, W, 3) uint8 picture: stripes of several frequencies, a disc and
    a little noise, so that a shift of one pixel changes most values and the file stays small."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127.5 + 110 * np.sin(xx / 3.1 + phase) * np.cos(yy / 7.3)
    g = 127.5 + 110 * np.sin((xx + 2 * yy) / 5.7 - phase)
    b = 127.5 + 110 * np.cos(np.hypot(xx - width / 2, yy - height / 2) / 4.3 + phase)
    image = np.stack([r, g, b], axis=-1)
    disc = np.hypot(xx - width * (0.3 + 0.01 * phase), yy - height * 0.6) < min(width, height) / 5
    image[disc] = (240.0, 30.0, 60.0)
    image += np.random.default_rng(seed).normal(0, 1.5, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write_png(path: Path, width: int, height: int) -> None:
    from PIL import Image

    Image.fromarray(pattern(width, height, seed=1)).save(path, format="PNG", optimize=True)


def write_mp4(path: Path, width: int, height: int, frames: int, fps: Any) -> None:
    """H.264 (libx264, yuv420p) at `fps` (a Fraction for non-integer rates) via PyAV."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "26", "preset": "medium"}
        for i in range(frames):
            picture = pattern(width, height, phase=0.4 * i, seed=100 + i)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))


def write_wav(path: Path, seconds: float, rate: int, channels: int) -> None:
    """16-bit PCM: a chirp plus a tone per channel and some noise, never silent."""
    import wave

    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(7)
    chans = []
    for c in range(channels):
        chirp = 0.4 * np.sin(2 * np.pi * (200 + 300 * c) * t + 2 * np.pi * 400 * t**2)
        tone = 0.2 * np.sin(2 * np.pi * (1000 + 500 * c) * t) + 0.03 * rng.normal(size=t.shape)
        chans.append(chirp + tone + 0.05 * (c + 1))  # a DC offset per channel
    pcm = np.clip(np.round(np.stack(chans, axis=1) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def read_pcm16_wav(path: str, dtype: Any = np.float32) -> tuple[Any, int]:
    """What `torchaudio.load` returns for a 16-bit PCM WAV: float32 (channels, N) = int16 / 32768.

    torchaudio 2.9's `load` needs TorchCodec and a system FFmpeg, which the scratch environment
    lacks; every torchaudio backend (sox_io, soundfile, ffmpeg, TorchCodec) maps 16-bit PCM to
    float exactly this way, so the seed's pipeline sees the same numbers.
    """
    import wave

    import torch

    with wave.open(path, "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM")
        raw = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, f.getnchannels())
        rate = f.getframerate()
    return torch.from_numpy(raw.T.astype(dtype) / 32768.0), rate
