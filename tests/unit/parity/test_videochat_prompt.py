"""VideoChat's demo prompt: the `videochat` preset builds the ids VideoChat's own demo built.

The fixture (scripts/parity/videochat_prompt.py) holds the ids of `conversation.py`'s
`Chat.upload_video` / `ask` / `answer` / `get_context_emb` for two turns about an 8-frame
video (its 96 query tokens, its "The video contains 8 frames sampled at ..." message), and
about an image (`upload_img`: "<Image><ImageHere></Image>\n"), with the slow LlamaTokenizer of
transformers 4.29; we load the same tokenizer files (slow and fast) and serve the same turns
with the video's frame times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
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

SEED = fixture("videochat")


def video() -> MediaPart[MediaFeatures[Any]]:
    """The seed's video: its sampled frames and their times."""
    seed = SEED["media"][0]
    times = [i / seed["fps"] for i in seed["frame_indices"]]
    return item("video", len(times), times)


def conversation(rounds: int, media: MediaPart[MediaFeatures[Any]] | None = None) -> list[Turn]:
    first, second = SEED["turns"]
    turns = [Turn("user", [media or video(), TextPart(first["text"])])]
    if rounds == 2:
        turns += [Turn("assistant", [TextPart(first["reply"])]), Turn("user", [TextPart(second["text"])])]
    return turns


@pytest.mark.parametrize("folder", ["prompt.tokenizer-slow", "prompt.tokenizer-fast"])
@pytest.mark.parametrize("rounds", [1, 2])
def test_videochat_preset_builds_the_seed_demo_prompt(tmp_path: Path, folder: str, rounds: int) -> None:
    preset = real_preset("videochat", tmp_path)
    tokenizer = tokenizer_for(preset, FIXTURES / "videochat" / folder, tmp_path)
    tokens = SEED["media"][0]["tokens"]
    prompt = served_prompt(preset, tokenizer, conversation(rounds), lambda m, f: tokens)
    got, want = marked(prompt), SEED["prompts"][rounds - 1]
    assert got == want, f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"


@pytest.mark.parametrize("rounds", [1, 2])
def test_videochat_preset_builds_the_seed_image_prompt(tmp_path: Path, rounds: int) -> None:
    preset = real_preset("videochat", tmp_path)
    tokenizer = tokenizer_for(preset, FIXTURES / "videochat" / "prompt.tokenizer-slow", tmp_path)
    turns = [
        Turn(
            t.role,
            [TextPart(p.text.replace("video", "image")) if isinstance(p, TextPart) else p for p in t.parts],
        )
        for t in conversation(rounds, item("image"))
    ]
    tokens = SEED["media"][0]["tokens"]
    prompt = served_prompt(preset, tokenizer, turns, lambda m, f: tokens)
    got, want = marked(prompt), SEED["image_prompts"][rounds - 1]
    assert got == want, f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"
