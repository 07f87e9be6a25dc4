"""Incremental detokenization (multi-byte characters) and stop strings across token boundaries."""

from __future__ import annotations

from typing import Any

import pytest

from services.llm.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher, Strip

MULTIBYTE = "héllo 日本 ✓ and 🙂!"


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stream(tokenizer: Any, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [])
    deltas = [detok.add(i) for i in ids]
    return [*deltas, detok.flush()]


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, MULTIBYTE)
    assert len(ids) > len(MULTIBYTE)  # byte-level BPE splits some characters across tokens
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == MULTIBYTE
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert deltas[-1] == ""  # nothing left over at the end
    assert sum(1 for d in deltas if d == "") > 1  # some tokens were held back


def test_prompt_context_keeps_leading_space(tokenizer: Any) -> None:
    prompt = ids_of(tokenizer, "USER: hi ASSISTANT:")
    deltas = stream(tokenizer, ids_of(tokenizer, " a big cat"), prompt)
    assert "".join(deltas) == " a big cat"


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    ids = [*ids_of(tokenizer, "one"), tokenizer.pad_token_id, *ids_of(tokenizer, " two")]
    assert "".join(stream(tokenizer, ids)) == "one two"


def test_incomplete_character_is_flushed_at_the_end(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "ok 日")
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add(i) for i in ids[:-1])
    assert text == "ok "
    assert detok.flush() == REPLACEMENT_CHAR  # the truncated character, once, at the end


def feed_all(matcher: StopMatcher, deltas: list[str]) -> str:
    out = "".join(matcher.feed(d) for d in deltas)
    return out if matcher.matched else out + matcher.flush()


@pytest.mark.parametrize(
    ("deltas", "stops", "text", "matched"),
    [
        (["Hello", " wor", "ld"], ["o w"], "Hell", "o w"),
        (["ab", "c"], ["bc"], "a", "bc"),
        (["ab", "d"], ["bc"], "abd", None),
        (["STOP", "rest"], ["STOP"], "", "STOP"),
        (["x", "y", "z"], ["yz", "xyz"], "", "xyz"),  # earliest occurrence wins
        (["one. two"], [".", "one"], "", "one"),
        (["a</", "s", ">b"], ["</s>"], "a", "</s>"),
        (["no stops"], [], "no stops", None),
    ],
)
def test_stop_matcher(deltas: list[str], stops: list[str], text: str, matched: str | None) -> None:
    matcher = StopMatcher(stops)
    assert feed_all(matcher, deltas) == text
    assert matcher.matched == matched


def test_partial_stop_is_held_back_until_decided() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the E") == "the "
    assert matcher.feed("N") == ""
    assert matcher.feed("D!") == ""
    assert matcher.matched == "END"
    assert matcher.feed("more") == ""


def test_held_back_text_is_released_when_it_diverges() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == "the "
    assert matcher.feed("ding") == "ENding"
    assert matcher.flush() == ""


def test_stop_string_spanning_tokens(tokenizer: Any) -> None:
    text = "What is the colour of the square? ASSISTANT: It is red."
    ids = ids_of(tokenizer, text)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopMatcher(["ASSISTANT: It"])
    out = ""
    for i in ids:
        out += matcher.feed(detok.add(i))
        if matcher.matched:
            break
    assert out == "What is the colour of the square? "
    assert matcher.matched == "ASSISTANT: It"


def test_include_keeps_the_stop_string_and_drops_what_follows() -> None:
    matcher = StopMatcher(["###"], include=True)
    assert feed_all(matcher, ["answer ##", "# Human: more"]) == "answer ###"
    assert matcher.matched == "###"


@pytest.mark.parametrize(
    ("deltas", "text"),
    [
        ([" \n The", " cat ", "\n", " sat.", " \n"], "The cat \n sat."),
        (["  ", " ", "x"], "x"),
        (["  ", "\n"], ""),
        (["a", " ", "b  "], "a b"),
    ],
)
def test_strip_gives_what_str_strip_gives_to_the_whole_text(deltas: list[str], text: str) -> None:
    strip = Strip(enabled=True)
    emitted = [strip.feed(strip.lead(d)) for d in deltas]
    out = "".join(emitted) + strip.finish("")
    assert out == text == "".join(deltas).strip()
    sent = ""
    for piece in emitted:  # nothing sent is taken back: no leading or held trailing whitespace
        sent += piece
        assert sent == sent.lstrip() and (not sent or not sent[-1].isspace())


def test_strip_disabled_passes_everything_through() -> None:
    strip = Strip(enabled=False)
    assert strip.feed(strip.lead(" a ")) + strip.finish(" \n") == " a  \n"
    assert strip.pending == ""
