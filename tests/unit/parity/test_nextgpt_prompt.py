"""Legacy NExT-GPT's inference prompt: the `nextgpt` preset serves the ids its demo built.

The fixture (scripts/parity/nextgpt_prompt.py) holds the ids of legacy NExT-GPT's Gradio demo
(`demo_app.py::predict` + `prepare_generation_embedding`: the text split around the media, a
BOS before every text segment) for two turns, the first with an image, and for one turn whose
segment holds two images (summed into one token), with the slow LlamaTokenizer of
transformers 4.29 and the tokens the seed adds. We load the same base tokenizer files (slow and
fast), add the preset's tokens as `modalmesh add-tokens` does, and serve the same turns with
the preset's `inference_template: nextgpt_demo`, `media_combine: sum_per_modality` and
`dummy_prefix: every_run`. The fixture also holds the seed tokenizer's ids of texts around
the added tokens (training writes "</Img> " + question): without `every_run` (transformers 5's
default) the word after "</Img>" loses its "▁".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.content import TextPart, Turn
from services.common.presets import Preset
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

SEED = fixture("nextgpt")
FOLDERS = ["prompt.tokenizer-slow", "prompt.tokenizer-fast"]


def conversation(rounds: int) -> list[Turn]:
    first, second = SEED["turns"]
    turns = [Turn("user", [*(item(m["modality"]) for m in SEED["media"]), TextPart(first["text"])])]
    if rounds == 2:
        turns += [Turn("assistant", [TextPart(first["reply"])]), Turn("user", [TextPart(second["text"])])]
    return turns


def ids(preset: Preset, folder: str, tmp_path: Path, turns: list[Turn]) -> tuple[list[int], list[int]]:
    tokenizer = tokenizer_for(preset, FIXTURES / "nextgpt" / folder, tmp_path, add=preset.llm.added_tokens)
    prompt = served_prompt(preset, tokenizer, turns, lambda m, f: 1)
    return marked(prompt), tokenizer


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("rounds", [1, 2])
def test_nextgpt_preset_serves_the_seed_demo_prompt(tmp_path: Path, folder: str, rounds: int) -> None:
    preset = real_preset("nextgpt", tmp_path)
    got, tokenizer = ids(preset, folder, tmp_path, conversation(rounds))
    want = SEED["prompts"][rounds - 1]
    assert got == want, f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"
    assert got.count(SEED["bos_token_id"]) == 2  # a BOS before each text segment


@pytest.mark.parametrize("folder", FOLDERS)
def test_two_images_of_one_turn_are_summed_into_one_token(tmp_path: Path, folder: str) -> None:
    preset = real_preset("nextgpt", tmp_path)
    summed = SEED["sum"]
    turns = [Turn("user", [*(item(m["modality"]) for m in summed["media"]), TextPart(summed["text"])])]
    got, tokenizer = ids(preset, folder, tmp_path, turns)
    assert got == summed["prompt"], (
        f"\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, summed['prompt'])}"
    )


@pytest.mark.parametrize("folder", FOLDERS)
def test_text_after_added_tokens_tokenizes_as_the_seed(tmp_path: Path, folder: str) -> None:
    preset = real_preset("nextgpt", tmp_path)
    tokenizer = tokenizer_for(preset, FIXTURES / "nextgpt" / folder, tmp_path, add=preset.llm.added_tokens)
    for text, want in SEED["texts"]:
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == want, f"{text!r}\nours: {pieces(tokenizer, got)}\nseed: {pieces(tokenizer, want)}"


def test_transformers_5_default_drops_the_mark_after_img(tmp_path: Path) -> None:
    preset = real_preset("nextgpt", tmp_path)
    plain = preset.model_copy(update={"llm": preset.llm.model_copy(update={"dummy_prefix": None})})
    tokenizer = tokenizer_for(plain, FIXTURES / "nextgpt" / FOLDERS[1], tmp_path, add=preset.llm.added_tokens)
    text, want = SEED["texts"][1]  # "</Img> What ..."
    got = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got != want and got[0] == want[0] and tokenizer.convert_ids_to_tokens(want[1]) == "\u2581"


def test_the_training_form_stays_available(tmp_path: Path) -> None:
    preset = real_preset("nextgpt", tmp_path)
    training = preset.model_copy(update={"llm": preset.llm.model_copy(update={"inference_template": None})})
    got, _ = ids(training, FOLDERS[0], tmp_path, conversation(1))
    assert got.count(SEED["bos_token_id"]) == 1 and got != SEED["prompts"][0]
