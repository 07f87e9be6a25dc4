"""OpenAI request parsing (every content form, every invalid form) and response shapes."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gateway.protocol import (
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    UsageInfo,
    content_chunk,
    format_loc,
    parse_chat_request,
    role_chunk,
    usage_chunk,
)
from services.common.content import MediaInput, MediaPart, TextPart, TimePart
from services.common.errors import InvalidArgumentError

URL = "https://example.com/cat.png"


def user(content: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}]}


def rejected(body: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        parse_chat_request(body)
    assert info.value.http_status == 400
    return info.value


# ---- content forms ------------------------------------------------------------------------


def test_string_content_becomes_one_text_part() -> None:
    req = parse_chat_request(user("hello"))
    chat = req.to_domain("rid")
    assert chat.turns[0].role == "user"
    assert chat.turns[0].parts == (TextPart("hello"),)
    assert chat.request_id == "rid"
    assert chat.model == "tiny"


def test_text_and_image_parts_keep_their_order() -> None:
    req = parse_chat_request(
        user(
            [
                {"type": "text", "text": "before"},
                {"type": "image_url", "image_url": {"url": URL, "detail": "low"}},
                {"type": "text", "text": "after"},
            ]
        )
    )
    parts = req.to_domain("r").turns[0].parts
    assert parts[0] == TextPart("before") and parts[2] == TextPart("after")
    assert parts[1] == MediaPart(MediaInput("image", url=URL, param="messages[0].content[1]"))
    assert req.messages[0].content[1].image_url is not None
    assert req.messages[0].content[1].image_url.detail == "low"


def test_simple_image_url_string_form() -> None:
    req = parse_chat_request(user([{"type": "image_url", "image_url": URL}]))
    (item,) = req.to_domain("r").media()
    assert item.url == URL


def test_data_url_is_kept_verbatim() -> None:
    url = "data:image/png;base64,iVBORw0KGgo="
    req = parse_chat_request(user([{"type": "image_url", "image_url": {"url": url}}]))
    assert req.to_domain("r").media()[0].url == url


def test_system_assistant_and_null_content() -> None:
    req = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None},
            ]
        }
    )
    turns = req.to_domain("r").turns
    assert [t.role for t in turns] == ["system", "user", "assistant"]
    assert turns[2].parts == ()
    assert req.model is None


def test_media_params_count_across_messages() -> None:
    req = parse_chat_request(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": URL}]},
                {"role": "assistant", "content": "ok"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "and"}, {"type": "image_url", "image_url": URL}],
                },
            ]
        }
    )
    assert [m.param for m in req.to_domain("r").media()] == [
        "messages[0].content[0]",
        "messages[2].content[1]",
    ]


# ---- sampling fields ----------------------------------------------------------------------


def test_sampling_fields_and_unknown_extras() -> None:
    req = parse_chat_request(
        {
            **user("x"),
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 20,
            "seed": 3,
            "stop": "</s>",
            "user": "u1",
            "request_id": "abc",
            "logprobs": False,
            "tools": [],
            "frequency_penalty": 0.0,
            "mm_processor_kwargs": {},
        }
    )
    chat = req.to_domain("r")
    assert (chat.max_tokens, chat.max_tokens_param) == (7, "max_tokens")
    assert (chat.temperature, chat.top_p, chat.top_k, chat.seed) == (0.5, 0.9, 20, 3)
    assert chat.stop == ["</s>"]
    assert req.request_id == "abc"


def test_penalties_and_stop_token_ids_as_openai_and_vllm_take_them() -> None:
    chat = parse_chat_request(
        {
            **user("x"),
            "presence_penalty": 0.5,
            "frequency_penalty": -1.0,
            "repetition_penalty": 1.2,
            "stop_token_ids": [2277, 835],
        }
    ).to_domain("r")
    assert (chat.presence_penalty, chat.frequency_penalty, chat.repetition_penalty) == (0.5, -1.0, 1.2)
    assert chat.stop_token_ids == [2277, 835]
    unset = parse_chat_request(user("x")).to_domain("r")  # left to the preset
    assert unset.presence_penalty is unset.frequency_penalty is unset.repetition_penalty is None
    assert unset.stop_token_ids == []
    err = rejected({**user("x"), "repetition_penalty": "strong"})
    assert err.message.startswith("repetition_penalty: Input should be a valid number")
    err = rejected({**user("x"), "stop_token_ids": ["###"]})
    assert err.message.startswith("stop_token_ids[0]: Input should be a valid integer")


def test_max_completion_tokens_wins() -> None:
    chat = parse_chat_request({**user("x"), "max_tokens": 7, "max_completion_tokens": 9}).to_domain("r")
    assert (chat.max_tokens, chat.max_tokens_param) == (9, "max_completion_tokens")


def test_stop_list_and_stream_options() -> None:
    req = parse_chat_request(
        {**user("x"), "stop": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}}
    )
    assert req.to_domain("r").stop == ["a", "b"]
    assert req.stream and req.include_usage
    assert not parse_chat_request({**user("x"), "stream": True}).include_usage


def test_n_must_be_one() -> None:
    assert parse_chat_request({**user("x"), "n": 1}).n == 1
    err = rejected({**user("x"), "n": 2})
    assert err.message == "n: only n=1 is supported, got 2"


# ---- invalid forms ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image_embeds", "audio_embeds", "file"])
def test_other_vllm_part_types_are_refused_clearly(kind: str) -> None:
    err = rejected(user([{"type": "text", "text": "x"}, {"type": kind, kind: {"url": URL}}]))
    assert err.message.startswith(
        f"messages[0].content[1]: content part type {kind!r} is not supported by modalmesh; accepted "
        "content parts are 'text', 'image_url', 'video_url', 'audio_url', 'event_url', 'input_audio', "
        "'input_event'"
    )
    assert err.param == "messages[0].content[1]"


@pytest.mark.parametrize(
    ("kind", "modality"),
    [("image_url", "image"), ("video_url", "video"), ("audio_url", "audio"), ("event_url", "event")],
)
def test_media_url_parts(kind: str, modality: str) -> None:
    for form in ({"url": URL}, URL):  # the object and vLLM's plain-string form
        req = parse_chat_request(user([{"type": kind, kind: form}, {"type": "text", "text": "what?"}]))
        (item,) = req.to_domain("r").media()
        assert (item.modality, item.url, item.data, item.param) == (
            modality,
            URL,
            None,
            "messages[0].content[0]",
        )


@pytest.mark.parametrize(
    ("kind", "modality", "fmt"),
    [("input_audio", "audio", "wav"), ("input_audio", "audio", "MP3"), ("input_event", "event", "npz")],
)
def test_inline_media_parts(kind: str, modality: str, fmt: str) -> None:
    payload = {"data": base64.b64encode(b"RIFF....").decode(), "format": fmt}
    (item,) = parse_chat_request(user([{"type": kind, kind: payload}])).to_domain("r").media()
    assert (item.modality, item.data, item.fmt, item.url) == (modality, b"RIFF....", fmt.lower(), None)


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}},
         "input_audio.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'"),
        ({"type": "input_event", "input_event": {"data": "AAAA", "format": "h5"}},
         "input_event.format: expected one of ['npy', 'npz'], got 'h5'"),
        ({"type": "input_audio"}, "an 'input_audio' part needs 'input_audio'"),
        ({"type": "video_url"}, "a 'video_url' part needs 'video_url': {'url': '...'} or a URL string"),
        ({"type": "input_audio", "input_audio": {"format": "wav"}}, "data"),
    ],
)  # fmt: skip
def test_bad_media_parts(part: dict, fragment: str) -> None:
    assert fragment in rejected(user([part])).message


def test_inline_data_that_is_not_base64() -> None:
    req = parse_chat_request(
        user([{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}])
    )
    with pytest.raises(
        InvalidArgumentError, match=r"messages\[0\]\.content\[0\]\.input_audio\.data: expected base64"
    ):
        req.to_domain("r")


def test_unknown_part_type() -> None:
    err = rejected(user([{"type": "hologram"}]))
    assert "content part type 'hologram' is unknown" in err.message
    assert "accepted content parts are 'text', 'image_url'" in err.message


def test_part_without_type() -> None:
    err = rejected(user([{"text": "x"}]))
    assert err.message.startswith("messages[0].content[0]: content part has no 'type'")


def test_part_that_is_not_an_object() -> None:
    err = rejected(user(["just a string"]))
    assert err.message == (
        "messages[0].content[0]: expected a content part object such as "
        "{'type': 'text', 'text': '...'}, got str"
    )


def test_text_part_without_text() -> None:
    err = rejected(user([{"type": "text"}]))
    assert err.message == "messages[0].content[0]: a 'text' part needs a 'text' string"


@pytest.mark.parametrize("image_url", [None, {}, {"detail": "low"}, 42])
def test_image_part_without_url(image_url: Any) -> None:
    err = rejected(user([{"type": "image_url", "image_url": image_url}]))
    assert err.message.startswith("messages[0].content[0]")
    assert "url" in err.message


def test_bad_detail() -> None:
    err = rejected(user([{"type": "image_url", "image_url": {"url": URL, "detail": "ultra"}}]))
    assert err.message.startswith("messages[0].content[0].image_url.detail: Input should be")
    assert "(got 'ultra')" in err.message


def test_content_of_wrong_type() -> None:
    err = rejected(user(42))
    assert err.message == ("messages[0].content: expected a string or a list of content parts, got int")


def test_bad_role() -> None:
    err = rejected({"messages": [{"role": "tool", "content": "x"}]})
    assert err.message == ("messages[0].role: Input should be 'system', 'user' or 'assistant' (got 'tool')")
    assert err.param == "messages[0].role"


def test_missing_messages() -> None:
    err = rejected({"model": "tiny"})
    assert err.message == "messages: Field required"


def test_wrong_field_types_say_what_was_expected() -> None:
    err = rejected({**user("x"), "max_tokens": "many"})
    assert err.message.startswith("max_tokens: Input should be a valid integer")
    assert "(got 'many')" in err.message
    err = rejected({**user("x"), "temperature": "hot"})
    assert err.message.startswith("temperature: Input should be a valid number")


def test_body_that_is_not_an_object() -> None:
    err = rejected([1, 2])
    assert err.message.startswith("body: Input should be a valid dictionary")


def test_several_problems_are_counted() -> None:
    err = rejected({"messages": [{"role": "tool"}], "max_tokens": "x"})
    assert "more problem" in err.message


def test_format_loc() -> None:
    assert (
        format_loc(("body", "messages", 0, "content", 1, "image_url")) == "messages[0].content[1].image_url"
    )
    assert format_loc(("max_tokens",)) == "max_tokens"
    assert format_loc(()) == ""


# ---- response shapes ----------------------------------------------------------------------


def test_role_chunk_shape() -> None:
    assert role_chunk("chatcmpl-1", 5, "tiny") == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }


def test_content_and_last_chunk_shapes() -> None:
    mid = content_chunk("c", 5, "tiny", "A cat")
    assert mid["choices"] == [
        {
            "index": 0,
            "delta": {"content": "A cat"},
            "logprobs": None,
            "finish_reason": None,
            "token_ids": None,
        }
    ]
    assert "usage" not in mid
    last = content_chunk("c", 5, "tiny", ".", "stop", None)
    assert last["choices"] == [
        {
            "index": 0,
            "delta": {"content": "."},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": None,
        }
    ]


def test_usage_chunk_shape() -> None:
    chunk = usage_chunk("c", 5, "tiny", UsageInfo.of(11, 3))
    assert chunk == {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "tiny",
        "choices": [],
        "usage": {"prompt_tokens": 11, "total_tokens": 14, "completion_tokens": 3},
    }


def test_model_list_shape() -> None:
    card = ModelCard(id="tiny", created=1, root="tiny", max_model_len=1024)
    body = ModelList(data=[card]).to_json()
    assert body["object"] == "list"
    assert body["data"][0] | {"permission": []} == {
        "id": "tiny",
        "object": "model",
        "created": 1,
        "owned_by": "modalmesh",
        "root": "tiny",
        "parent": None,
        "max_model_len": 1024,
        "permission": [],
    }


def test_the_presets_sampling_defaults_are_on_its_card_only() -> None:
    defaults = {"max_tokens": 256, "top_p": 0.01, "stop": [], "stop_token_ids": [2277]}
    cards = [
        ModelCard(id="pandagpt", created=1, sampling_defaults=defaults),
        ModelCard(id="pandagpt@1", created=1, parent="pandagpt"),
    ]
    body = ModelList(data=cards).to_json()
    assert body["data"][0]["sampling_defaults"] == defaults
    assert "sampling_defaults" not in body["data"][1]


def test_request_model_schema_ignores_extras() -> None:
    req = ChatCompletionRequest.model_validate({**user("x"), "whatever": {"a": 1}})
    assert not hasattr(req, "whatever")


def test_time_parts_carry_seconds_in_order() -> None:
    req = parse_chat_request(
        user(
            [
                {"type": "video_url", "video_url": {"url": URL}},
                {"type": "text", "text": "From "},
                {"type": "time", "time": {"seconds": 12.5}},
                {"type": "text", "text": " to "},
                {"type": "time", "time": {"seconds": 0}},
            ]
        )
    )
    parts = req.to_domain("r").turns[0].parts
    assert parts[2] == TimePart(12.5, param="messages[0].content[2]")
    assert parts[4] == TimePart(0.0, param="messages[0].content[4]")
    assert [type(p).__name__ for p in parts] == ["MediaPart", "TextPart", "TimePart", "TextPart", "TimePart"]
    assert len(req.to_domain("r").media()) == 1


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        ({"type": "time"}, "a 'time' part needs 'time': {'seconds': <number >= 0>}"),
        ({"type": "time", "time": {"seconds": -1}}, "time.seconds"),
        ({"type": "time", "time": {"seconds": "soon"}}, "time.seconds"),
    ],
)
def test_bad_time_parts(part: dict, fragment: str) -> None:
    assert fragment in rejected(user([part])).message


# ---- the generic media part (input_media) ----------------------------------------------------


def test_every_registered_part_type_has_a_field() -> None:
    from gateway.protocol import ACCEPTED_PARTS, ContentPart
    from services.common import modalities

    for record in modalities.MODALITIES.values():
        for part_type in record.part_types():
            assert part_type in ContentPart.model_fields and part_type in ACCEPTED_PARTS
    assert "input_media" in ContentPart.model_fields and "input_media" in ACCEPTED_PARTS


@pytest.mark.parametrize(
    ("payload", "want"),
    [
        ({"modality": "image", "url": URL}, ("image", URL, None, None)),
        ({"modality": "video", "url": "data:video/mp4;base64,AAAA"}, ("video", "data:video/mp4;base64,AAAA", None, None)),
        ({"modality": "audio", "data": base64.b64encode(b"RIFF").decode(), "format": "WAV"}, ("audio", None, b"RIFF", "wav")),
        ({"modality": "event", "data": base64.b64encode(b"NPY").decode()}, ("event", None, b"NPY", None)),
        ({"modality": "smell", "url": URL}, ("smell", URL, None, None)),  # refused by the preset check
    ],
)  # fmt: skip
def test_input_media_parts(payload: dict[str, Any], want: tuple[Any, ...]) -> None:
    req = parse_chat_request(
        user([{"type": "text", "text": "x"}, {"type": "input_media", "input_media": payload}])
    )
    part = req.to_domain("r").turns[0].parts[1]
    assert isinstance(part, MediaPart) and isinstance(part.media, MediaInput)
    item = part.media
    assert (item.modality, item.url, item.data, item.fmt) == want
    assert item.param == "messages[0].content[1]"


def test_input_media_with_a_uuid_alone_reuses_the_cached_item() -> None:
    part = {"type": "input_media", "input_media": {"modality": "audio"}, "uuid": "clip-1"}
    (item,) = parse_chat_request(user([part])).to_domain("r").media()
    assert item == MediaInput("audio", param="messages[0].content[0]", uuid="clip-1")
    with_data = part | {"input_media": {"modality": "image", "url": URL}}
    (item,) = parse_chat_request(user([with_data])).to_domain("r").media()
    assert (item.modality, item.url, item.uuid) == ("image", URL, "clip-1")


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ({"type": "input_media"},
         "messages[0].content[0]: an 'input_media' part needs 'input_media': {'modality': <name>, 'url': '...'} "
         "or {'modality': <name>, 'data': <base64>, 'format': ...}"),
        ({"type": "input_media", "input_media": {"url": URL}},
         "messages[0].content[0].input_media.modality: Field required"),
        ({"type": "input_media", "input_media": {"modality": "image"}},
         "messages[0].content[0]: input_media: expected 'url' or 'data' (or a 'uuid' of an item sent before), "
         "got neither"),
        ({"type": "input_media", "input_media": {"modality": "image", "url": URL, "data": "AAAA"}},
         "messages[0].content[0]: input_media: expected one of 'url' and 'data', got both"),
        ({"type": "input_media", "input_media": {"modality": "audio", "data": "AAAA", "format": "aac"}},
         "messages[0].content[0]: input_media.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'"),
        ({"type": "input_media", "input_media": {"modality": "image", "data": "AAAA", "format": "png"}},
         "messages[0].content[0]: input_media.format: expected no format for image (read from the bytes), "
         "got 'png'"),
    ],
)  # fmt: skip
def test_bad_input_media_parts(part: dict[str, Any], message: str) -> None:
    err = rejected(user([part]))
    assert err.message == message
    assert err.param is not None and err.param.startswith("messages[0].content[0]")


def test_input_media_data_that_is_not_base64() -> None:
    part = {"type": "input_media", "input_media": {"modality": "event", "data": "not base64!"}}
    req = parse_chat_request(user([part]))
    with pytest.raises(
        InvalidArgumentError, match=r"messages\[0\]\.content\[0\]\.input_media\.data: expected base64"
    ):
        req.to_domain("r")


@pytest.mark.parametrize(
    ("modality", "mime", "kind", "payload"),
    [
        ("image", "image/png", "image_url", {"url": "data:image/png;base64,UE5H"}),
        ("video", "video/mp4", "video_url", {"url": "data:video/mp4;base64,UE5H"}),
        ("audio", "audio/wav", "input_audio", {"data": "UE5H", "format": "wav"}),
    ],
)
def test_generated_media_take_the_shape_of_their_modalitys_part(
    modality: str, mime: str, kind: str, payload: dict[str, Any]
) -> None:
    from gateway.domain import MediaOutput
    from gateway.protocol import media_entry

    entry = media_entry(
        MediaOutput(modality=modality, index=0, char_offset=3, data=b"PNG", mime_type=mime, seed=7)
    )
    assert entry == {
        "type": kind,
        kind: payload,
        "modality": modality,
        "index": 0,
        "char_offset": 3,
        "seed": 7,
    }
