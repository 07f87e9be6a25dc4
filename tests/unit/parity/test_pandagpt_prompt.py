"""PandaGPT's demo prompt: the `pandagpt` preset builds the ids PandaGPT's own code built.

The fixture (scripts/parity/pandagpt_prompt.py) holds the ids of `web_demo.py::predict` +
`openllama.py::prepare_generation_embedding` for a two-turn conversation whose first turn
holds an image and an audio clip (summed into one token, `extract_multimodal_feature`), with
the slow LlamaTokenizer of transformers 4.29; we load the same tokenizer files (the slow
folder, and the fast one converted from it) and serve the same conversation.
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

SEED = fixture("pandagpt")


def conversation(rounds: int) -> list[Turn]:
    first, second = SEED["turns"]
    turns = [Turn("user", [*(item(m["modality"]) for m in SEED["media"]), TextPart(first["text"])])]
    if rounds == 2:
        turns += [Turn("assistant", [TextPart(first["reply"])]), Turn("user", [TextPart(second["text"])])]
    return turns


@pytest.mark.parametrize("folder", ["prompt.tokenizer-slow", "prompt.tokenizer-fast"])
@pytest.mark.parametrize("rounds", [1, 2])
def test_pandagpt_preset_builds_the_seed_demo_prompt(tmp_path: Path, folder: str, rounds: int) -> None:
    preset = real_preset("pandagpt", tmp_path)
    tokenizer = tokenizer_for(preset, FIXTURES / "pandagpt" / folder, tmp_path)
    prompt = served_prompt(preset, tokenizer, conversation(rounds), lambda m, f: 1)
    got, want = marked(prompt), SEED["prompts"][rounds - 1]
    assert got == want, f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"
    assert prompt.media_spans[0] == prompt.media_spans[1]  # image + audio summed into one token
