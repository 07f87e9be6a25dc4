"""Parity fixture: ImageBind's image, video and audio preprocessing as PandaGPT (or NExT-GPT) runs it.

Runs the seed's own `code/model/ImageBind/data.py` (`load_and_transform_vision_data`,
`load_and_transform_video_data`, `load_and_transform_audio_data`) on three small files this
script writes (a PNG, an H.264 MP4 at 7.5 fps, a stereo 22.05 kHz 16-bit WAV), and stores the
files, the seed's outputs as digests (`_preprocess_common.digest`) and the frames and clips it
chose in tests/fixtures/parity/<seed>/preprocess.{safetensors,json} and preprocess_{image.png,
video.mp4,audio.wav}. tests/unit/parity/test_<seed>_preprocess.py check modalmesh's
encoder-side preprocessing of the same files against them.

PandaGPT and NExT-GPT (legacy, `NExT-GPT-Lagacy/code/model/ImageBind/data.py`) carry copies of
ImageBind's `data.py` that differ only in comments, the legacy image loader also taking a PIL
image, and PandaGPT passing `sample_rate=16000` to `EncodedVideo.from_path`. That argument is what
makes their pytorchvideo differ: PyPI's pytorchvideo 0.1.5 (NExT-GPT pins it) refuses it, so
PandaGPT's video needs pytorchvideo from git (its README says so; ImageBind's requirements pin
commit 28fe037), whose ConstantClipsPerVideoSampler spaces clip starts by (duration - clip) /
(clips - 1) where 0.1.5 divides by clips. So the PandaGPT fixture is made with pytorchvideo at
28fe037 (put first on PYTHONPATH) and the NExT-GPT one with 0.1.5; the JSON records which.
`--check-repo` runs a second checkout's copy in the same environment and requires identical
outputs.

Shims, in this process only: pytorchvideo imports `torchvision.transforms.functional_tensor`,
renamed `_functional_tensor` in torchvision 0.17; `data.py`'s relative import of the text
tokenizer gets a stub (text is not used); `torchaudio.load` (TorchCodec + FFmpeg in torchaudio
2.9, absent here) is replaced by the exact 16-bit PCM reading every backend does.

Usage (scratch environment, never the project's venv):
    PYTHONPATH=<pytorchvideo at 28fe037> /work/scratch/venv/bin/python \
        scripts/parity/pandagpt_preprocess.py --repo /work/seeds/PandaGPT [--check-repo /work/seeds/NExT-GPT]
    /work/scratch/venv/bin/python scripts/parity/pandagpt_preprocess.py --repo /work/seeds/NExT-GPT
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _preprocess_common import (
    digest,
    git_commit,
    read_pcm16_wav,
    versions,
    write_fixture,
    write_mp4,
    write_png,
    write_wav,
)

ROOT = Path(__file__).resolve().parents[2]
PART = "preprocess"
IMAGE_SIZE = (250, 263)  # (W, H): resized to 224 x 235 (int truncation), centre margin 11
VIDEO = {"width": 252, "height": 240, "frames": 36, "fps": Fraction(15, 2)}  # -> 235 x 224
AUDIO = {"seconds": 2.2, "rate": 22050, "channels": 2}  # downsampled: every mel bin has signal
DATA_PY = ("code/model/ImageBind/data.py", "NExT-GPT-Lagacy/code/model/ImageBind/data.py")


def load_seed_data(repo: Path, name: str) -> Any:
    """Import a checkout's ImageBind `data.py` as a module, with the shims the docstring lists."""
    path = next((repo / p for p in DATA_PY if (repo / p).is_file()), None)
    if path is None:
        raise SystemExit(f"{repo}: expected one of {DATA_PY}")
    import torchaudio
    import torchvision.transforms._functional_tensor as functional_tensor

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)
    package = types.ModuleType(name)
    package.__path__ = [str(path.parent)]
    models = types.ModuleType(f"{name}.models")
    tokenizer = types.ModuleType(f"{name}.models.multimodal_preprocessors")
    tokenizer.SimpleTokenizer = None  # type: ignore[attr-defined]
    sys.modules.update({name: package, f"{name}.models": models, tokenizer.__name__: tokenizer})
    torchaudio.load = read_pcm16_wav  # type: ignore[assignment]
    spec = importlib.util.spec_from_file_location(f"{name}.data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.relative_to(repo)


def record_video_indices(data: Any, video_path: str) -> list[list[int]]:
    """The frame indices the seed decodes per clip and keeps after UniformTemporalSubsample."""
    import decord
    import torch

    calls: list[list[int]] = []
    original = decord.VideoReader.get_batch

    def spy(self: Any, indices: Any) -> Any:
        calls.append([int(i) for i in indices])
        return original(self, indices)

    decord.VideoReader.get_batch = spy  # type: ignore[method-assign]
    try:
        out = data.load_and_transform_video_data([video_path], "cpu")
    finally:
        decord.VideoReader.get_batch = original  # type: ignore[method-assign]
    sampler = data.pv_transforms.UniformTemporalSubsample(num_samples=2)
    kept = []
    for clip in calls:
        ids = torch.tensor(clip, dtype=torch.float32).view(1, -1, 1, 1)  # (C, T, H, W) of indices
        kept.append([int(v) for v in sampler(ids).flatten()])
    return out, kept


def run(repo: Path, files: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The seed's outputs (torch tensors) and the choices it made, for one checkout."""
    import torch
    import torchaudio

    name = f"seed_imagebind_{abs(hash(str(repo)))}"
    data, rel = load_seed_data(repo, name)
    with torch.no_grad():
        image = data.load_and_transform_vision_data([str(files["image"])], "cpu")  # (1, 3, 224, 224)
        video, frame_indices = record_video_indices(data, str(files["video"]))  # (1, 15, 3, 2, 224, 224)
        audio = data.load_and_transform_audio_data([str(files["audio"])], "cpu")  # (1, 3, 1, 128, 204)
        # The same code computing in float64: float64 samples (torchaudio's resampling kernel,
        # fbank and Normalize follow the waveform's dtype) and torch's default dtype float64
        # (kaldi.get_mel_banks builds its filters in the default dtype, float32 otherwise).
        torchaudio.load = lambda path: read_pcm16_wav(path, np.float64)
        torch.set_default_dtype(torch.float64)
        try:
            audio64 = data.load_and_transform_audio_data([str(files["audio"])], "cpu")
        finally:
            torch.set_default_dtype(torch.float32)
            torchaudio.load = read_pcm16_wav
    waveform, rate = read_pcm16_wav(str(files["audio"]))
    resampled = waveform.shape[1] if rate == 16000 else int(np.ceil(waveform.shape[1] * 16000 / rate))
    sampler = data.ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=3)
    audio_clips = [[float(s), float(e)] for s, e in data.get_clip_timepoints(sampler, resampled / 16000)]
    outputs = {"image": image[0], "video": video[0], "audio": audio[0], "audio_float64": audio64[0]}
    choices = {
        "video_frame_indices": frame_indices,
        "audio_clip_seconds": audio_clips,
        "audio_float32_vs_float64_max_abs": float((audio[0].double() - audio64[0]).abs().max()),
    }
    return outputs, choices, str(rel)


SEEDS = {  # first data.py found -> (fixture folder, repository)
    DATA_PY[0]: ("pandagpt", "yxuansu/PandaGPT"),
    DATA_PY[1]: ("nextgpt", "NExT-GPT/NExT-GPT (legacy, NExT-GPT-Lagacy/)"),
}


def seed_of(repo: Path) -> tuple[str, str]:
    """(fixture folder, repository name) of a checkout, by which data.py copy it holds."""
    for rel, seed in SEEDS.items():
        if (repo / rel).is_file():
            return seed
    raise SystemExit(f"{repo}: expected one of {DATA_PY}")


def pytorchvideo_source() -> dict[str, str]:
    """Which pytorchvideo ran: its version and, for a git copy, the GIT_COMMIT file beside it."""
    import pytorchvideo

    folder = Path(pytorchvideo.__file__).parent
    marker = folder / "GIT_COMMIT"
    commit = marker.read_text().strip() if marker.is_file() else "none (PyPI release)"
    return {"version": pytorchvideo.__version__, "git_commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="PandaGPT or NExT-GPT checkout")
    parser.add_argument("--check-repo", type=Path, help="another checkout whose data.py must agree")
    parser.add_argument("--out", type=Path, help="default tests/fixtures/parity/<seed>")
    args = parser.parse_args()

    seed, repo_name = seed_of(args.repo)
    out = args.out or ROOT / "tests/fixtures/parity" / seed
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "image": out / f"{PART}_image.png",
        "video": out / f"{PART}_video.mp4",
        "audio": out / f"{PART}_audio.wav",
    }
    write_png(files["image"], *IMAGE_SIZE)
    write_mp4(files["video"], VIDEO["width"], VIDEO["height"], VIDEO["frames"], VIDEO["fps"])
    write_wav(files["audio"], AUDIO["seconds"], AUDIO["rate"], AUDIO["channels"])

    outputs, choices, rel = run(args.repo, files)
    record: dict[str, Any] = {
        "seed": {"repo": repo_name, "commit": git_commit(args.repo), "file": rel},
        "versions": {
            **versions("torch", "torchvision", "torchaudio", "decord", "pillow", "numpy"),
            "pytorchvideo": pytorchvideo_source(),
        },
        "inputs": {
            "image": {"file": files["image"].name, "size": list(IMAGE_SIZE)},
            "video": {**VIDEO, "fps": str(VIDEO["fps"]), "file": files["video"].name, "codec": "libx264"},
            "audio": {**AUDIO, "file": files["audio"].name, "format": "PCM_16"},
        },
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "calls": {
            "image": "load_and_transform_vision_data([png], 'cpu')[0]",
            "video": "load_and_transform_video_data([mp4], 'cpu')[0]",
            "audio": "load_and_transform_audio_data([wav], 'cpu')[0]",
            "audio_float64": "the same computing in float64 (float64 samples, torch default dtype float64)",
        },
        **choices,
    }
    if args.check_repo is not None:
        other, other_choices, other_rel = run(args.check_repo, files)
        for key, value in outputs.items():
            if not bool((value == other[key]).all()):
                raise SystemExit(f"{args.check_repo / other_rel}: {key} differs from {rel}")
        if other_choices != choices:
            raise SystemExit(f"{args.check_repo / other_rel}: frame/clip choices differ from {rel}")
        record["identical_outputs_from"] = {
            "repo": seed_of(args.check_repo)[1],
            "commit": git_commit(args.check_repo),
            "file": other_rel,
        }
    tensors: dict[str, np.ndarray] = {}
    for key, value in outputs.items():
        tensors.update(digest(key, value))
    write_fixture(out, PART, tensors, record)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    sys.stdout.write(f"wrote {out}/{PART}.* ({shapes})\n")


if __name__ == "__main__":
    main()
