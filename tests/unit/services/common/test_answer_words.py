"""The word rule shared by the shapes scorer of services.eval and services.trainer.synth."""

from __future__ import annotations

import pytest

from services.common.answer_words import names_only, reply_words, shapes_correct

COLORS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
RED_CIRCLE = {"color": "red", "shape": "circle"}


def test_reply_words_are_lowercased_letter_runs() -> None:
    assert reply_words("A Red-circle, on 2 white!") == {"a", "red", "circle", "on", "white"}


@pytest.mark.parametrize(
    ("words", "expected"),
    [({"red", "shape"}, True), ({"red", "blue"}, False), ({"blue"}, False), ({"redish"}, False)],
)
def test_names_only(words: set[str], expected: bool) -> None:
    assert names_only(words, "red", COLORS) is expected


@pytest.mark.parametrize(
    ("reply", "kind", "expected"),
    [
        ("It is red.", "color", True),
        ("It is red or blue.", "color", False),
        ("It is red on a white background.", "color", True),  # white is no shape colour
        ("A blue circle.", "shape", True),  # a shape question ignores the colour
        ("A circle or a square.", "shape", False),
        ("A red circle.", "describe", True),
        ("A red square.", "describe", False),
        ("A circle.", "describe", False),
        ("", "color", False),
    ],
)
def test_shapes_correct(reply: str, kind: str, expected: bool) -> None:
    assert shapes_correct(reply, kind, RED_CIRCLE, COLORS, SHAPES) is expected
