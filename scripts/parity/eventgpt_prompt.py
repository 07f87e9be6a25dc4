"""EventGPT's prompt ids on a two-turn conversation about an event stream.

Runs EventGPT's own code: `dataset/conversation.py` (`conv_templates['eventgpt_v1']`, the
user message of `prepare_event_prompt`: "<ev_start><event><ev_end>\\n" + query, an earlier
turn and its reply) and `common/common.py::tokenizer_event_token`, with the tokenizer as
`inference.py` loads it (lines 29-39: `AutoTokenizer.from_pretrained(path, use_fast=False)`, then
`<ev_patch>` added as a special token, and `<ev_start>`/`<ev_end>` too when the config has
`mm_use_im_start_end`). The base tokenizer is a Vicuna-v1.5-style slow folder built here
(`legacy: false` in its tokenizer_config, as Vicuna-7B v1.5 and LLaVA-1.5 save it). Both
variants (start/end plain text, and added tokens) are recorded. EventGPT ran transformers
4.37.2 and tokenizers 0.15.2:

    PYTHONPATH=/work/scratch/overlay-prompt-437 /work/scratch/venv/bin/python \\
        scripts/parity/eventgpt_prompt.py --repo /path/to/EventGPT

Writes into tests/fixtures/parity/eventgpt/: prompt.json, prompt.tokenizer-slow/ and
prompt.tokenizer-fast/ (converted by transformers 4.37).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompt_common as common

TURNS = [
    {"event": 0, "text": "What is moving in the scene?", "reply": "A red circle moves to the left."},
    {"text": "Describe it more.", "reply": "It is round and bright red."},
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, required=True, help="an EventGPT checkout")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    sys.path.insert(0, str(args.repo))
    from common.common import tokenizer_event_token
    from dataset.constants import (
        DEFAULT_EV_END_TOKEN,
        DEFAULT_EV_START_TOKEN,
        DEFAULT_EVENT_PATCH_TOKEN,
        DEFAULT_EVENT_TOKEN,
        EVENT_TOKEN_INDEX,
    )
    from dataset.conversation import conv_templates

    out = common.out_dir("eventgpt")
    with tempfile.TemporaryDirectory() as tmp:
        model = common.spm_model(Path(tmp))
    slow = common.llama_slow_folder(
        common.fresh(out / "prompt.tokenizer-slow"), model, legacy=False, pad_token=None, padding_side="right"
    )
    common.fast_from_slow(slow, common.fresh(out / "prompt.tokenizer-fast"))

    first, second = TURNS
    conv = conv_templates["eventgpt_v1"].copy()
    start_event_end = DEFAULT_EV_START_TOKEN + DEFAULT_EVENT_TOKEN + DEFAULT_EV_END_TOKEN
    conv.append_message(conv.roles[0], start_event_end + "\n" + first["text"])  # prepare_event_prompt
    conv.append_message(conv.roles[1], first["reply"])
    conv.append_message(conv.roles[0], second["text"])
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()

    variants = {}
    for name, start_end in (("plain", False), ("start_end", True)):
        tokenizer = AutoTokenizer.from_pretrained(str(slow), use_fast=False)  # inference.py 29
        tokenizer.add_tokens([DEFAULT_EVENT_PATCH_TOKEN], special_tokens=True)  # 35-36
        if start_end:
            tokenizer.add_tokens([DEFAULT_EV_START_TOKEN, DEFAULT_EV_END_TOKEN], special_tokens=True)  # 37-38
        ids = tokenizer_event_token(prompt, tokenizer, EVENT_TOKEN_INDEX)
        variants[name] = {
            "mm_use_im_start_end": start_end,
            "added_tokens": list(tokenizer.get_added_vocab()),
            "ids": [-1 if i == EVENT_TOKEN_INDEX else int(i) for i in ids],
        }

    path = common.write_fixture(
        "eventgpt",
        args.repo,
        {
            "seed_code": "inference.py 29-39 (tokenizer), dataset/conversation.py conv_eventgpt_v1 + "
            "get_prompt + prepare_event_prompt (229-237), common/common.py tokenizer_event_token (43-62)",
            "tokenizer": "slow LlamaTokenizer (use_fast=False) of prompt.tokenizer-slow, legacy false",
            "turns": TURNS,
            "media": [{"modality": "event", "tokens": 582}],
            "prompt_text": prompt,
            "variants": variants,
        },
        sys.argv,
    )
    sizes = ", ".join(f"{name} {len(v['ids'])} ids" for name, v in variants.items())
    sys.stdout.write(f"wrote {path}: {sizes}\n")


if __name__ == "__main__":
    main()
