"""VideoChat's demo prompt ids on a two-turn conversation about a video.

Runs VideoChat's own demo code (`video_chat/conversation.py`: `Chat.upload_video`,
`Chat.load_video` (its frame indices and the "The video contains ..." message), `Chat.ask`,
`Chat.answer`, `Chat.get_context_emb`, `get_prompt`) with the demo's conversation state
(`demo.py` lines 41-46), a small Vicuna-style slow tokenizer built here (transformers 4.29's
slow LlamaTokenizer, as VideoChat), a stand-in for decord's VideoReader (120 frames at 30
fps of a flat picture), an embedding table that returns ids as values and a marker for the
video's 96 query tokens (see `_prompt_common`); then the same two turns about an image
(`Chat.upload_img`, whose message is "<Image><ImageHere></Image>\n"). Writes into tests/fixtures/parity/videochat/:
prompt.json, prompt.tokenizer-slow/ and prompt.tokenizer-fast/.

    /work/scratch/venv/bin/python scripts/parity/videochat_prompt.py --repo /path/to/Ask-Anything
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompt_common as common

TURNS = [
    {"video": 0, "text": "What is in the video?", "reply": "A red circle on a white table."},
    {"text": "Describe it more.", "reply": "It is round and bright red."},
]
FRAMES, FPS, SEGMENTS, QUERY_TOKENS = 120, 30.0, 8, 96


class FakeFrame:
    def __init__(self, array):
        self.array = array

    def asnumpy(self):
        return self.array


class FakeVideoReader:
    """decord.VideoReader's surface that `Chat.load_video` uses, over a flat 16 x 20 picture."""

    def __init__(self, path, ctx=None):
        import numpy as np

        self.frame = np.full((16, 20, 3), 128, dtype=np.uint8)

    def __len__(self) -> int:
        return FRAMES

    def get_avg_fps(self) -> float:
        return FPS

    def get_batch(self, index):
        import numpy as np

        return FakeFrame(np.stack([self.frame] * len(index)))

    def __getitem__(self, i):
        return FakeFrame(self.frame)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, required=True, help="an Ask-Anything checkout")
    args = parser.parse_args()
    root = args.repo / "video_chat"

    import torch
    from transformers import LlamaTokenizer

    out = common.out_dir("videochat")
    with tempfile.TemporaryDirectory() as tmp:
        model = common.spm_model(Path(tmp))
    slow = common.llama_slow_folder(common.fresh(out / "prompt.tokenizer-slow"), model)
    common.fast_from_slow(slow, common.fresh(out / "prompt.tokenizer-fast"))

    sys.path.insert(0, str(root))  # conversation.py imports models.video_transformers
    common.package("models", root / "models")  # its __init__ builds the whole model
    common.load_module("models.video_transformers", root / "models" / "video_transformers.py")
    conversation = common.load_module("videochat_conversation", root / "conversation.py")
    conversation.VideoReader = FakeVideoReader
    easydict = common.load_module("videochat_easydict", root / "utils" / "easydict.py")

    tokenizer = LlamaTokenizer.from_pretrained(str(slow), use_fast=False)  # as models/videochat.py 112
    tokenizer.pad_token = tokenizer.eos_token
    prompts: list[list[int]] = []
    replies = iter(t["reply"] for t in TURNS)

    def generate(inputs_embeds, **_):
        prompts.append(common.decode(inputs_embeds))
        reply = tokenizer(next(replies) + "###", add_special_tokens=False).input_ids
        return torch.tensor([reply])

    llama = SimpleNamespace(model=SimpleNamespace(embed_tokens=common.id_embedding()), generate=generate)
    fake_model = SimpleNamespace(
        llama_tokenizer=tokenizer,
        llama_model=llama,
        encode_img=lambda image: (common.media_marker(0, QUERY_TOKENS), None),
    )
    chat = conversation.Chat(fake_model, device="cpu")
    state = easydict.EasyDict({"system": "", "roles": ("Human", "Assistant"), "messages": [], "sep": "###"})
    images: list = []
    _, images, state = chat.upload_video("video0.mp4", state, images, SEGMENTS)
    message = state.messages[0][1]
    for turn in TURNS:
        state = chat.ask(turn["text"], state)
        chat.answer(conv=state, img_list=images, max_new_tokens=1000, num_beams=1, temperature=1.0)
    indices = [int(i) for i in chat.get_index(FRAMES, SEGMENTS)]

    # An image conversation: upload_img writes "<Image><ImageHere></Image>\n" as its own message.
    from PIL import Image

    replies = iter(t["reply"] for t in TURNS)
    fake_model.encode_img = lambda image: (common.media_marker(0, QUERY_TOKENS), None)
    state = easydict.EasyDict({"system": "", "roles": ("Human", "Assistant"), "messages": [], "sep": "###"})
    images = []
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # upload_img moves the pixels to a GPU
    _, images, state = chat.upload_img(Image.new("RGB", (20, 16), (128, 128, 128)), state, images)
    image_prompts_from = len(prompts)
    for turn in TURNS:
        state = chat.ask(turn["text"].replace("video", "image"), state)
        chat.answer(conv=state, img_list=images, max_new_tokens=1000, num_beams=1, temperature=1.0)
    image_prompts = prompts[image_prompts_from:]
    del prompts[image_prompts_from:]

    path = common.write_fixture(
        "videochat",
        args.repo,
        {
            "seed_code": "video_chat/conversation.py Chat.upload_video (133-150), upload_img (152-173), "
            "load_video (95-131), "
            "ask (56-58), answer (60-85), get_context_emb (175-193), get_prompt (26-33); demo.py 41-46",
            "tokenizer": "slow LlamaTokenizer (use_fast=False) of prompt.tokenizer-slow",
            "turns": TURNS,
            "media": [{"modality": "video", "frame_indices": indices, "fps": FPS, "tokens": QUERY_TOKENS}],
            "video_message": message,
            "prompts": prompts,
            "image_prompts": image_prompts,
            "bos_token_id": tokenizer.bos_token_id,
        },
        sys.argv,
    )
    sys.stdout.write(f"wrote {path}: prompts of {[len(p) for p in prompts]} positions\n")


if __name__ == "__main__":
    main()
