"""Output media on the gateway (NExT-GPT presets): the request's `modalities` and decoding
parameters, their checks against the preset's decoders, and the OpenAI-shaped media entries."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gateway.domain import MediaOutput
from gateway.grpc_chat import to_domain
from gateway.protocol import media_entry, parse_chat_request
from modalmesh.v1 import chat_pb2
from services.common.errors import InvalidArgumentError
from tests.unit.gateway.support import ServiceFactory

USER = [{"role": "user", "content": "draw a red square"}]


def test_modalities_and_decoding_options_reach_the_domain_request() -> None:
    body = parse_chat_request(
        {
            "messages": USER,
            "modalities": ["text", "image"],
            "image": {"height": 64, "width": 48, "steps": 4, "seed": 7},
            "video": {"num_frames": 8},
        }
    )
    chat = body.to_domain("r1")
    assert chat.modalities == ("text", "image")
    assert chat.decoding == {
        "image": {"height": 64, "width": 48, "steps": 4, "seed": 7},
        "video": {"num_frames": 8},
    }


def test_the_grpc_request_carries_the_same_fields() -> None:
    request = chat_pb2.ChatRequest(
        messages=[chat_pb2.ChatMessage(role="user", content=[chat_pb2.ChatContentPart(text="play rain")])],
        modalities=["audio"],
        audio=chat_pb2.DecodeOptions(duration_s=2.0, steps=3),
    )
    chat = to_domain(request, "r2")
    assert chat.modalities == ("audio",)
    assert chat.decoding == {"audio": {"steps": 3, "duration_s": 2.0}}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image": {"stpes": 4}}, "image.stpes: Extra inputs are not permitted"),
        ({"image": {"steps": "many"}}, "image.steps: Input should be a valid integer"),
        ({"audio": "loud"}, "audio: Input should be a valid dictionary or instance of DecodeOptions"),
    ],
)
def test_malformed_decoding_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        parse_chat_request({"messages": USER, **options})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"modalities": ["text", "smell"]},
            r"modalities\[1\]: preset tiny-nextgpt can produce text, image, video, audio; got 'smell'",
        ),
        ({"image": {"steps": 500}}, r"image.steps: expected a number in \[1, 20\], got 500"),
        ({"image": {"steps": 0}}, r"image.steps: expected a number in \[1, 20\], got 0"),
        ({"image": {"height": 1000}}, r"image.height: expected a number in \[8, 256\], got 1000"),
        ({"image": {"width": 60}}, "image.width: expected a multiple of 8, got 60"),
        ({"audio": {"duration_s": 60.0}}, r"audio.duration_s: expected a number in \[0.5, 4.0\], got 60.0"),
        ({"audio": {"height": 64}}, "audio.height: does not apply to audio decoding"),
        ({"video": {"num_frames": 100}}, r"video.num_frames: expected a number in \[1, 16\], got 100"),
        (
            {"video": {"guidance_scale": -1.0}},
            r"video.guidance_scale: expected a number in \[0.0, 30.0\], got -1.0",
        ),
        ({"image": {"seed": -3}}, r"image.seed: expected a number in \[0, 9223372036854775807\], got -3"),
    ],
)
def test_outputs_out_of_the_presets_limits_are_refused(
    make_service: ServiceFactory, fields: dict[str, Any], message: str
) -> None:
    service = make_service(preset_="tiny-nextgpt")
    chat = parse_chat_request({"messages": USER, **fields}).to_domain("r3")
    with pytest.raises(InvalidArgumentError, match=message) as info:
        service.validate(chat)
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"modalities": ["text", "image"]}, r"modalities\[1\]: preset tiny can produce text; got 'image'"),
        ({"image": {"steps": 4}}, "image: decoding parameters for image, which preset tiny cannot produce"),
    ],
)
def test_outputs_a_preset_cannot_produce_are_refused(
    make_service: ServiceFactory, fields: dict[str, Any], message: str
) -> None:
    service = make_service()
    with pytest.raises(InvalidArgumentError, match=message):
        service.validate(parse_chat_request({"messages": USER, **fields}).to_domain("r4"))


def test_within_limits_passes(make_service: ServiceFactory) -> None:
    service = make_service(preset_="tiny-nextgpt")
    chat = parse_chat_request(
        {"messages": USER, "modalities": ["text", "image", "video"], "image": {"height": 32, "width": 48}}
    ).to_domain("r5")
    service.validate(chat)


def test_media_entries_have_the_shapes_of_content_parts() -> None:
    png = MediaOutput("image", 0, 5, data=b"\x89PNG", mime_type="image/png", seed=3)
    wav = MediaOutput("audio", 1, 5, data=b"RIFF", mime_type="audio/wav", seed=4)
    mp4 = MediaOutput("video", 2, 9, data=b"\x00\x00", mime_type="video/mp4", seed=5)
    assert media_entry(png) == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()},
        "modality": "image",
        "index": 0,
        "char_offset": 5,
        "seed": 3,
    }
    assert media_entry(wav)["input_audio"] == {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"}
    assert media_entry(mp4)["video_url"]["url"].startswith("data:video/mp4;base64,")
    failed = MediaOutput(
        "video", 2, 9, error="the decoder service at 127.0.0.1:1 is unavailable", error_code=503
    )
    assert media_entry(failed) == {
        "type": "error",
        "modality": "video",
        "index": 2,
        "char_offset": 9,
        "error": {
            "message": "the decoder service at 127.0.0.1:1 is unavailable",
            "type": "ServiceUnavailableError",
            "code": 503,
        },
    }
