"""The prompt builder: golden token ids, placeholder expansion, spans and every refusal."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.errors import InvalidArgumentError
from services.models.lm.loading import LoadedModel
from services.models.prompt.builder import (
    MediaSlot,
    ModalitySlots,
    PromptBuilder,
    combine_turn_media,
    placeholder_token_id,
)
from services.models.prompt.templates import BOS, MediaRef, get_template

VICUNA = get_template("vicuna_v1")
# The tiny tokenizer's ids for the vicuna_v1 system prompt followed by " USER:" and " ".
SYSTEM_IDS = [37, 381, 371, 261, 346, 309, 308, 267, 375, 369, 310, 18, 409, 310, 384, 379, 16]
SYSTEM_IDS += [359, 16, 308, 377, 370, 315, 376, 309, 410, 333, 18, 372, 30, 225]


def part(modality: str = "image", frames: int = 1) -> MediaPart[MediaFeatures[np.ndarray]]:
    """A media part of one item (each call a new part: a new item)."""
    return MediaPart(MediaFeatures(modality, np.zeros((frames, 8), np.float32)))


def slot(modality: str = "image", frames: int = 1) -> MediaSlot:
    """An item of the request, in its own new part."""
    return MediaSlot(part(modality, frames), frames)


def refs(slots: list[MediaSlot], *order: int) -> list[MediaRef]:
    """Segments standing for the slots' parts, in `order`."""
    return [MediaRef(slots[i].part) for i in order]


def builder(
    loaded: LoadedModel, *, max_context: int = 1024, max_per_prompt: int = 4, **kw: Any
) -> PromptBuilder:
    slots = ModalitySlots("<image>", 4, max_per_prompt, kw.get("num_tokens", lambda frames: 16 * frames))
    return PromptBuilder(loaded.tokenizer, {"image": slots}, max_context_tokens=max_context)


def test_golden_vicuna_v1_text_only(loaded: LoadedModel) -> None:
    turns = [
        Turn("user", [TextPart("Hello")]),
        Turn("assistant", [TextPart("Hi there.")]),
        Turn("user", [TextPart("What color is the sky?")]),
    ]
    prompt = loaded.prompt_builder.build(VICUNA.render(turns), [])
    # BOS, system, "USER: Hello ASSISTANT: Hi there." "</s>" (EOS id 2), "USER: ... ASSISTANT:"
    assert prompt.input_ids == [1, *SYSTEM_IDS, 44, 387, 83, 380, 30, 225, 44, 77, 482, 18, 2, 340, 30,
                                225, 59, 321, 388, 292, 501, 376, 495, 35, 380, 30]  # fmt: skip
    assert prompt.media_spans == []


def test_golden_vicuna_v1_with_image(loaded: LoadedModel) -> None:
    image = part()
    turns = [Turn("user", [image, TextPart("What is this?")])]
    prompt = loaded.prompt_builder.build(VICUNA.render(turns), [MediaSlot(image, 1)])
    assert prompt.input_ids == [1, *SYSTEM_IDS, *[4] * 16, 203, 59, 321, 501, 280, 286, 35, 380, 30]
    assert prompt.media_spans == [(32, 16)]
    assert prompt.media_tokens == 16


