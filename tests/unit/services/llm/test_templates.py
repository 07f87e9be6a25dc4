"""Conversation templates: golden renderings, part joining, role validation."""

from __future__ import annotations

import typing

import pytest

from services.common.errors import InvalidArgumentError
from services.common.presets import TemplateName
from services.llm.domain import MediaPart, TextPart, Turn
from services.llm.templates import (
    LLAVA_SYSTEM,
    TEMPLATES,
    VICUNA_SYSTEM,
    MediaRef,
    get_template,
    merge_text,
)

VICUNA = get_template("vicuna_v1")


def user(*parts: TextPart | MediaPart) -> Turn:
    return Turn("user", list(parts))


def text(s: str) -> TextPart:
    return TextPart(s)


def test_registry_covers_every_preset_template_name() -> None:
    assert set(TEMPLATES) == set(typing.get_args(TemplateName))


def test_vicuna_v1_golden_multi_turn() -> None:
    turns = [
        user(text("Hello")),
        Turn("assistant", [text("Hi there.")]),
        user(text("What color is the sky?")),
    ]
    assert VICUNA.render(turns) == [
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: Hello "
        "ASSISTANT: Hi there.</s>USER: What color is the sky? ASSISTANT:"
    ]


def test_vicuna_v1_image_first_renders_like_llava() -> None:
    segments = VICUNA.render([user(MediaPart(0), text("What is this?"))])
    assert segments == [f"{VICUNA_SYSTEM} USER: ", MediaRef(0), "\nWhat is this? ASSISTANT:"]


def test_parts_join_with_newline_where_media_stands() -> None:
    segments = VICUNA.render([user(text("Compare"), MediaPart(1), MediaPart(0), text("a"), text("b"))])
    assert segments == [
        f"{VICUNA_SYSTEM} USER: Compare\n",
        MediaRef(1),
        "\n",
        MediaRef(0),
        "\na\nb ASSISTANT:",
    ]


def test_system_turn_replaces_default_system_prompt() -> None:
    turns = [Turn("system", [text("Be brief.")]), user(text("Hi"))]
    assert VICUNA.render(turns) == ["Be brief. USER: Hi ASSISTANT:"]


def test_empty_system_turn_drops_the_system_prompt() -> None:
    assert VICUNA.render([Turn("system", [text("")]), user(text("Hi"))]) == ["USER: Hi ASSISTANT:"]


def test_llava_v1_uses_its_own_system_prompt() -> None:
    assert get_template("llava_v1").render([user(text("Hi"))]) == [f"{LLAVA_SYSTEM} USER: Hi ASSISTANT:"]
    assert "curious human" in LLAVA_SYSTEM


def test_plain_template_is_the_pretraining_format() -> None:
    plain = get_template("plain")
    assert plain.render([user(MediaPart(0))]) == [MediaRef(0)]
    turns = [user(MediaPart(0)), Turn("assistant", [text("a red square")])]
    assert plain.render(turns, add_generation_prompt=False) == [MediaRef(0), "a red square\n"]


def test_without_generation_prompt_ends_after_the_last_answer() -> None:
    turns = [user(text("Hi")), Turn("assistant", [text("Hello")])]
    assert VICUNA.render(turns, add_generation_prompt=False) == [
        f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello</s>"
    ]


def test_merge_text_joins_and_drops_empty() -> None:
    assert merge_text(["a", "", "b", MediaRef(0), "", MediaRef(1), "c"]) == [
        "ab",
        MediaRef(0),
        MediaRef(1),
        "c",
    ]


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "turns: expected at least one user turn, got none"),
        ([Turn("system", [text("s")])], "got only a system turn"),
        ([Turn("assistant", [text("a")])], "turns[0].role: expected 'user', got 'assistant'"),
        ([user(text("a")), user(text("b"))], "turns[1].role: expected 'assistant', got 'user'"),
        (
            [user(text("a")), Turn("system", [text("s")])],
            "turns[1].role: expected 'assistant', got 'system' (a system turn may only come first)",
        ),
        ([user(text("a")), Turn("assistant", [text("b")])], "the last turn must be 'user', got 'assistant'"),
        (
            [Turn("bot", [text("a")])],
            "turns[0].role: expected one of ['system', 'user', 'assistant'], got 'bot'",
        ),
        ([Turn("user", [])], "turns[0]: has no parts"),
        (
            [user(text("a")), Turn("assistant", [MediaPart(0)]), user(text("b"))],
            "turns[1]: media parts are only allowed in user turns",
        ),
        ([Turn("system", [MediaPart(0)]), user(text("b"))], "turns[0]: media parts are only allowed"),
    ],
)
def test_role_validation(turns: list[Turn], message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        VICUNA.render(turns)
    assert message in e.value.message


def test_unknown_template() -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected one of .*'vicuna_v1'.*got 'chatml'"):
        get_template("chatml")
