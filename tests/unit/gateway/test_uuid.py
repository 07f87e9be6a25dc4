"""Client-supplied `uuid` on media parts (vLLM's): features cached under it, reused by a part
that names the uuid without media, and the errors of a bad or unknown uuid."""

from __future__ import annotations

import base64
import uuid as uuidlib

import pytest
import redis.asyncio as aioredis

from gateway.domain import ChatRequest
from gateway.feature_cache import FeatureCache
from gateway.grpc_chat import to_domain
from gateway.protocol import parse_chat_request
from modalmesh.v1 import chat_pb2
from services.common.content import MediaInput
from services.common.errors import InvalidArgumentError
from tests.unit.gateway.support import (
    REDIS_URL,
    FakeEncoder,
    FakeLLM,
    ServiceFactory,
    needs_redis,
    sent_media,
    turn,
)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat(*items: MediaInput) -> ChatRequest:
    return ChatRequest(model="tiny", turns=[turn("user", (*items, "What is this?"))], request_id="r")


def test_a_uuid_rides_on_a_part_and_may_stand_alone() -> None:
    body = parse_chat_request(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://x/a.png"}, "uuid": "sku-1"},
                        {"type": "image_url", "image_url": None, "uuid": "sku-1"},
                        {"type": "input_audio", "uuid": "clip:7"},
                    ],
                }
            ]
        }
    )
    a, b, c = body.to_domain("r").media()
    assert (a.url, a.uuid) == ("https://x/a.png", "sku-1")
    assert (b.url, b.data, b.uuid) == (None, None, "sku-1")
    assert (c.modality, c.data, c.uuid) == ("audio", None, "clip:7")


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ({"type": "image_url", "uuid": "has space"}, "String should match pattern"),
        ({"type": "image_url", "uuid": ""}, "String should have at least 1 character"),
        ({"type": "image_url", "uuid": "x" * 129}, "String should have at most 128 characters"),
        ({"type": "image_url"}, "or a 'uuid' of an item sent before"),
    ],
)
def test_bad_uuids_are_refused(part: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        parse_chat_request({"messages": [{"role": "user", "content": [part]}]})


def test_the_grpc_api_takes_a_uuid_with_or_without_a_source() -> None:
    def request(media: chat_pb2.MediaInput) -> chat_pb2.ChatRequest:
        part = chat_pb2.ChatContentPart(image=media)
        return chat_pb2.ChatRequest(messages=[chat_pb2.ChatMessage(role="user", content=[part])])

    (alone,) = to_domain(request(chat_pb2.MediaInput(uuid="sku-1")), "r").media()
    assert (alone.url, alone.data, alone.uuid) == (None, None, "sku-1")
    (both,) = to_domain(request(chat_pb2.MediaInput(url="https://x/a.png", uuid="sku-1")), "r").media()
    assert (both.url, both.uuid) == ("https://x/a.png", "sku-1")
    with pytest.raises(InvalidArgumentError, match=r"image.uuid: expected 1-128 characters"):
        to_domain(request(chat_pb2.MediaInput(uuid="a b")), "r")
    with pytest.raises(InvalidArgumentError, match="expected a url, data or a uuid, got none"):
        to_domain(request(chat_pb2.MediaInput()), "r")


@needs_redis
async def test_a_uuid_reuses_the_features_it_cached(
    make_service: ServiceFactory, llm_server: tuple[FakeLLM, str], png: bytes
) -> None:
    prefix = f"mmtest:{uuidlib.uuid4().hex}:"
    encoder = FakeEncoder()
    service = make_service(
        llm_server[1], encoder=encoder, cache=FeatureCache(REDIS_URL, ttl_s=60, key_prefix=prefix)
    )
    try:
        first = await service.prepare(chat(MediaInput("image", data=png, uuid="sku-1", param="p0")))
        assert len(encoder.calls) == 1
        again = await service.prepare(chat(MediaInput("image", uuid="sku-1", param="p0")))  # no media at all
        assert (
            len(encoder.calls) == 1
            and sent_media(again.generate_request)[0] == sent_media(first.generate_request)[0]
        )
        # The uuid is the key, as the client vouches: other bytes under it still hit, unread.
        other = await service.prepare(chat(MediaInput("image", url="http://127.0.0.1:1/never", uuid="sku-1")))
        assert (
            len(encoder.calls) == 1
            and sent_media(other.generate_request)[0] == sent_media(first.generate_request)[0]
        )
        with pytest.raises(
            InvalidArgumentError, match=r"uuid 'sku-2': no image features are cached under it"
        ):
            await service.prepare(chat(MediaInput("image", uuid="sku-2", param="messages[0].content[0]")))
        raw = aioredis.Redis.from_url(REDIS_URL)
        keys = [k.decode() async for k in raw.scan_iter(match=prefix + "*")]
        assert keys == [f"{prefix}{service.preset.encoder_id('image')}:uuid:sku-1"]
        await raw.delete(*keys)
        await raw.aclose()
    finally:
        await service.aclose()
