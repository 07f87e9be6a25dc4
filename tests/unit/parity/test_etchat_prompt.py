"""E.T. Chat's prompt and `<vid>` frames: the `etchat` preset builds what E.T. Chat built.

The fixture (scripts/parity/etchat_prompt.py) holds, for two turns about a 6-frame video whose
questions hold three `<vid>` with E.T. Bench `src` times 2.5, 3.5 and 7.0 s: the ids of E.T.
Chat's `conversation.py` + `utils/tokenization.py::tokenize` with the tokenizer its training
saves into a release (no BOS, no dummy prefix, `<vid>` a special token), and which frame
`prepare_multimodal_data` adds to each `<vid>` embedding (round half to even, clamped). We load
the same tokenizer files and serve the same turns with time parts.
"""

from __future__ import annotations

from pathlib import Path

from services.common.content import Part, TextPart, TimePart, Turn
from services.common.presets import Preset
from services.models.lm.timestamps import source_frames
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

SEED = fixture("etchat")
TOKEN = "<vid>"


def user(text: str, times: list[float], media: bool = False) -> Turn:
    """A user turn with the seed question's <vid> tokens as time parts, in order."""
    video = SEED["media"][0]
    parts: list[Part] = [item("video", video["frames"], video["times"])] if media else []
    chunks = text.split(TOKEN)
    for i, chunk in enumerate(chunks):
        if chunk:
            parts.append(TextPart(chunk))
        if i < len(chunks) - 1:
            parts.append(TimePart(times.pop(0)))
    return Turn("user", parts)


def conversation() -> list[Turn]:
    first, second = SEED["turns"]
    times = list(SEED["src"])
    return [
        user(first["text"], times, media=True),
        Turn("assistant", [TextPart(first["reply"])]),
        user(second["text"], times),
    ]


def etchat(tmp_path: Path) -> tuple[Preset, object]:
    preset = real_preset("etchat", tmp_path)
    return preset, tokenizer_for(preset, FIXTURES / "etchat" / "prompt.tokenizer", tmp_path)


def test_etchat_preset_builds_the_seed_prompt_without_bos_or_dummy_prefix(tmp_path: Path) -> None:
    preset, tokenizer = etchat(tmp_path)
    prompt = served_prompt(preset, tokenizer, conversation(), lambda m, f: f)
    got, want = marked(prompt), SEED["expanded"]
    assert got == want, f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"
    assert [p for p, _ in prompt.time_tokens] == [p for p, _ in SEED["time_frames"]]


def test_each_time_part_adds_the_frame_the_seed_adds(tmp_path: Path) -> None:
    preset, tokenizer = etchat(tmp_path)
    video = SEED["media"][0]
    prompt = served_prompt(preset, tokenizer, conversation(), lambda m, f: f)
    chosen = source_frames(prompt.time_tokens, prompt.media_spans, [video["times"]])
    assert [[pos, frame] for pos, _, frame in chosen] == SEED["time_frames"]
    assert [s for _, s in prompt.time_tokens] == SEED["src"]
