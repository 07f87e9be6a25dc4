"""Parity fixture: E.T. Chat's video-frame and image preprocessing, from ETBench's own code.

Runs `etchat/utils/io.py` (`load_video(mp4, num_threads=1)` as `eval/infer_etbench.py` calls
it: decord, one frame per second by `np.arange(0, n, avg_fps / fps).round()`, tags rounded to
0.1 s; `load_image(png)`) and `etchat/utils/transforms.py` (`get_transform('clip_center_224',
inference=True)`, what `model/builder.py` builds: ToTensor, torchvision Resize(224,
antialias=True), CenterResizedCrop(224), Normalize) on an H.264 MP4 at 7.5 fps and a PNG this
script writes. Stores the inputs, the transformed tensors' digests (float32, before the
inference script's `.half()`), the frame indices and tags in tests/fixtures/parity/etchat/
preprocess.{safetensors,json} and preprocess_{video.mp4,image.png};
tests/unit/parity/test_etchat_preprocess.py checks modalmesh's encoder-side preprocessing.

Usage (scratch environment, never the project's venv):
    /work/scratch/venv/bin/python scripts/parity/etchat_preprocess.py --repo /work/seeds/ETBench
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _preprocess_common import digest, git_commit, versions, write_fixture, write_mp4, write_png

ROOT = Path(__file__).resolve().parents[2]
PART = "preprocess"
IMAGE_SIZE = (250, 263)  # (W, H): resized to 224 x 235, centre margin 11
VIDEO = {"width": 252, "height": 240, "frames": 36, "fps": Fraction(15, 2)}  # frames -> 235 x 224
TRANSFORM = "clip_center_224"  # train.py's default vision_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="ETBench checkout (etchat/)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/parity/etchat")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    files = {"video": args.out / f"{PART}_video.mp4", "image": args.out / f"{PART}_image.png"}
    write_mp4(files["video"], VIDEO["width"], VIDEO["height"], VIDEO["frames"], VIDEO["fps"])
    write_png(files["image"], *IMAGE_SIZE)

    sys.path.insert(0, str(args.repo))
    import decord
    import torch
    from etchat.utils.io import load_image, load_video  # the seed's etchat/utils/io.py
    from etchat.utils.transforms import get_transform

    transform = get_transform(TRANSFORM, inference=True)
    calls: list[list[int]] = []
    original = decord.VideoReader.get_batch

    def spy(self: Any, indices: Any) -> Any:  # records the frames the seed decodes
        calls.append([int(i) for i in indices])
        return original(self, indices)

    decord.VideoReader.get_batch = spy  # type: ignore[method-assign]
    with torch.no_grad():
        video, tags = load_video(str(files["video"]), num_threads=1)  # (T, H, W, 3) uint8
        frames = transform(video)  # (T, 3, 224, 224)
        image = transform(load_image(str(files["image"])))  # (1, 3, 224, 224)
    decord.VideoReader.get_batch = original  # type: ignore[method-assign]
    (indices,) = calls
    outputs = {"video": frames, "image": image[0]}

    record: dict[str, Any] = {
        "seed": {
            "repo": "PolyU-ChenLab/ETBench",
            "commit": git_commit(args.repo),
            "file": "etchat/utils/io.py, etchat/utils/transforms.py",
        },
        "versions": versions("torch", "torchvision", "decord", "pillow", "numpy"),
        "inputs": {
            "video": {**VIDEO, "fps": str(VIDEO["fps"]), "file": files["video"].name, "codec": "libx264"},
            "image": {"file": files["image"].name, "size": list(IMAGE_SIZE)},
        },
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "calls": {
            "video": f"get_transform('{TRANSFORM}', inference=True)(load_video(mp4, num_threads=1)[0])",
            "image": f"get_transform('{TRANSFORM}', inference=True)(load_image(png))[0]",
        },
        "video_frame_indices": indices,
        "video_tags": [float(t) for t in tags],
    }
    tensors: dict[str, np.ndarray] = {}
    for key, value in outputs.items():
        tensors.update(digest(key, value))
    write_fixture(args.out, PART, tensors, record)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    sys.stdout.write(f"wrote {args.out}/{PART}.* ({shapes}); tags {tags}\n")


if __name__ == "__main__":
    main()
