"""Tokenizer loading: slow-only SentencePiece folders without sentencepiece, the dummy prefix.

The folders are the parity fixtures' Vicuna-style ones (a 600-piece SentencePiece BPE model,
tests/fixtures/parity/pandagpt): `prompt.tokenizer-slow` holds only tokenizer.model and its
configs, `prompt.tokenizer-fast` the tokenizer.json transformers 4.29 converted from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import FailedPreconditionError
from services.models.lm.tokenizer import load_tokenizer, sentencepiece_tokenizer_json, set_dummy_prefix

FOLDERS = Path(__file__).resolve().parents[4] / "fixtures" / "parity" / "pandagpt"
SLOW, FAST = FOLDERS / "prompt.tokenizer-slow", FOLDERS / "prompt.tokenizer-fast"
TEXTS = ["### Human: hi</s>USER: x", " two  spaces\nand a newline", "digits 2024 and é 中", "</s>"]


def pieces(tokenizer: Any, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("mode", ["every_run", "first_run", "none"])
def test_a_slow_only_folder_loads_as_its_fast_conversion(mode: str) -> None:
    assert not (SLOW / "tokenizer.json").exists()
    slow, fast = load_tokenizer(SLOW, dummy_prefix=mode), load_tokenizer(FAST, dummy_prefix=mode)
    assert [slow.bos_token_id, slow.eos_token_id, slow.unk_token_id] == [1, 2, 0]
    for text in TEXTS:
        assert slow(text)["input_ids"] == fast(text)["input_ids"], text


def test_dummy_prefix_modes_mark_runs_after_special_tokens_or_not() -> None:
    every, first, none = (load_tokenizer(FAST, dummy_prefix=m) for m in ("every_run", "first_run", "none"))
    # transformers 4.29's slow tokenizer: "▁" before every run, also after "</s>"
    assert pieces(every, "hi</s>USER")[-2:] == ["</s>", "\u2581USER"]
    assert pieces(first, "hi</s>USER")[0] == "\u2581h" and pieces(first, "hi</s>USER")[-1] != "\u2581USER"
    assert not pieces(none, "hi")[0].startswith("\u2581")
    # a text starting with a space gets "▁" twice under every_run, as SentencePiece writes it
    assert pieces(every, " Human")[:2] == ["\u2581", "\u2581Human"]


def test_a_byte_level_tokenizer_is_left_as_it_is(loaded: Any) -> None:
    tokenizer = loaded.tokenizer
    before = tokenizer("a b</s>c", add_special_tokens=False)["input_ids"]
    assert set_dummy_prefix(tokenizer, "every_run") is False
    assert tokenizer("a b</s>c", add_special_tokens=False)["input_ids"] == before


def test_a_model_that_is_not_sentencepiece_bpe_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(SLOW, folder)
    (folder / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(FailedPreconditionError, match=r"bad/tokenizer.model: .*SentencePiece"):
        load_tokenizer(folder)
    with pytest.raises(FailedPreconditionError, match=r"tokenizer\.model"):
        sentencepiece_tokenizer_json(folder / "tokenizer.model")