def test_ids_are_bos_plus_each_segment_tokenized_alone(loaded: LoadedModel, tokenizer: Any) -> None:
    media = [slot(), slot()]
    first, second = refs(media, 0, 1)
    segments: list[str | MediaRef] = ["Describe ", first, " and ", second, "</s>then"]
    prompt = builder(loaded).build(segments, media)

    def tok(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    expected = [tokenizer.bos_token_id, *tok("Describe "), *[4] * 16, *tok(" and "), *[4] * 16]
    expected += tok("</s>then")
    assert prompt.input_ids == expected
    assert prompt.input_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id in prompt.input_ids  # "</s>" written in text maps to EOS
    start0 = 1 + len(tok("Describe "))
    assert prompt.media_spans == [(start0, 16), (start0 + 16 + len(tok(" and ")), 16)]


def test_spans_follow_request_order_not_prompt_order(loaded: LoadedModel) -> None:
    media = [slot(), slot(frames=2)]
    prompt = builder(loaded).build(["a", *refs(media, 1, 0)], media)
    (s0, n0), (s1, n1) = prompt.media_spans
    assert (n0, n1) == (16, 32)
    assert s1 < s0 == s1 + 32
    for start, length in prompt.media_spans:
        assert prompt.input_ids[start : start + length] == [4] * length


def test_item_length_comes_from_the_connector(loaded: LoadedModel) -> None:
    media = [slot()]
    prompt = builder(loaded, num_tokens=lambda frames: 4 * frames).build(refs(media, 0), media)
    assert prompt.input_ids == [1, 4, 4, 4, 4]
    assert prompt.media_spans == [(1, 4)]


def test_placeholder_missing_from_tokenizer_falls_back_to_unk(tokenizer: Any) -> None:
    assert placeholder_token_id(tokenizer, "<image>") == 4
    assert placeholder_token_id(tokenizer, "<video>") == tokenizer.unk_token_id


@pytest.mark.parametrize(
    ("media", "order", "message"),
    [
        ([slot()], None, "a media part that is not one of the request's 1 media item(s)"),
        ([slot()], (0, 0), "media item 0 is referenced more than once"),
        ([slot(), slot()], (0,), "media[1]: not referenced by any turn"),
        ([slot("video", 16)], (0,), "media[0].modality: expected one of ['image'], got 'video'"),
        ([slot() for _ in range(5)], range(5), "at most 4 image items per prompt, got 5"),
        ([], "look: <image>", "message text contains '<image>', which is reserved"),
    ],
)
def test_refusals(loaded: LoadedModel, media: list[MediaSlot], order: Any, message: str) -> None:
    if order is None:  # a part the request does not hold
        segments: list[Any] = ["a", MediaRef(part())]
    elif isinstance(order, str):
        segments = [order]
    else:
        segments = refs(media, *order)
    with pytest.raises(InvalidArgumentError) as e:
        builder(loaded).build(segments, media)
    assert message in e.value.message


def test_prompt_must_leave_room_for_one_token(loaded: LoadedModel) -> None:
    media = [slot(), slot()]
    segments = refs(media, 0, 1)
    assert len(builder(loaded, max_context=34).build(segments, media).input_ids) == 33
    with pytest.raises(InvalidArgumentError) as e:
        builder(loaded, max_context=33).build(segments, media)
    assert e.value.message == (
        "prompt: 33 tokens (32 of them for 2 media item(s)), at most 32 allowed "
        "(context 33 tokens, one kept for the reply)"
    )


def test_bos_only_where_the_template_or_a_bos_segment_asks(loaded: LoadedModel, tokenizer: Any) -> None:
    bos = tokenizer.bos_token_id
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Hi", " there"))
    media = [slot()]
    prompt = builder(loaded).build([BOS, "Hi", *refs(media, 0), BOS, " there"], media, bos=False)
    assert prompt.input_ids == [bos, *a, *[4] * 16, bos, *b]
    assert prompt.media_spans == [(1 + len(a), 16)]
    assert builder(loaded).build(["Hi"], [], bos=False).input_ids == a


def test_time_tokens_pair_with_the_times_in_order(loaded: LoadedModel, tokenizer: Any) -> None:
    vid = tokenizer("<image>", add_special_tokens=False)["input_ids"][0]  # any single token will do
    slots = ModalitySlots("<video>", 5, 4, lambda frames: frames)
    media = [slot("video", 3)]
    prompt = PromptBuilder(tokenizer, {"video": slots}, max_context_tokens=512, time_token_id=vid).build(
        [*refs(media, 0), "a <image> b <image>"], media, times=[1.5, 0.0]
    )
    assert [prompt.input_ids[p] for p, _ in prompt.time_tokens] == [vid, vid]
    assert [t for _, t in prompt.time_tokens] == [1.5, 0.0]
    assert all(p >= 4 for p, _ in prompt.time_tokens)  # in the text, after the 3 frames
    with pytest.raises(
        InvalidArgumentError, match=r"expected one '<image>' per time part \(1\), the text holds 2"
    ):
        PromptBuilder(tokenizer, {"video": slots}, max_context_tokens=512, time_token_id=vid).build(
            ["a <image> b <image>"], [], times=[1.0]
        )
    with pytest.raises(InvalidArgumentError, match="timestamp heads"):
        builder(loaded).build(["a"], [], times=[1.0])


def test_sum_per_modality_keeps_the_first_item_of_each_modality_of_a_turn() -> None:
    p = [part(m) for m in ("image", "audio", "image", "audio", "image", "image")]
    turns = [
        Turn("user", [p[0], p[1], p[2], TextPart("q"), p[3]]),
        Turn("assistant", [TextPart("a")]),
        Turn("user", [p[4], p[5]]),
    ]
    out, combined = combine_turn_media(turns, per_modality=True)
    assert out[0].parts == [p[0], p[1], TextPart("q")]
    assert out[2].parts == [p[4]]
    assert combined == {2: 0, 3: 1, 5: 4}
    every, all_combined = combine_turn_media(turns)  # media_combine sum: one per turn
    assert every[0].parts == [p[0], TextPart("q")] and all_combined == {1: 0, 2: 0, 3: 0, 5: 4}
