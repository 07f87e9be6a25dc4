"""Conversation templates: golden renderings, part joining, media wrappers, role validation."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from services.common.content import MediaFeatures, MediaInput, MediaPart, TextPart, TimePart, Turn
from services.common.errors import InvalidArgumentError
from services.common.presets import TemplateName
from services.models.prompt.templates import (
    BOS,
    LLAVA_SYSTEM,
    TEMPLATES,
    VICUNA_SYSTEM,
    MediaRef,
    Template,
    get_template,
    merge_text,
)

VICUNA = get_template("vicuna_v1")
V0 = get_template("vicuna_v0")
VIDEOCHAT = get_template("videochat")
PHI3 = get_template("phi3")


def media(modality: str = "image", times: tuple[float, ...] = ()) -> MediaPart[MediaFeatures[np.ndarray]]:
    """A media part of a new item (its features do not matter to rendering)."""
    return MediaPart(MediaFeatures(modality, np.zeros((max(len(times), 1), 4), np.float32), times))


P = [media() for _ in range(4)]  # image parts: P[0], P[1]... in the tests' turns


def user(*parts: TextPart | MediaPart | TimePart) -> Turn:
    return Turn("user", list(parts))


def text(s: str) -> TextPart:
    return TextPart(s)


def assistant(s: str) -> Turn:
    return Turn("assistant", [text(s)])


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
    segments = VICUNA.render([user(P[0], text("What is this?"))])
    assert segments == [f"{VICUNA_SYSTEM} USER: ", MediaRef(P[0]), "\nWhat is this? ASSISTANT:"]


def test_parts_join_with_newline_where_media_stands() -> None:
    segments = VICUNA.render([user(text("Compare"), P[1], P[0], text("a"), text("b"))])
    assert segments == [
        f"{VICUNA_SYSTEM} USER: Compare\n",
        MediaRef(P[1]),
        "\n",
        MediaRef(P[0]),
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
    assert plain.render([user(P[0])]) == [MediaRef(P[0])]
    turns = [user(P[0]), Turn("assistant", [text("a red square")])]
    assert plain.render(turns, add_generation_prompt=False) == [MediaRef(P[0]), "a red square\n"]


def test_without_generation_prompt_ends_after_the_last_answer() -> None:
    turns = [user(text("Hi")), Turn("assistant", [text("Hello")])]
    assert VICUNA.render(turns, add_generation_prompt=False) == [
        f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello</s>"
    ]


def test_merge_text_joins_and_drops_empty() -> None:
    assert merge_text(["a", "", "b", MediaRef(P[0]), "", MediaRef(P[1]), "c"]) == [
        "ab",
        MediaRef(P[0]),
        MediaRef(P[1]),
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
            [user(text("a")), Turn("assistant", [P[0]]), user(text("b"))],
            "turns[1]: media parts are only allowed in user turns",
        ),
        ([Turn("system", [P[0]]), user(text("b"))], "turns[0]: media parts are only allowed"),
    ],
)
def test_role_validation(turns: list[Turn], message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        VICUNA.render(turns)
    assert message in e.value.message


def test_unknown_template() -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected one of .*'vicuna_v1'.*got 'chatml'"):
        get_template("chatml")


# Golden strings below are written by hand from SEEDS_SPEC (sections 3, 4 and 5) and the seeds'
# inference code; MediaRef(P[0]) stands where the media features go.


def test_vicuna_v0_one_turn_is_pandagpt_generation_prompt() -> None:
    # PandaGPT: [BOS] + "### Human: <Img>" + feature + "</Img> {prompt}\n### Assistant:".
    assert V0.render([user(P[0], text("What is this?"))]) == [
        "### Human: <Img>",
        MediaRef(P[0]),
        "</Img> What is this?\n### Assistant:",
    ]


def test_vicuna_v0_two_turns_follow_pandagpt_web_demo_history() -> None:
    # web_demo.py: "{q}\n### Assistant: {a}\n###" then " Human: {q}".
    turns = [user(P[0], text("What is this?")), assistant("A dog."), user(text("What color?"))]
    assert V0.render(turns) == [
        "### Human: <Img>",
        MediaRef(P[0]),
        "</Img> What is this?\n### Assistant: A dog.\n### Human: What color?\n### Assistant:",
    ]
    assert (
        V0.render(turns[:2], add_generation_prompt=False)[-1]
        == "</Img> What is this?\n### Assistant: A dog.\n###"
    )


def test_vicuna_v0_wraps_every_modality_in_img_and_has_no_system_prompt() -> None:
    assert V0.render([user(text("Hi"))]) == ["### Human: Hi\n### Assistant:"]
    for modality in ("image", "video", "audio"):
        item = media(modality)
        segments = V0.render([user(item)])
        assert segments == ["### Human: <Img>", MediaRef(item), "</Img>\n### Assistant:"]
    turns = [Turn("system", [text("Be brief.")]), user(text("Hi"))]
    assert V0.render(turns) == ["Be brief.\n### Human: Hi\n### Assistant:"]


def test_videochat_image_is_a_human_message_of_its_own() -> None:
    # conversation.py: "<Image><ImageHere></Image>\n" as one Human message, ask() adds text + "\n".
    segments = VIDEOCHAT.render([user(P[0], text("What is this?"))])
    assert segments == [
        "###Human: <Image>",
        MediaRef(P[0]),
        "</Image>\n###Human: What is this?\n###Assistant:",
    ]


def test_videochat_two_turns_with_video() -> None:
    # A stored answer is stripped and followed directly by the "###" separator.
    video = media("video")
    turns = [user(video, text("What happens?")), assistant("A man runs."), user(text("Why?"))]
    assert VIDEOCHAT.render(turns) == [
        "###Human: <Video>",
        MediaRef(video),
        "</Video>\n###Human: What happens?\n###Assistant: A man runs.###Human: Why?\n###Assistant:",
    ]
    assert VIDEOCHAT.render([user(text("Hi"))]) == ["###Human: Hi\n###Assistant:"]


def test_videochat_wraps_each_item_by_its_modality() -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected one of \['image', 'video'\], got 'audio'"):
        VIDEOCHAT.render([user(media("audio"))])
    assert VIDEOCHAT.render([user(P[3])])[:3] == [
        "###Human: <Image>",
        MediaRef(P[3]),
        "</Image>\n###Assistant:",
    ]


def test_phi3_one_turn_is_etchat_prompt() -> None:
    assert PHI3.render([user(P[0], text("What is this?"))]) == [
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n",
        MediaRef(P[0]),
        "\nWhat is this?<|end|>\n<|assistant|>\n",
    ]


def test_phi3_two_turns() -> None:
    turns = [user(P[0], text("What is this?")), assistant("A dog."), user(text("What color?"))]
    assert PHI3.render(turns) == [
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n",
        MediaRef(P[0]),
        "\nWhat is this?<|end|>\n<|assistant|>\nA dog.<|end|>\n<|user|>\nWhat color?<|end|>\n<|assistant|>\n",
    ]


def test_phi3_system_turn_and_no_leading_newline_without_system() -> None:
    turns = [Turn("system", [text("Be brief.")]), user(text("Hi"))]
    assert PHI3.render(turns) == ["<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"]
    # etchat's get_prompt strips the leading "\n" of the first user role.
    turns = [Turn("system", [text("")]), user(text("Hi"))]
    assert PHI3.render(turns) == ["<|user|>\nHi<|end|>\n<|assistant|>\n"]


@pytest.mark.parametrize(
    ("name", "stop"),
    [
        ("vicuna_v1", ()),
        ("llava_v1", ()),
        ("plain", ()),
        ("vicuna_v0", ("###",)),
        ("videochat", ("###",)),
        ("phi3", ("<|end|>",)),
    ],
)
def test_template_stop_strings(name: str, stop: tuple[str, ...]) -> None:
    assert get_template(name).stop == stop


@pytest.mark.parametrize("template", TEMPLATES.values(), ids=list(TEMPLATES))
def test_every_assistant_prefix_starts_with_the_generation_prompt(template: Template) -> None:
    # Training relies on it: the prompt part of each round ends where serving's prompt ends.
    assert template.assistant_prefix.startswith(template.generation_prompt)


def test_eventgpt_v1_golden() -> None:
    from services.models.prompt.templates import LLAVA_SYSTEM

    event = media("event")
    turns = [
        Turn("user", [event, TextPart("What moves?")]),
        Turn("assistant", [TextPart("A bar.")]),
        Turn("user", [TextPart("Where?")]),
    ]
    got = get_template("eventgpt_v1").render(turns)
    assert got == [
        f"{LLAVA_SYSTEM} USER: <ev_start>",
        MediaRef(event),
        "<ev_end>\nWhat moves? ASSISTANT: A bar.</s>USER: Where? ASSISTANT:",
    ]


def test_videochat_frame_note_needs_the_times() -> None:
    def turns(item: MediaPart[MediaFeatures[np.ndarray]]) -> list[Turn]:
        return [Turn("user", [item, TextPart("What happens?")])]

    template = get_template("videochat")
    with_times = template.render(turns(media("video", (0.54, 12.0))))
    assert with_times[-1] == (
        "</Video> The video contains 2 frames sampled at 0.5, 12.0 seconds.\n###Human: What happens?\n###Assistant:"
    )
    without = template.render(turns(media("video")))[-1]
    assert isinstance(without, str) and without.startswith("</Video>\n###Human:")
    image = template.render(turns(media("image", (0.0,))))[-1]
    assert isinstance(image, str) and image.startswith("</Image>\n###Human:")
    files = [Turn("user", [MediaPart(MediaInput("video")), TextPart("What happens?")])]  # no times
    assert str(template.render(files)[-1]).startswith("</Video>\n###Human:")


DEMO = get_template("nextgpt_demo")


def test_nextgpt_demo_one_turn_splits_around_the_media_with_a_bos_per_text() -> None:
    # demo_app.py: "### Human: <Image>p</Image> " + " q"; re.split(' <|> ') eats the space on
    # each side of the tag: "### Human:" | media | " q\n### Assistant:".
    got = DEMO.render([user(P[0], text("What is this?"))])
    assert got == [BOS, "### Human:<Img>", MediaRef(P[0]), "</Img>", BOS, " What is this?\n### Assistant:"]
    assert not DEMO.bos


def test_nextgpt_demo_history_turns_have_one_space_and_the_current_two() -> None:
    turns = [
        user(P[0], text("q1")),
        assistant("a1"),
        user(text("q2")),
    ]
    got = DEMO.render(turns)
    assert got == [
        BOS,
        "### Human:<Img>",
        MediaRef(P[0]),
        "</Img>",
        BOS,
        "q1\n### Assistant: a1\n### Human:  q2\n### Assistant:",
    ]


def test_nextgpt_demo_writes_media_first_and_each_item_its_own_segment() -> None:
    got = DEMO.render([user(text("Compare"), P[0], P[1])])
    assert got == [
        BOS,
        "### Human:<Img>",
        MediaRef(P[0]),
        "</Img><Img>",
        MediaRef(P[1]),
        "</Img>",
        BOS,
        " Compare\n### Assistant:",
    ]


def test_phi3_starts_without_bos_and_the_others_with_one() -> None:
    assert [name for name, t in TEMPLATES.items() if not t.bos] == ["nextgpt_demo", "phi3"]


def test_time_parts_render_inline_as_the_time_token() -> None:
    turn = user(P[0], text("From "), TimePart(1.5), text(" to "), TimePart(3.0), text("?"))
    got = PHI3.render([turn], time_token="<vid>")
    assert got[-2:] == [MediaRef(P[0]), "\nFrom <vid> to <vid>?<|end|>\n<|assistant|>\n"]
    with pytest.raises(InvalidArgumentError, match=r"heads\.timestamps"):
        PHI3.render([turn])
