"""E.T. Chat's prompt ids and `<vid>` frames on a two-turn conversation about a video.

Runs E.T. Chat's own code (ETBench `etchat/`): the tokenizer as its training loads it
(`train/train.py` lines 444-455: `AutoTokenizer.from_pretrained(..., add_prefix_space=False,
legacy=False, use_fast=True)` then `add_special_tokens(additional_special_tokens=['<vid>'])`)
and saves it into the released folder (`train/etchat_trainer.py` line 215), loaded back as
inference does (`model/builder.py` line 19); the prompt of `conversation.py` (`get_conv('phi3')`,
as `eval/infer_etbench.py` lines 60-63, with an earlier turn and its reply); the ids of
`utils/tokenization.py::tokenize`; and `ETChatMetaForCausalLM.prepare_multimodal_data`
(`model/etchat_arch.py`) with an embedding table that returns ids as values and a 6-frame
video whose frame f embeds as (f + 1) * 100000, so each `<vid>`'s embedding tells which frame
E.T. Chat added to it for its `src` time. The base tokenizer is a Phi-3-mini-style folder built
here (see `_prompt_common.phi3_folder`). Needs transformers >= 4.40 (E.T. Chat ran 4.44.2):

    PYTHONPATH=/work/scratch/overlay-prompt-444 /work/scratch/venv/bin/python \\
        scripts/parity/etchat_prompt.py --repo /path/to/ETBench

Writes into tests/fixtures/parity/etchat/: prompt.json and prompt.tokenizer/ (the released
folder's tokenizer files).
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
    {"video": 0, "text": "What happens between <vid> and <vid>?", "reply": "A red circle moves to the left."},
    {"text": "Is it still there at <vid>?", "reply": "Yes."},
]
SRC = [2.5, 3.5, 7.0]  # seconds of the <vid> tokens in order (E.T. Bench's `src`)
FRAMES = 6  # 1 fps from 0 s: frame f at f seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, required=True, help="an ETBench checkout")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(args.repo))
    from etchat.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_MATCH_TOKEN, IMAGE_TOKEN_INDEX
    from etchat.conversation import get_conv
    from etchat.utils.tokenization import tokenize

    common.package("etchat.model", args.repo / "etchat" / "model")  # its __init__ builds the model
    common.stub("etchat.model.qformer", BertConfig=object, BertLMHeadModel=object)
    common.package("etchat.model.vision_encoder", args.repo / "etchat" / "model" / "vision_encoder")
    common.stub("etchat.model.vision_encoder.builder", build_vision_tower=None)
    arch = common.load_module("etchat.model.etchat_arch", args.repo / "etchat" / "model" / "etchat_arch.py")

    out = common.out_dir("etchat")
    released = common.fresh(out / "prompt.tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = common.phi3_folder(work / "phi3-mini", common.spm_model(work), work)
        training = AutoTokenizer.from_pretrained(  # train.py 444-449, the stage scripts' flags
            str(base), model_max_length=2048, add_prefix_space=False, legacy=False, use_fast=True
        )
        if training.pad_token is None:
            training.pad_token = training.eos_token
        training.add_special_tokens({"additional_special_tokens": [DEFAULT_MATCH_TOKEN]})  # 455
        training.save_pretrained(str(released))  # etchat_trainer.py 215
    tokenizer = AutoTokenizer.from_pretrained(str(released))  # builder.py 19
    match_id = tokenizer.convert_tokens_to_ids(DEFAULT_MATCH_TOKEN)

    conv = get_conv("phi3")
    first, second = TURNS
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + first["text"])  # infer_etbench.py 61
    conv.append_message(conv.roles[1], first["reply"])
    conv.append_message(conv.roles[0], second["text"])
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenize(prompt, tokenizer)  # utils/tokenization.py, as infer_etbench.py 71

    frames = torch.arange(1, FRAMES + 1, dtype=torch.float64)[:, None] * common.FRAME_SCALE  # (T, 1)
    fake = SimpleNamespace(
        config=SimpleNamespace(use_matching=True, match_token_id=match_id),
        model=SimpleNamespace(embed_tokens=common.id_embedding()),
        device="cpu",
        encode_image=lambda image, **_: [frames[None]],  # per sample: (images, T, D)
    )
    _, _, embeds, _ = arch.ETChatMetaForCausalLM.prepare_multimodal_data(
        fake,
        input_ids[None],
        None,
        None,
        None,
        [torch.zeros(FRAMES)],
        [[first["text"]]],
        [SRC],
        None,
        "caching",
    )
    values = common.decode(embeds)
    expanded, time_frames = [], []
    for position, value in enumerate(values):
        frame = value // int(common.FRAME_SCALE) - 1
        token = value % int(common.FRAME_SCALE)
        if token == 0:  # a frame of the video: the marker of item 0
            expanded.append(-1)
            continue
        expanded.append(token)
        if frame >= 0:
            time_frames.append([position, frame])

    path = common.write_fixture(
        "etchat",
        args.repo,
        {
            "seed_code": "etchat/train/train.py 444-455 (tokenizer), etchat_trainer.py 215, model/builder.py "
            "19, conversation.py get_conv/get_prompt, eval/infer_etbench.py 60-71, utils/tokenization.py "
            "tokenize, model/etchat_arch.py prepare_multimodal_data (192-339)",
            "tokenizer": "the released folder prompt.tokenizer (fast, add_prefix_space false, <vid> added)",
            "turns": TURNS,
            "src": SRC,
            "media": [{"modality": "video", "frames": FRAMES, "times": [float(f) for f in range(FRAMES)]}],
            "prompt_text": prompt,
            "ids": [int(i) for i in input_ids.tolist()],
            "image_token_index": IMAGE_TOKEN_INDEX,
            "match_token_id": match_id,
            "expanded": expanded,
            "time_frames": time_frames,
        },
        sys.argv,
    )
    sys.stdout.write(
        f"wrote {path}: {len(input_ids)} ids, {len(expanded)} positions, <vid> frames {time_frames}\n"
    )


if __name__ == "__main__":
    main()
