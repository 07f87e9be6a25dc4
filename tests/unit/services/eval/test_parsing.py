"""Reading timestamps, spans and option letters out of replies; every expected value is
written by hand."""

from __future__ import annotations

import pytest

from services.eval.parsing import (
    AMBIGUOUS_LETTER,
    EMPTY_REPLY,
    LETTER_OUT_OF_RANGE,
    NO_LETTER,
    NO_TIMESTAMPS,
    contains_tokens,
    etbench_letter,
    llava_letter,
    normalize_answer,
    parse_point,
    parse_spans,
    to_seconds,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("12.5", 12.5), ("12.", 12.0), ("1:05", 65.0), ("1:00:05", 3605.0), ("0:01:05.5", 65.5)],
)
def test_to_seconds(text: str, seconds: float) -> None:
    assert to_seconds(text) == seconds


@pytest.mark.parametrize(
    ("reply", "spans"),
    [
        ("The event happens in 12.0 - 18.5 seconds.", [(12.0, 18.5)]),
        ("from 3s to 5s", [(3.0, 5.0)]),
        ("3.0 seconds - 5.0 seconds", [(3.0, 5.0)]),
        ("1:05\u20131:30", [(65.0, 90.0)]),
        ("0 \u2014 4 and 6 ~ 8", [(0.0, 4.0), (6.0, 8.0)]),
        ("between 3 and 5.5 seconds", [(3.0, 5.5)]),
        ("7 - 3, then 10.5 to 12", [(3.0, 7.0), (10.5, 12.0)]),  # reversed span ordered
        ("It starts at 3.5 seconds and ends at 7.", [(3.5, 7.0)]),
        ("Begins 2, finishes 4. Starts 10 and stops 12", [(2.0, 4.0), (10.0, 12.0)]),
        ("0 - 0", [(0.0, 0.0)]),  # zero-length span kept
        ("1 - 2, 1 - 2", [(1.0, 2.0), (1.0, 2.0)]),  # duplicates kept
    ],
)
def test_parse_spans(reply: str, spans: list[tuple[float, float]]) -> None:
    parsed = parse_spans(reply)
    assert parsed.ok
    assert parsed.value == spans


@pytest.mark.parametrize("reply", ["", "I cannot tell.", "at 5 seconds", "It ends at 7."])
def test_parse_spans_none(reply: str) -> None:
    parsed = parse_spans(reply)
    assert not parsed.ok
    assert parsed.value is None
    assert parsed.reason == NO_TIMESTAMPS


def test_parse_point() -> None:
    assert parse_point("The highlight is at 12.5 seconds.").value == 12.5
    assert parse_point("around 1:05, then 3").value == 65.0
    assert parse_point("none").reason == NO_TIMESTAMPS
    assert parse_point("").reason == NO_TIMESTAMPS


@pytest.mark.parametrize(
    ("reply", "n_options", "index"),
    [
        ("A) walking", 4, 0),  # E.T. Chat's reply after "Best Option: ("
        ("b", 4, 1),
        ("C.", 4, 2),
        ("  d, the last one", 4, 3),
        ("Best Option: (B) eating", 4, 1),
        ("The man is (C) running", 4, 2),  # the first "(X)" anywhere decides
        ("(c) x (a)", 4, 2),
        ("a man walks", 4, 0),  # the official rule reads the article as option A
        ("E) five", 5, 4),
    ],
)
def test_etbench_letter(reply: str, n_options: int, index: int) -> None:
    assert etbench_letter(reply, n_options).value == index


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", EMPTY_REPLY),
        ("  (  ", EMPTY_REPLY),
        ("He walks", NO_LETTER),
        ("1. first", NO_LETTER),
        ("the answer is (E)", NO_LETTER),  # (E) is not one of four options; rule 2 finds none
        ("e) none", LETTER_OUT_OF_RANGE),
    ],
)
def test_etbench_letter_unreadable(reply: str, reason: str) -> None:
    parsed = etbench_letter(reply, 4)
    assert parsed.value is None
    assert parsed.reason == reason


@pytest.mark.parametrize(
    ("reply", "index"),
    [("B", 1), (" C \n", 2), ("D. a dog", 3), ("The answer is A.", 0), ("The answer is (B)", 1)],
)
def test_llava_letter(reply: str, index: int) -> None:
    assert llava_letter(reply, 4).value == index


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", EMPTY_REPLY),
        ("b", NO_LETTER),  # LLaVA's letters are upper case
        ("B) dog", NO_LETTER),
        ("The answer is Apple", NO_LETTER),
        ("The answer is B. The answer is C.", AMBIGUOUS_LETTER),
        ("E", LETTER_OUT_OF_RANGE),
    ],
)
def test_llava_letter_unreadable(reply: str, reason: str) -> None:
    assert llava_letter(reply, 4).reason == reason


def test_llava_letter_same_letter_twice_is_not_ambiguous() -> None:
    assert llava_letter("The answer is B. Yes, the answer is B.", 4).value == 1


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Cat's hat.", "cats hat"),
        ("  Red\tCAR!! ", "red car"),
        ("an apple, a pear", "apple pear"),
        ("Théâtre", "théâtre"),
        ("\uff21\uff22", "ab"),  # full-width letters, NFKC
        ("...", ""),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_contains_tokens_whole_words() -> None:
    assert contains_tokens("red car parked", "red car")
    assert contains_tokens("red car", "red car")
    assert not contains_tokens("cartoon", "car")
    assert not contains_tokens("car red", "red car")
    assert not contains_tokens("anything", "")
