"""EventGPT's prompt: the `eventgpt` preset builds the ids EventGPT's own code built.

The fixture (scripts/parity/eventgpt_prompt.py) holds the ids of EventGPT's `eventgpt_v1`
conversation + `tokenizer_event_token` for two turns about an event stream, with the slow
LlamaTokenizer of transformers 4.37 (`legacy: false`: "▁" only at the start of each chunk, so
"</s>USER:" has none), `<ev_start>`/`<ev_end>` as plain text and, as a checkpoint with
`mm_use_im_start_end` has them, as added special tokens. We load the same tokenizer files
(slow and fast) with the preset's `dummy_prefix: first_run` and serve the same turns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.content import TextPart, Turn
from tests.helpers.prompt_parity import (
    FIXTURES,
    fixture,
    item,
    marked,
    pieces,
    real_preset,
    served_prompt,
    tokenizer_for,
)

SEED = fixture("eventgpt")


def conversation() -> list[Turn]:
    first, second = SEED["turns"]
    return [
        Turn("user", [item("event", 5), TextPart(first["text"])]),
        Turn("assistant", [TextPart(first["reply"])]),
        Turn("user", [TextPart(second["text"])]),
    ]


@pytest.mark.parametrize("folder", ["prompt.tokenizer-slow", "prompt.tokenizer-fast"])
@pytest.mark.parametrize("variant", ["plain", "start_end"])
def test_eventgpt_preset_builds_the_seed_prompt(tmp_path: Path, folder: str, variant: str) -> None:
    preset = real_preset("eventgpt", tmp_path)
    seed = SEED["variants"][variant]
    added = [t for t in seed["added_tokens"] if t not in ("<s>", "</s>", "<unk>")]
    tokenizer = tokenizer_for(preset, FIXTURES / "eventgpt" / folder, tmp_path, add=added, special=True)
    tokens = SEED["media"][0]["tokens"]
    prompt = served_prompt(preset, tokenizer, conversation(), lambda m, f: tokens)
    got = [t for i, t in enumerate(marked(prompt)) if t >= 0 or i == prompt.media_spans[0][0]]
    want = seed["ids"]  # the seed's one -200 sentinel where its 582 event tokens go
    assert got == want, f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"
