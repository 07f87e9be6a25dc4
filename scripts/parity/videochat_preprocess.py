"""Parity fixture: VideoChat's video-frame and image preprocessing, from its demo's own code.

Runs `video_chat/conversation.py` of Ask-Anything: `Chat.load_video(mp4, num_segments=8,
return_msg=True)` (decord, `get_index`, GroupScale(224, bicubic) + GroupCenterCrop(224) +
Stack + ToTorchFormatTensor + GroupNormalize) and `Chat.upload_img` (Resize((224, 224),
bicubic) + ToTensor + Normalize) on a PIL RGB image, as the Gradio demo passes it
(`gr.Image(type="pil")`). Writes the two inputs (an H.264 MP4 at 7.5 fps, a PNG), the outputs'
digests, the frame indices and the demo's message to tests/fixtures/parity/videochat/
preprocess.{safetensors,json} and preprocess_{video.mp4,image.png};
tests/unit/parity/test_videochat_preprocess.py checks modalmesh's encoder-side preprocessing.

Shims, in this process only: `upload_img` ends in `.cuda()` and `model.encode_img`; the first is
made the identity and the second a recorder of the tensor it receives (no model is built).

Usage (scratch environment, never the project's venv):
    /work/scratch/venv/bin/python scripts/parity/videochat_preprocess.py --repo /work/seeds/Ask-Anything
"""

from __future__ import annotations

import argparse
import sys
import types
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _preprocess_common import digest, git_commit, versions, write_fixture, write_mp4, write_png

ROOT = Path(__file__).resolve().parents[2]
PART = "preprocess"
IMAGE_SIZE = (250, 263)  # (W, H): squashed to 224 x 224
VIDEO = {"width": 252, "height": 240, "frames": 36, "fps": Fraction(15, 2)}  # frames -> 235 x 224
NUM_SEGMENTS = 8  # the demo's default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="Ask-Anything checkout (video_chat/)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/parity/videochat")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    files = {"video": args.out / f"{PART}_video.mp4", "image": args.out / f"{PART}_image.png"}
    write_mp4(files["video"], VIDEO["width"], VIDEO["height"], VIDEO["frames"], VIDEO["fps"])
    write_png(files["image"], *IMAGE_SIZE)

    sys.path.insert(0, str(args.repo / "video_chat"))
    import conversation  # the seed's video_chat/conversation.py
    import decord
    import torch
    from PIL import Image

    chat = conversation.Chat(model=None, device="cpu")
    with torch.no_grad():
        video, message = chat.load_video(str(files["video"]), num_segments=NUM_SEGMENTS, return_msg=True)
        count = len(decord.VideoReader(str(files["video"])))
        indices = [int(i) for i in chat.get_index(count, NUM_SEGMENTS)]

        seen: list[Any] = []
        chat.model = types.SimpleNamespace(encode_img=lambda x: (seen.append(x) or x, None))
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        conv = types.SimpleNamespace(roles=("Human", "Assistant"), messages=[])
        image = Image.open(files["image"]).convert("RGB")  # what gr.Image(type="pil") hands over
        chat.upload_img(image, conv, [])
    frames = video.reshape(NUM_SEGMENTS, 3, 224, 224)  # (T*3, H, W) -> (T, 3, H, W), as upload_video
    outputs = {"video": frames, "image": seen[0][0, 0]}  # upload_img: (1, 1, 3, 224, 224)

    record: dict[str, Any] = {
        "seed": {
            "repo": "OpenGVLab/Ask-Anything",
            "commit": git_commit(args.repo),
            "file": "video_chat/conversation.py",
        },
        "versions": versions("torch", "torchvision", "decord", "pillow", "numpy"),
        "inputs": {
            "video": {**VIDEO, "fps": str(VIDEO["fps"]), "file": files["video"].name, "codec": "libx264"},
            "image": {"file": files["image"].name, "size": list(IMAGE_SIZE)},
        },
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
        "calls": {
            "video": f"Chat.load_video(mp4, num_segments={NUM_SEGMENTS}, return_msg=True)[0], (T*3, H, W) -> (T, 3, H, W)",
            "image": "Chat.upload_img(Image.open(png).convert('RGB'), ...): the tensor given to encode_img",
        },
        "video_frame_indices": indices,
        "video_message": message,
    }
    tensors: dict[str, np.ndarray] = {}
    for key, value in outputs.items():
        tensors.update(digest(key, value))
    write_fixture(args.out, PART, tensors, record)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
    sys.stdout.write(f"wrote {args.out}/{PART}.* ({shapes}); {message}\n")


if __name__ == "__main__":
    main()
